"""The KV-cache export: decode steps with the cache equal a full recomputation, for every architecture."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")
import onnxruntime as ort  # noqa: E402
from llm_models import ARCHS, tiny_causal_lm  # noqa: E402

from graphopt import to_bytes  # noqa: E402
from graphopt.llm.export import decoder_shape, export_decoder, io_names  # noqa: E402


def _session(model):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(to_bytes(model), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decode_equals_full_recomputation(arch):
    import torch

    lm = tiny_causal_lm(arch)
    shape = decoder_shape(lm.config)
    model = export_decoder(lm, last_token_logits=False)
    inputs, outputs = io_names(shape.num_layers)
    assert [v.name for v in model.graph.inputs] == inputs
    assert [v.name for v in model.graph.outputs] == outputs
    session = _session(model)
    ids = np.random.default_rng(1).integers(3, 128, (2, 11)).astype(np.int64)
    with torch.no_grad():
        full = lm(torch.from_numpy(ids)).logits.numpy()
    empty = np.zeros((2, shape.num_kv_heads, 0, shape.head_size), np.float32)
    feeds = {n: empty for n in inputs[3:]}
    prompt = 7
    feeds |= {
        "input_ids": ids[:, :prompt],
        "attention_mask": np.ones((2, prompt), np.int64),
        "position_ids": np.tile(np.arange(prompt), (2, 1)),
    }
    out = session.run(None, feeds)
    np.testing.assert_allclose(out[0], full[:, :prompt], atol=1e-4, rtol=1e-4)
    for t in range(prompt, ids.shape[1]):
        feeds = {
            n.replace("present", "past_key_values"): v for n, v in zip(outputs[1:], out[1:], strict=True)
        }
        feeds |= {
            "input_ids": ids[:, t : t + 1],
            "attention_mask": np.ones((2, t + 1), np.int64),
            "position_ids": np.full((2, 1), t),
        }
        out = session.run(None, feeds)
        assert out[1].shape[2] == t + 1
        np.testing.assert_allclose(out[0][:, 0], full[:, t], atol=1e-4, rtol=1e-4)


def test_last_token_logits_are_the_last_row_of_full_logits():
    lm = tiny_causal_lm("llama", tied=True)
    shape = decoder_shape(lm.config)
    inputs, _ = io_names(shape.num_layers)
    ids = np.random.default_rng(2).integers(3, 128, (1, 9)).astype(np.int64)
    empty = np.zeros((1, shape.num_kv_heads, 0, shape.head_size), np.float32)
    feeds = {n: empty for n in inputs[3:]} | {
        "input_ids": ids,
        "attention_mask": np.ones((1, 9), np.int64),
        "position_ids": np.arange(9)[None],
    }
    full = _session(export_decoder(lm))
    last = _session(export_decoder(lm, last_token_logits=True))
    full_logits, last_logits = full.run(["logits"], feeds)[0], last.run(["logits"], feeds)[0]
    assert last_logits.shape == (1, 1, 128)
    np.testing.assert_allclose(last_logits[:, 0], full_logits[:, -1], atol=1e-5)

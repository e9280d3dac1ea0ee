"""GroupQueryAttention on KV-cache exports: every layer fused, the cache read and written by the op.

``export_decoder`` graphs (position_ids input, ``Concat(past, new)`` on keys and values, a mask read
off ``attention_mask`` that spans past and new tokens), optimized with the ort-cpu default pipeline
and the padding convention declared (``fuse-ort(padding_mask=[attention_mask])``, what the LLM build
passes): one GroupQueryAttention per layer, whose present outputs are the graph's ``present.*``, and
ONNX Runtime's logits and presents equal to the unfused export's for a prompt (past 0) and two decode
steps after it, batch 1 and 2.
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import numpy as np
import pytest

pytest.importorskip("transformers")
import onnxruntime as ort  # noqa: E402
from llm_models import tiny_causal_lm  # noqa: E402

import graphopt  # noqa: E402
from graphopt.llm.export import decoder_shape, export_decoder, io_names  # noqa: E402

PAD = "fuse-ort(padding_mask=[attention_mask])"
#: (architecture, tied embeddings): Llama tied like SmolLM2, Qwen2 with QKV bias, Mistral, Phi-3
#: with packed qkv_proj.
CASES = [("llama", True), ("qwen2", False), ("mistral", False), ("phi3", False)]


def pipeline() -> str:
    text = str(graphopt.default_registry().backend("ort-cpu").default_pipeline())
    assert text.count("fuse-ort") == 1, text
    return text.replace("fuse-ort", PAD)


@functools.cache
def built(arch: str, tied: bool) -> tuple[Any, bytes, bytes, Any]:
    lm = tiny_causal_lm(arch, tied=tied)
    original = graphopt.to_bytes(export_decoder(lm, last_token_logits=True))
    result = graphopt.optimize(graphopt.load(original), "ort-cpu", pipeline=pipeline())
    return lm, original, graphopt.to_bytes(result.model), result


def _session(blob: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])


def _steps(session: ort.InferenceSession, lm: Any, ids: np.ndarray, prompt: int) -> list[list[np.ndarray]]:
    """Outputs of a prompt of ``prompt`` tokens, then one decode step per remaining token."""
    shape = decoder_shape(lm.config)
    inputs, _ = io_names(shape.num_layers)
    batch = ids.shape[0]
    empty = np.zeros((batch, shape.num_kv_heads, 0, shape.head_size), np.float32)
    past = [empty] * (2 * shape.num_layers)
    done, results = 0, []
    for end in range(prompt, ids.shape[1] + 1):
        start = done
        feeds = {
            "input_ids": ids[:, start:end],
            "attention_mask": np.ones((batch, end), np.int64),
            "position_ids": np.broadcast_to(
                np.arange(start, end, dtype=np.int64), (batch, end - start)
            ).copy(),
        }
        feeds |= dict(zip(inputs[3:], past))
        out = session.run(None, feeds)
        results.append(out)
        past = out[1:]
        done = end
    return results


@pytest.mark.parametrize(("arch", "tied"), CASES, ids=[a for a, _ in CASES])
def test_every_layer_fuses_to_gqa_with_the_cache(arch: str, tied: bool) -> None:
    lm, _, _, result = built(arch, tied)
    model = result.model
    layers = decoder_shape(lm.config).num_layers
    ops = collections.Counter(n.op_type for n in model.graph)
    (row,) = [r for r in result.report.passes if r.name == "fuse-ort"]
    assert ops["GroupQueryAttention"] == layers and row.stats.get("gqa-decoder") == layers, (ops, row.stats)
    assert ops["Softmax"] == ops["MultiHeadAttention"] == ops["Concat"] == 0, ops
    _, outputs = io_names(layers)
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    # The op reads past_key_values.i.* and writes present.i.* itself (what genai's buffer sharing needs).
    got = sorted(v.name for n in gqa for v in (n.inputs[3], n.inputs[4]) if v is not None)
    assert got == sorted(v.name for v in model.graph.inputs if v.name.startswith("past_key_values"))
    assert sorted(v.name for n in gqa for v in n.outputs[1:]) == sorted(outputs[1:])
    assert all(v.is_graph_input() for n in gqa for v in (n.inputs[3], n.inputs[4]))  # type: ignore[union-attr]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("arch", "tied"), CASES, ids=[a for a, _ in CASES])
def test_prompt_and_decode_steps_equal_the_unfused_export(arch: str, tied: bool, batch: int) -> None:
    lm, original, optimized, _ = built(arch, tied)
    ids = np.random.default_rng(batch).integers(3, 128, (batch, 9)).astype(np.int64)
    ref = _steps(_session(original), lm, ids, prompt=7)
    got = _steps(_session(optimized), lm, ids, prompt=7)
    assert len(ref) == len(got) == 3  # the prompt (past 0) and two decode steps (past 7, 8)
    for step, (r, g) in enumerate(zip(ref, got)):
        for i, (a, b) in enumerate(zip(r, g)):
            assert a.shape == b.shape, (step, i)
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4, err_msg=f"step {step} output {i}")


def test_chunk_after_a_past_equals_the_unfused_export() -> None:
    """A second prompt chunk (3 tokens after a past of 4): GroupQueryAttention's subsequent prompt.

    Batch 1 only: ONNX Runtime's kernel refuses a chunk after a past for batch > 1 ("batch_size must
    be 1 when sequence_length > 1 and past context is given"): a loud error, never a wrong answer."""
    lm, original, optimized, _ = built("llama", True)
    ids = np.random.default_rng(3).integers(3, 128, (1, 7)).astype(np.int64)

    def run(blob: bytes) -> list[list[np.ndarray]]:
        session = _session(blob)
        first = _steps(session, lm, ids[:, :4], prompt=4)[0]
        shape = decoder_shape(lm.config)
        inputs, _ = io_names(shape.num_layers)
        feeds = {
            "input_ids": ids[:, 4:],
            "attention_mask": np.ones((1, 7), np.int64),
            "position_ids": np.arange(4, 7, dtype=np.int64)[None],
        }
        feeds |= dict(zip(inputs[3:], first[1:]))
        return [first, session.run(None, feeds)]

    for r, g in zip(run(original), run(optimized)):
        for a, b in zip(r, g):
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)

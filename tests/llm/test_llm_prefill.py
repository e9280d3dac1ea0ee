"""``graphopt llm build --prefill int8``: the prompt runs on int8 GEMMs over the int4 model's own
bytes (``prefill.onnx``, onnxruntime-genai's decoder pipeline); the tokens after it on int4."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime_genai")
import onnx  # noqa: E402
from llm_models import as_q4_1, last_logits, tiny_causal_lm, tiny_tokenizer  # noqa: E402

import graphopt.llm as gl  # noqa: E402
from graphopt import GraphoptError  # noqa: E402
from graphopt.llm.prefill import PREFILL_FILE  # noqa: E402

PROMPT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("q4_1", [False, True], ids=["gaussian", "q4_1-offsets"])
def test_prefill_int8_reads_the_int4_bytes_and_matches_the_int4_model(tmp_path, tokenizer, q4_1):
    import torch

    lm = tiny_causal_lm("llama", seed=2, vocab=len(tokenizer))
    if q4_1:  # a GGUF Q4_1-style source: the int4 projections carry block offsets
        with torch.no_grad():
            for module in lm.modules():
                if isinstance(module, torch.nn.Linear) and module.weight.shape[1] % 32 == 0:
                    module.weight.copy_(torch.from_numpy(as_q4_1(module.weight.numpy())))
    opts = {"int8_budget": 0}
    same = gl.build(lm, tmp_path / "same", tokenizer=tokenizer, quantize_options=opts)
    fast = gl.build(lm, tmp_path / "fast", tokenizer=tokenizer, quantize_options=opts, prefill="int8")
    folder = fast.out_dir
    (row,) = [r for r in fast.report["pipeline"]["passes"] if r["name"].startswith("quantize")]
    assert bool(row["details"].get("block_offsets", {}).get("weights", 0)) == q4_1
    assert fast.report["prefill_int8_projections"] == 2 * 4  # per layer: QKV, O, gate/up, down
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["type"] == "decoder-pipeline"
    stages = [next(iter(s.values())) for s in config["model"]["decoder"]["pipeline"]]
    assert [(s["filename"], s["run_on_prompt"], s["run_on_token_gen"]) for s in stages] == [
        (PREFILL_FILE, True, False),
        ("model.onnx", False, True),
    ]
    # No weights of its own: every large initializer is a view of model.onnx.data.
    prefill = onnx.load(str(folder / PREFILL_FILE), load_external_data=False)
    inline = [i for i in prefill.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL]
    assert max(len(i.raw_data) for i in inline) < 1024
    assert {e.value for i in prefill.graph.initializer for e in i.external_data if e.key == "location"} == {
        "model.onnx.data"
    }
    ops = [n.op_type for n in prefill.graph.node]
    assert ops.count("MatMulInteger") == 8 and ops.count("MatMulNBits") == 1  # the LM head stays int4
    # Prompt logits of the int8 graph agree with the int4 graph's (ORT folds the weights at load).
    ids = tokenizer(PROMPT)["input_ids"]
    a, b = last_logits(same.out_dir / "model.onnx", ids), last_logits(folder / PREFILL_FILE, ids)
    assert _cosine(a, b) > 0.995
    out = gl.generate(folder, tokens=ids, max_new_tokens=6)
    assert len(out["tokens"]) == 6


def test_prefill_int8_is_for_int4_on_ort_cpu(tmp_path, tokenizer):
    lm = tiny_causal_lm("llama", vocab=len(tokenizer))
    with pytest.raises(GraphoptError, match="prefill int8 is for int4"):
        gl.build(lm, tmp_path / "o", precision="fp32", tokenizer=tokenizer, prefill="int8")
    assert not (tmp_path / "o").exists()
    with pytest.raises(GraphoptError, match="prefill must be"):
        gl.build(lm, tmp_path / "o", tokenizer=tokenizer, prefill="int2")

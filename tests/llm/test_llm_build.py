"""graphopt llm build / generate: genai folders that generate like transformers; bad input refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime_genai")
import onnx  # noqa: E402
from llm_models import as_q4_1, greedy, last_logits, tiny_causal_lm, tiny_tokenizer  # noqa: E402

import graphopt.llm as gl  # noqa: E402
from graphopt import GraphoptError  # noqa: E402
from graphopt.cli import main  # noqa: E402
from graphopt.llm.package import MARKER  # noqa: E402

PROMPT = "the quick brown"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tied_llama(tokenizer):
    return tiny_causal_lm("llama", tied=True, vocab=len(tokenizer))


@pytest.fixture(scope="module")
def fp32_build(tmp_path_factory, tied_llama, tokenizer):
    out = tmp_path_factory.mktemp("fp32") / "build"
    return gl.build(tied_llama, out, precision="fp32", tokenizer=tokenizer)


def _ops(folder):
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return {n.op_type for n in model.graph.node}


def _last_logits(folder, ids):
    return last_logits(folder / "model.onnx", ids)


def test_fp32_build_generates_token_for_token_like_transformers(fp32_build, tied_llama, tokenizer):
    out = fp32_build.out_dir
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "genai_config.json", "tokenizer.json", MARKER} <= names
    config = json.loads((out / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["num_hidden_layers"] == 2 and decoder["num_key_value_heads"] == 2
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    # The build declares genai's attention_mask convention: every layer is GroupQueryAttention
    # reading and writing the cache, so genai shares the past and present buffers.
    ops = _ops(out)
    assert "GroupQueryAttention" in ops and "MultiHeadAttention" not in ops, ops
    assert config["search"]["past_present_share_buffer"] is True
    report = json.loads((out / MARKER).read_text())
    assert report["pipeline"]["passes"][0]["name"].startswith("cleanup")
    result = gl.generate(out, PROMPT, max_new_tokens=8)
    ids = tokenizer(PROMPT)["input_ids"]
    assert result["prompt_tokens"] == len(ids)
    assert result["tokens"] == greedy(tied_llama, ids, 8)
    assert len(set(result["tokens"])) > 2  # the check means something: the model does not repeat one token


def test_gpt2_build_generates_like_transformers(tmp_path):
    lm = tiny_causal_lm("gpt2")
    result = gl.build(lm, tmp_path / "gpt2", precision="fp32")
    assert "MultiHeadAttention" in _ops(result.out_dir) or "Attention" in _ops(result.out_dir)
    ids = [5, 17, 33, 4, 9, 70]
    assert gl.generate(result.out_dir, tokens=ids, max_new_tokens=10)["tokens"] == greedy(lm, ids, 10)


@pytest.mark.parametrize("arch", ["mistral", "phi3"])
def test_a_sliding_window_model_generates_like_transformers_past_its_window(tmp_path, arch):
    """An 8-token window: the export keeps every past token (genai's buffer) and the window is
    GroupQueryAttention's local_window_size; tokens equal transformers' well past it."""
    lm = tiny_causal_lm(arch)
    lm.config.sliding_window = 8
    result = gl.build(lm, tmp_path / "swa", precision="fp32")
    model = onnx.load(str(result.out_dir / "model.onnx"), load_external_data=False)
    windows = [
        a.i
        for n in model.graph.node
        if n.op_type == "GroupQueryAttention"
        for a in n.attribute
        if a.name == "local_window_size"
    ]
    assert windows == [8, 8]
    ids = [5, 17, 33, 4, 9, 70, 11, 12, 40]
    assert gl.generate(result.out_dir, tokens=ids, max_new_tokens=14)["tokens"] == greedy(lm, ids, 14)


def test_int4_build_is_smaller_and_close(tmp_path, fp32_build, tied_llama, tokenizer):
    result = gl.build(tied_llama, tmp_path / "int4", precision="int4", tokenizer=tokenizer)
    ops = _ops(result.out_dir)
    assert "MatMulNBits" in ops
    size = sum(
        result.report["files"][f] for f in ("model.onnx", "model.onnx.data") if f in result.report["files"]
    )
    ref_size = sum(fp32_build.report["files"][f] for f in ("model.onnx", "model.onnx.data"))
    assert size < 0.75 * ref_size  # tiny: norms, rotary caches and the graph itself stay float
    ids = tokenizer(PROMPT)["input_ids"]
    a, b = _last_logits(fp32_build.out_dir, ids), _last_logits(result.out_dir, ids)
    # Random Gaussian weights (std 0.3) are int4's worst case; real models are measured in bench_llm.py.
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.9
    assert len(gl.generate(result.out_dir, PROMPT, max_new_tokens=4)["tokens"]) == 4
    # Mixed precision: the weights measured most sensitive went to 8 bits, within the budget.
    (row,) = [r for r in result.report["pipeline"]["passes"] if r["name"].startswith("quantize")]
    mixed = row["details"]["mixed_precision"]
    assert mixed["promoted"] > 0 and mixed["spent_bytes"] <= mixed["budget_bytes"]
    model = onnx.load(str(result.out_dir / "model.onnx"), load_external_data=False)
    bits = [
        a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"
    ]
    assert 0 < bits.count(8) < len(bits)


def test_a_q4_1_source_keeps_its_grid_in_int4(tmp_path, tokenizer):
    """Every projection and the LM head of a model dequantized from Q4_1 blocks are quantized
    exactly (block offsets); without them (the option off) int4 moves the logits far more. (The
    embedding table is left float here: at 4 bits it would be the one error left.)"""
    import torch

    lm = tiny_causal_lm("llama", seed=1, vocab=len(tokenizer))
    with torch.no_grad():
        for module in lm.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.from_numpy(as_q4_1(module.weight.numpy())))
    ids = tokenizer(PROMPT)["input_ids"]
    fp32 = gl.build(lm, tmp_path / "fp32", precision="fp32", tokenizer=tokenizer)
    ref = _last_logits(fp32.out_dir, ids)
    errors = {}
    for mode in ("on-grid", "off"):
        opts = {"block_offsets": mode, "int8_budget": 0, "accuracy_level": 1, "quantize_embeddings": False}
        result = gl.build(lm, tmp_path / mode, precision="int4", tokenizer=tokenizer, quantize_options=opts)
        (row,) = [r for r in result.report["pipeline"]["passes"] if r["name"].startswith("quantize")]
        got = row["details"].get("block_offsets", {}).get("weights", 0)
        # Q/K/V (packed by the attention fusion), O, gate, up, down per layer, and the LM head.
        assert len(row["details"]["weights"]) == 11 and got == (11 if mode == "on-grid" else 0)
        errors[mode] = float(np.abs(_last_logits(result.out_dir, ids) - ref).max() / np.abs(ref).max())
    # What is left is the offsets' own 4-bit rounding (large here: random weights of std 0.3).
    assert errors["on-grid"] < 0.05 and errors["on-grid"] < 0.1 * errors["off"]
    assert gl.generate(tmp_path / "on-grid", tokens=ids, max_new_tokens=6)["tokens"] == greedy(lm, ids, 6)


def test_a_method_that_needs_data_without_calibration_text_is_refused(tmp_path, tied_llama, tokenizer):
    with pytest.raises(GraphoptError, match="needs calibration text"):
        gl.build(tied_llama, tmp_path / "o", tokenizer=tokenizer, quantize_options={"method": "gptq"})
    assert not (tmp_path / "o").exists()


def test_rebuild_replaces_an_earlier_build_and_a_foreign_folder_is_refused(tmp_path, tied_llama, tokenizer):
    out = tmp_path / "b"
    gl.build(tied_llama, out, precision="fp32", tokenizer=tokenizer)
    (out / "model.onnx").write_bytes(b"stale")
    gl.build(tied_llama, out, precision="fp32", tokenizer=tokenizer)
    assert onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(GraphoptError, match="not a graphopt llm build"):
        gl.build(tied_llama, foreign, precision="fp32")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_prompt_longer_than_the_context_is_refused(fp32_build):
    with pytest.raises(GraphoptError, match="context of 128"):
        gl.generate(fp32_build.out_dir, tokens=[5] * 120, max_new_tokens=16)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "has no config.json"),
        (lambda d: (d / "config.json").write_text('{"model_type": "llama"}'), "has no weights"),
        (lambda d: (d / "config.json").write_text('{"model_type": "bert"}'), "'bert' is not supported"),
    ],
)
def test_bad_source_folders_are_refused_and_nothing_is_written(tmp_path, make, message):
    src = tmp_path / "src"
    src.mkdir()
    make(src)
    out = tmp_path / "out"
    with pytest.raises(GraphoptError, match=message):
        gl.build(src, out)
    assert not out.exists()


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(GraphoptError, match="not a readable GGUF file"):
        gl.build(bad, tmp_path / "out")


def test_an_unsupported_model_object_is_refused(tmp_path):
    import transformers as tf

    bert = tf.BertForMaskedLM(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(GraphoptError, match="supported: gpt2, llama, mistral, phi3, qwen2"):
        gl.build(bert, tmp_path / "out")


def test_cli_build_and_generate(tmp_path, tied_llama, tokenizer, capsys):
    src = tmp_path / "hf"
    tied_llama.save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    assert (
        main(
            [
                "llm",
                "build",
                str(src),
                "-o",
                str(out),
                "--precision",
                "fp32",
                "--report",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "r.json").read_text())["architecture"] == "llama"
    capsys.readouterr()
    assert main(["llm", "generate", str(out), "--prompt", PROMPT, "--max-new-tokens", "5", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tokens"] == greedy(tied_llama, tokenizer(PROMPT)["input_ids"], 5)
    assert main(["llm", "build", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    assert main(["llm", "build", str(src), "-o", str(tmp_path / "o3"), "--precision", "fp16"]) == 2


def test_calibration_text_makes_int4_data_aware(tmp_path, tied_llama, tokenizer):
    from llm_models import TEXT

    text = tmp_path / "calib.txt"
    text.write_text((TEXT + "\n") * 20)
    result = gl.build(tied_llama, tmp_path / "out", precision="int4", tokenizer=tokenizer, calibration=text)
    (row,) = [r for r in result.report["pipeline"]["passes"] if r["name"].startswith("quantize")]
    assert row["details"]["method"] == "gptq"
    assert row["details"]["calibration_tokens"] > 500
    with pytest.raises(GraphoptError, match="does not exist"):
        gl.build(
            tied_llama,
            tmp_path / "o2",
            precision="int4",
            tokenizer=tokenizer,
            calibration=tmp_path / "no.txt",
        )
    assert not (tmp_path / "o2").exists()


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, tokenizer):
    small = tiny_causal_lm("llama", vocab=64)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    with pytest.raises(GraphoptError, match="do not belong together"):
        gl.build(small, tmp_path / "out", precision="int4", tokenizer=tokenizer, calibration=text)
    assert not (tmp_path / "out").exists()

"""Decoder fusions on every layer of real decoder exports (``fuse-ort`` in the ort-cpu pipeline).

Tiny random configs (2 layers) of Llama, a SmolLM2-shaped Llama (9 query / 3 KV heads, head 64,
tied embeddings, ForCausalLM), Qwen2 (QKV bias), Mistral, Phi-3 (packed qkv_proj and
gate_up_proj) and GPT-2, exported with ``torch.onnx.export(dynamo=True)`` four ways: static shapes
(the exporter's default) or dynamic batch/sequence, each with input_ids only or input_ids +
attention_mask. Each case: one fused attention per layer (GroupQueryAttention with the rotary
inside and a packed QKV projection; MultiHeadAttention for GPT-2), no Softmax left, and ONNX
Runtime outputs equal to the export's for batch 2, with right padding where the mask input is
declared to follow GroupQueryAttention's convention (``fuse-ort(padding_mask=[attention_mask])``).
The negative cases keep attention unfused where the mask is not provably GroupQueryAttention's.
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest
from corpus import run

import graphopt

pytest.importorskip("transformers")

ATOL = 1e-4
LAYERS = 2
VOCAB = 100
SEQ = 16  # the static exports' sequence length
PAD = "fuse-ort(padding_mask=[attention_mask])"

_LLAMA_LIKE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)
#: name → (config class, model class, config overrides) by transformers class name.
ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaModel", {}),
    # SmolLM2-135M's attention shape: 9 query heads, 3 KV heads, head_dim 64; tied LM head.
    "smollm2": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            hidden_size=72,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralModel", dict(sliding_window=None)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
}
MODES = ("static", "static+mask", "dynamic", "dynamic+mask")
#: The default tier: every architecture static (ids only) and dynamic with a mask, input_ids only for
#: Llama dynamic with input_ids only; the rest are slow.
FAST = {(a, "static") for a in ARCHS} | {(a, "dynamic+mask") for a in ARCHS} | {("llama", "dynamic")}


def _module(arch: str, **overrides: Any) -> Any:
    import torch
    import transformers

    config_cls, model_cls, extra = ARCHS[arch]
    if arch == "gpt2":
        kw: dict[str, Any] = dict(n_embd=64, n_layer=LAYERS, n_head=4, n_positions=64, vocab_size=VOCAB)
        kw.update(bos_token_id=0, eos_token_id=0)
    else:
        kw = {**_LLAMA_LIKE, **extra}
    config = getattr(transformers, config_cls)(**{**kw, **overrides})
    torch.manual_seed(0)
    module = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # trained models have non-trivial biases and norm scales
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.02)
    return module


def _export(module: Any, mode: str) -> bytes:
    import torch

    ids = torch.randint(0, VOCAB, (2, SEQ))
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    dynamic = None
    if "mask" in mode:
        kwargs["attention_mask"] = torch.ones_like(ids)
    if mode.startswith("dynamic"):
        batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("sequence", max=64)
        dynamic = {k: {0: batch, 1: seq} for k in kwargs if k != "use_cache"}
        dynamic["use_cache"] = None
    return graphopt.to_bytes(graphopt.export(module, (), kwargs=kwargs, dynamic_shapes=dynamic))


@functools.cache
def exported(arch: str, mode: str) -> bytes:
    return _export(_module(arch), mode)


def pipeline(padding: bool) -> str:
    """The ort-cpu default pipeline, with the padding convention declared when asked."""
    text = str(graphopt.default_registry().backend("ort-cpu").default_pipeline())
    assert text.count("fuse-ort") == 1, text
    return text.replace("fuse-ort", PAD) if padding else text


def feeds(mode: str, padded: bool, seed: int = 0) -> dict[str, np.ndarray]:
    seq = SEQ if mode.startswith("static") else 11
    rng = np.random.default_rng(seed)
    out = {"input_ids": rng.integers(0, VOCAB, (2, seq), dtype=np.int64)}
    if "mask" in mode:
        mask = np.ones((2, seq), dtype=np.int64)
        if padded:
            mask[1, seq - 4 :] = 0  # right padding on the second row
        out["attention_mask"] = mask
    return out


def counts(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph))


def assert_outputs_equal(original: bytes, optimized: ir.Model, mode: str) -> None:
    """Batch 2 without padding: every output equal. With right padding: the rows of valid tokens."""
    for padded in (False, True) if "mask" in mode else (False,):
        f = feeds(mode, padded)
        ref, got = run(original, f), run(graphopt.to_bytes(optimized), f)
        valid = f["attention_mask"].astype(bool) if padded else None
        for r, g in zip(ref, got):
            assert r.shape == g.shape
            if valid is not None:
                r, g = r[valid], g[valid]
            np.testing.assert_allclose(g, r, rtol=1e-3, atol=ATOL, err_msg=f"{mode} padded={padded}")


def _cases() -> list[Any]:
    return [
        pytest.param(a, m, marks=() if (a, m) in FAST else pytest.mark.slow, id=f"{a}-{m}")
        for a in ARCHS
        for m in MODES
    ]


@pytest.mark.parametrize(("arch", "mode"), _cases())
def test_every_layer_fuses_and_outputs_stay_equal(arch: str, mode: str) -> None:
    original = exported(arch, mode)
    result = graphopt.optimize(graphopt.load(original), "ort-cpu", pipeline=pipeline("mask" in mode))
    ops = counts(result.model)
    (row,) = [r for r in result.report.passes if r.name == "fuse-ort"]
    stats = row.stats
    assert ops["Softmax"] == 0, ops
    if arch == "gpt2":
        assert ops["MultiHeadAttention"] == LAYERS, ops
        assert ops["FastGelu"] == LAYERS and stats.get("skip-layer-norm") == 2 * LAYERS, (ops, stats)
    else:
        assert ops["GroupQueryAttention"] == LAYERS, (ops, stats)
        assert stats.get("gqa-decoder") == LAYERS and stats.get("gqa-packed-projection") == LAYERS, stats
        assert stats.get("skip-rms-norm") == 2 * LAYERS and ops["QuickGelu"] == LAYERS, (ops, stats)
        # The rotary moved inside GroupQueryAttention; nothing of it is left outside.
        assert ops["RotaryEmbedding"] == ops["Cos"] == ops["Sin"] == ops["Neg"] == 0, ops
        gqa = [n for n in result.model.graph if n.op_type == "GroupQueryAttention"]
        assert all(n.attributes.get_int("do_rotary") == 1 for n in gqa)
        assert all(n.inputs[1] is None and n.inputs[2] is None for n in gqa)  # packed QKV
        assert all(n.metadata_props.get("graphopt.rule") == "fuse-ort/gqa-decoder" for n in gqa)
    assert_outputs_equal(original, result.model, mode)


def test_smollm2_shape_fuses_heads_and_tied_head() -> None:
    """9 query / 3 KV heads of size 64, one packed [72, (9 + 2·3)·64] projection per layer."""
    result = graphopt.optimize(graphopt.load(exported("smollm2", "static")), "ort-cpu")
    gqa = [n for n in result.model.graph if n.op_type == "GroupQueryAttention"]
    assert [(n.attributes.get_int("num_heads"), n.attributes.get_int("kv_num_heads")) for n in gqa] == [
        (9, 3)
    ] * 2
    packed = gqa[0].inputs[0].producer()
    assert packed is not None and packed.op_type == "MatMul"
    assert packed.inputs[1].const_value.shape == (72, 15 * 64)  # type: ignore[union-attr]


def test_padding_mask_input_is_left_alone_unless_declared() -> None:
    """A mask that reads attention_mask is GroupQueryAttention's only under the declared convention."""
    original = exported("llama", "dynamic+mask")
    result = graphopt.optimize(graphopt.load(original), "ort-cpu")
    ops = counts(result.model)
    assert ops["GroupQueryAttention"] == 0, ops
    assert_outputs_equal(original, result.model, "dynamic+mask")
    # Declaring another input changes nothing.
    other = graphopt.optimize(
        graphopt.load(original), "ort-cpu", pipeline="cleanup,fuse-ort(padding_mask=[ids])"
    )
    assert counts(other.model)["GroupQueryAttention"] == 0


@pytest.mark.parametrize(("window", "mode"), [(8, "static"), (8, "dynamic"), (4096, "dynamic")])
def test_sliding_window_is_not_taken_for_causal(window: int, mode: str) -> None:
    """Mistral's sliding window is not the causal mask. A static export (one folded mask, 16 tokens)
    stays unfused; a dynamic one is evaluated at sizes past the window (a 4099-token prompt for
    4096) and fuses with GroupQueryAttention's ``local_window_size`` = the window. Outputs stay
    equal (11 tokens: past a window of 8)."""
    original = _export(_module("mistral", sliding_window=window), mode)
    result = graphopt.optimize(graphopt.load(original), "ort-cpu", pipeline="cleanup,fuse-ort,cleanup")
    gqa = [n for n in result.model.graph if n.op_type == "GroupQueryAttention"]
    if mode == "static":
        assert not gqa
    else:
        assert [n.attributes.get_int("local_window_size", -1) for n in gqa] == [window] * LAYERS
    assert_outputs_equal(original, result.model, mode)


def test_mask_prover_rejects_a_non_causal_constant_mask() -> None:
    from graphopt.passes.fusion.ort_decoder_masks import prove_causal_mask

    def prove(mask: np.ndarray) -> Any:
        model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 18}), ir_version=10)
        value = ir.Value(name="m", shape=ir.Shape(mask.shape), type=ir.TensorType(ir.DataType.FLOAT))
        value.const_value = ir.tensor(mask)
        query = ir.Value(name="q", shape=ir.Shape([1, 4, 8]), type=ir.TensorType(ir.DataType.FLOAT))
        return prove_causal_mask(model).prove(value, True, query)

    causal = np.triu(np.full((4, 4), np.finfo(np.float32).min, dtype=np.float32), 1)[None, None]
    assert prove(causal).padding is None
    assert "not the causal mask" in prove(np.zeros((1, 1, 4, 4), np.float32))  # bidirectional
    soft = causal.copy()
    soft[soft != 0] = -100.0  # not blocking: a bias, not a mask
    assert "neither 0 nor blocking" in prove(soft)


def test_head_size_the_kernel_refuses_is_left_alone() -> None:
    """GroupQueryAttention's kernel fails at run time for a head size that is not a multiple of 8
    ("head_size must be a multiple of 8"): such attention stays unfused (and runs)."""
    original = _export(_module("llama", hidden_size=16), "dynamic")  # 4 heads of 4
    result = graphopt.optimize(graphopt.load(original), "ort-cpu")
    assert counts(result.model)["GroupQueryAttention"] == 0
    assert_outputs_equal(original, result.model, "dynamic")

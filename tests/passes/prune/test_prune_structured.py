"""prune, structured: FFN neurons, attention heads and Conv channels removed from real exports,
checked against PyTorch with the same units masked (see prune_helpers), and groups left alone.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from prune_helpers import _check, _export_clean, _inits, _mask_torch, _prune, _torch_out, built

from graphopt.verify import run_model

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bert():
    return built("bert")


@pytest.fixture(scope="module")
def llama():
    return built("llama")


@pytest.fixture(scope="module")
def digits_cnn():
    return built("digits_cnn")


def test_structured_bert_ffn_and_heads_match_torch_with_the_same_units_removed(bert):
    import copy

    ex, model = bert
    pruned, p = _prune(model, mode="structured", sparsity=0.5)
    kinds = {}
    for g in p.details["groups"]:
        kinds.setdefault(g["kind"], []).append(g)
    assert len(kinds["heads"]) == 2 and all(g["kept"] == 2 and g["units"] == 4 for g in kinds["heads"])
    assert len(kinds["ffn"]) == 2 and all(g["kept"] == 64 for g in kinds["ffn"])
    # the hidden size is not prunable (LayerNorm, residuals, graph output): recorded reasons
    assert any("LayerNormalization" in s["reason"] for s in p.details["skipped"])
    shapes = {
        tuple(v.const_value.shape) for v in pruned.graph.initializers.values() if v.const_value is not None
    }
    assert (64, 64) in shapes and (64, 32) in shapes and (32, 64) in shapes  # FFN [64,64]+[64,64]; heads
    _check(pruned)
    module = copy.deepcopy(ex.module)
    assert _mask_torch(module, model, p.details) == 4
    for seq in (7, 12):
        feeds = ex.feeds(2, seq, seed=seq)
        ref = _torch_out(module, feeds, ["input_ids", "attention_mask"])
        got = run_model(pruned, feeds)[0][1]
        np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-3)
    # and the pruning is not a no-op: the unmasked model differs
    dense = _torch_out(ex.module, ex.feeds(2, 12, seed=12), ["input_ids", "attention_mask"])
    assert np.abs(dense - ref).max() > 1e-3
    assert p.stats["removed_units:heads"] == 4 and p.stats["removed_units:ffn"] == 128


def test_structured_llama_gated_mlp_matches_torch_and_gqa_heads_are_left_alone(llama):
    import copy

    ex, model = llama
    pruned, p = _prune(model, mode="structured", sparsity=0.25)
    ffn = [g for g in p.details["groups"] if g["kind"] == "ffn"]
    assert len(ffn) == 2
    for g in ffn:
        roles = sorted(s["role"] for s in g["slices"])
        assert roles == ["in", "out", "out"]  # gate and up columns, down rows
        assert g["kept"] == 96
    assert not [g for g in p.details["groups"] if g["kind"] == "heads"]
    assert any(s["kind"] == "heads" for s in p.details["skipped"])
    _check(pruned)
    module = copy.deepcopy(ex.module)
    _mask_torch(module, model, p.details)
    feeds = ex.feeds(2, 10)
    ref = _torch_out(module, feeds, ["input_ids", "attention_mask"])
    np.testing.assert_allclose(run_model(pruned, feeds)[0][1], ref, atol=2e-4, rtol=1e-3)


def test_structured_cnn_channels_through_batchnorm_residual_pool_and_flatten_match_torch(digits_cnn):
    import copy

    d, model = digits_cnn
    pruned, p = _prune(model, mode="structured", sparsity=0.5, targets=["channels"])
    groups = p.details["groups"]
    assert len(groups) == 2
    residual = next(g for g in groups if "," in g["group"])  # conv1 and conv2 joined by the residual Add
    assert residual["units"] == 32 and residual["kept"] == 16
    flat = next(g for g in groups if "," not in g["group"])
    assert any(s["role"] == "in" and s["block"] == 16 for s in flat["slices"])  # Reshape → Gemm rows
    assert any(s["reason"] == "ffn not in targets" for s in p.details["skipped"])
    shapes = {
        n: tuple(v.const_value.shape)
        for n, v in pruned.graph.initializers.items()
        if v.const_value is not None
    }
    assert sorted(shapes.values(), key=str).count((16, 1, 3, 3)) == 1
    assert (128, 512) in shapes.values()
    _check(pruned)
    module = copy.deepcopy(d.module)
    _mask_torch(module, model, p.details)
    x = d.x_test[:64]
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_model(pruned, {"x": x})[0][1], ref, atol=1e-4, rtol=1e-3)
    assert p.details["removed_fraction"] == pytest.approx(0.5)


def test_structured_global_scope_and_round_to(bert):
    _, model = bert
    _, p = _prune(model, mode="structured", sparsity=0.3, scope="global", targets=["ffn"])
    kept = [g["kept"] for g in p.details["groups"]]
    assert sum(g["units"] - g["kept"] for g in p.details["groups"]) == int(0.3 * 256)
    _, p = _prune(model, mode="structured", sparsity=0.3, targets=["ffn"], round_to=16)
    kept = [g["kept"] for g in p.details["groups"]]
    assert all(k % 16 == 0 for k in kept) and kept == [96, 96]


def _graph(nodes, inits, outputs=("y",)):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    g = helper.make_graph(nodes, "g", [x], outs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_structured_unknown_consumer_leaves_the_group_alone_with_a_reason():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 4)).astype(np.float32)
    w3 = rng.standard_normal((32, 4)).astype(np.float32)
    # h feeds a Concat along the units (not understood) and a MatMul
    model = _graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
            helper.make_node("Concat", ["r", "r"], ["c"], axis=-1),
            helper.make_node("MatMul", ["c", "w3"], ["z"]),
        ],
        {"w1": w1, "w2": w2, "w3": w3},
        outputs=("y", "z"),
    )
    pruned, p = _prune(model, mode="structured", sparsity=0.5)
    assert p.details["groups"] == []
    reasons = [s["reason"] for s in p.details["skipped"]]
    assert any("Concat" in r for r in reasons)
    assert not p.stats.get("pruned:ffn")
    np.testing.assert_array_equal(_inits(pruned)["w1"], w1)


def test_structured_simple_mlp_matches_numpy():
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    b1 = rng.standard_normal(16).astype(np.float32)
    w2 = rng.standard_normal((16, 4)).astype(np.float32)
    model = _graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["hb"]),
            helper.make_node("Gelu", ["hb"], ["g"], domain=""),
            helper.make_node("MatMul", ["g", "w2"], ["y"]),
        ],
        {"w1": w1, "b1": b1, "w2": w2},
    )
    model.opset_imports[""] = 20
    pruned, p = _prune(model, mode="structured", sparsity=0.25)
    removed = p.details["groups"][0]["removed"]
    assert len(removed) == 4
    keep = np.setdiff1d(np.arange(16), removed)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    h = x @ w1[:, keep] + b1[keep]
    import math

    g = h * 0.5 * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    np.testing.assert_allclose(run_model(pruned, {"x": x})[0][1], g @ w2[keep], atol=1e-4, rtol=1e-4)
    # L1 importance: the removed units have the smallest normalized |w1 col| + |w2 row| scores
    s = np.abs(w1).sum(0) / np.abs(w1).sum(0).mean() + np.abs(w2).sum(1) / np.abs(w2).sum(1).mean()
    assert set(removed) == set(np.argsort(s)[:4].tolist())


@pytest.mark.parametrize(
    "kind,expect",
    [
        (
            "gpt2",
            {"ffn": 2, "heads": 2},
        ),  # Conv1D FFN through [B*S, C] ⇄ [B, S, C] reshapes; fused QKV + Split heads
        pytest.param("vit", {"ffn": 2, "heads": 2}, marks=pytest.mark.slow),  # literal head counts rewritten
        pytest.param("resnet", {"channels": 11}, marks=pytest.mark.slow),  # bottlenecks, shortcut convs
    ],
)
def test_structured_other_models_match_torch(kind, expect):
    import copy

    from models import build

    ex = build(kind, "tiny")
    model = _export_clean(ex)
    pruned, p = _prune(model, mode="structured", sparsity=0.3)
    got_kinds: dict[str, int] = {}
    for g in p.details["groups"]:
        got_kinds[g["kind"]] = got_kinds.get(g["kind"], 0) + 1
    assert got_kinds == expect
    _check(pruned)
    module = copy.deepcopy(ex.module)
    _mask_torch(module, model, p.details)
    feeds = ex.feeds(2) if kind in ("vit", "resnet") else ex.feeds(2, 11)
    names = list(feeds)
    ref = _torch_out(module, feeds, names)
    np.testing.assert_allclose(run_model(pruned, feeds)[0][1], ref, atol=2e-4, rtol=1e-3)

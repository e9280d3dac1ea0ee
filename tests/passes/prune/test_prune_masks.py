"""prune, unstructured and N:M: which weights are zeroed, what is left alone, and the N:M layout
(checked against PyTorch with the same zeros).
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from prune_helpers import _check, _inits, _prune, _torch_out, _torch_param, built

from graphopt.passes.prune import satisfies_nm, sparsity_of
from graphopt.verify import run_model

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bert():
    return built("bert")


@pytest.fixture(scope="module")
def digits_cnn():
    return built("digits_cnn")


def test_unstructured_layer_prunes_each_weight_by_magnitude_and_skips_embeddings_norms_biases(bert):
    _, model = bert
    before = _inits(model)
    pruned, p = _prune(model, sparsity=0.5)
    after = _inits(pruned)
    layers = {e["weight"]: e for e in p.details["layers"]}
    json.dumps(p.details)  # JSON-safe for the report
    assert p.stats["pruned_weights"] >= 12
    for name, e in layers.items():
        if not e["pruned"]:
            continue
        a, b = before[name], after[name]
        assert abs(sparsity_of(b) - 0.5) < 0.01, name
        zeroed = (b == 0) & (a != 0)
        # the zeroed weights are the smallest ones, the kept ones unchanged
        assert np.abs(a[zeroed]).max() <= np.abs(a[b != 0]).min()
        np.testing.assert_array_equal(a[b != 0], b[b != 0])
    for name, a in before.items():
        if "embeddings" in name or "LayerNorm" in name or name.endswith(".bias"):
            np.testing.assert_array_equal(a, after[name], err_msg=name)
    _check(pruned)
    from models import build_bert

    feeds = build_bert("tiny").feeds(2, 12)
    out = run_model(pruned, feeds)
    assert np.isfinite(out[0][1]).all()


def test_unstructured_global_threshold_is_shared_and_exclude_is_honoured(bert):
    _, model = bert
    pruned, p = _prune(model, sparsity=0.6, scope="global", exclude=["node_MatMul_55"])
    layers = [e for e in p.details["layers"] if e["pruned"]]
    assert abs(p.details["pruned_sparsity"] - 0.6) < 0.001
    spars = [e["sparsity"] for e in layers]
    assert max(spars) - min(spars) > 0.01  # one threshold, layers differ
    skipped = {e["nodes"][0]: e["reason"] for e in p.details["layers"] if not e["pruned"]}
    assert skipped.get("node_MatMul_55") == "excluded"


def test_min_size_skips_small_tensors():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    pruned, p = _prune(model, sparsity=0.5)
    assert p.details["layers"][0]["pruned"] is False and "min_size" in p.details["layers"][0]["reason"]
    pruned, p = _prune(model, sparsity=0.5, min_size=0)
    assert sparsity_of(_inits(pruned)["w"]) == 0.5


# --- N:M ------------------------------------------------------------------------------------------


def _apply_onnx_zeros_to_torch(module, original: ir.Model, pruned: ir.Model) -> int:
    """Copy the pruned weights' zeros into the matching torch parameters (same layout mapping)."""
    before, after = _inits(original), _inits(pruned)
    n = 0
    with torch.no_grad():
        for name, a in before.items():
            b = after.get(name)
            if b is None or b.shape != a.shape or np.array_equal(a, b):
                continue
            p, transposed = _torch_param(module, a)
            mask = torch.from_numpy((b == 0).T if transposed else (b == 0))
            p[mask] = 0
            n += 1
    return n


@pytest.mark.parametrize("mode,n,m", [("2:4", 2, 4), ("1:4", 1, 4)])
def test_nm_every_pruned_weight_satisfies_nm_and_matches_torch_with_the_same_zeros(bert, mode, n, m):
    ex, model = bert
    pruned, p = _prune(model, mode=mode)
    after = _inits(pruned)
    done = [e for e in p.details["layers"] if e["pruned"]]
    assert len(done) >= 12
    for e in done:
        w = after[e["weight"]]
        axis = e["nm_axis"]
        assert satisfies_nm(w, n, m, axis), e["weight"]
        assert abs(sparsity_of(w) - (1 - n / m)) < 0.02
        if e["op_type"] == "MatMul":
            assert axis == 0  # W[K, N]: groups along K
        assert e["already_nm"] is False
    # the N:M result is not N:M along the other axis (the layout is really along K)
    w0 = after[done[0]["weight"]]
    assert not satisfies_nm(w0, n, m, 1 - done[0]["nm_axis"])
    import copy

    module = copy.deepcopy(ex.module)
    assert _apply_onnx_zeros_to_torch(module, model, pruned) == len(done)
    feeds = ex.feeds(2, 12)
    ref = _torch_out(module, feeds, ["input_ids", "attention_mask"])
    got = run_model(pruned, feeds)[0][1]
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-3)
    _check(pruned)


def test_nm_conv_groups_run_along_input_channels(digits_cnn):
    d, model = digits_cnn
    pruned, p = _prune(model, mode="2:4", min_size=0)
    after = _inits(pruned)
    conv = [e for e in p.details["layers"] if e["op_type"] == "Conv"]
    assert [e["pruned"] for e in conv] == [False, True, True]  # conv1 has 1 input channel
    assert "multiple of 4" in conv[0]["reason"]
    for e in conv[1:]:
        assert satisfies_nm(after[e["weight"]], 2, 4, 1)
    gemm = [e for e in p.details["layers"] if e["op_type"] == "Gemm"]
    for e in gemm:
        assert e["nm_axis"] == 1  # transB=1: W[N, K]
        assert satisfies_nm(after[e["weight"]], 2, 4, 1)
    import copy

    module = copy.deepcopy(d.module)
    _apply_onnx_zeros_to_torch(module, model, pruned)
    x = d.x_test[:32]
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_model(pruned, {"x": x})[0][1], ref, atol=1e-4, rtol=1e-3)


def test_already_nm_weights_are_reported():
    w = np.zeros((8, 4), np.float32)
    w[::2] = 1.0  # 2 of every 4 along K are zero
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [numpy_helper.from_array(w, "w")]
    )
    model = ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    pruned, p = _prune(model, mode="2:4", min_size=0)
    assert p.details["layers"][0]["already_nm"] is True
    assert satisfies_nm(w, 2, 4, 0) and not satisfies_nm(np.ones((8, 4)), 2, 4, 0)

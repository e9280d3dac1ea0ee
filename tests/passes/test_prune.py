"""prune: unstructured, N:M and structured pruning on exported models, checked against PyTorch.

Structured pruning is checked export-free: the same units are masked to zero in the torch module
(the consumers' input slices, which makes the removed units contribute nothing, exactly as
removing them does) and the torch output must equal ONNX Runtime's on the pruned graph.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import PipelineError
from graphopt.passes.prune import PrunePass, satisfies_nm, save_sparse, sparsity_of, to_sparse_proto
from graphopt.pipeline import Pipeline
from graphopt.verify import run_model

torch = pytest.importorskip("torch")


# --- helpers -------------------------------------------------------------------------------------


def _export_clean(exportable_or_model):
    m = exportable_or_model.export()
    m, _ = Pipeline.parse("cleanup").run(m)
    return m


def _prune(model: ir.Model, context: dict | None = None, **options):
    p = PrunePass(**options)
    p.context = dict(context or {})
    work = model.clone()
    result = p(work)
    return result.model, p


def _inits(model: ir.Model) -> dict[str, np.ndarray]:
    return {n: v.const_value.numpy() for n, v in model.graph.initializers.items() if v.const_value is not None}


def _check(model: ir.Model) -> None:
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def _torch_param(module, array: np.ndarray):
    """(parameter, transposed) whose value is ``array`` (a Linear weight appears transposed in MatMul)."""
    for _, p in module.named_parameters():
        t = p.detach().numpy()
        if t.shape == array.shape and np.array_equal(t, array):
            return p, False
        if t.ndim == 2 and t.T.shape == array.shape and np.array_equal(t.T, array):
            return p, True
    raise AssertionError(f"no torch parameter matches an ONNX weight of shape {array.shape}")


def _mask_torch(module, original: ir.Model, details: dict) -> int:
    """Zero, in ``module``, the consumer input slices of every removed unit; returns how many slices."""
    inits = _inits(original)
    n = 0
    with torch.no_grad():
        for g in details["groups"]:
            removed = np.asarray(g["removed"], dtype=np.int64)
            if removed.size == 0:
                continue
            for s in g["slices"]:
                if s["role"] != "in":
                    continue
                p, transposed = _torch_param(module, inits[s["weight"]])
                axis = s["axis"] if not transposed else 1 - s["axis"]
                idx = (removed[:, None] * s["block"] + np.arange(s["block"])[None, :]).ravel()
                index = [slice(None)] * p.ndim
                index[axis] = torch.from_numpy(idx)
                p[tuple(index)] = 0
                n += 1
    return n


def _torch_out(module, feeds: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    with torch.no_grad():
        kwargs = {k: torch.from_numpy(v) for k, v in feeds.items() if k in names}
        out = module(**kwargs)
    if hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    return out.numpy()


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert():
    from models import build_bert

    ex = build_bert("tiny")
    return ex, _export_clean(ex)


@pytest.fixture(scope="module")
def llama():
    from models import build_llama

    ex = build_llama("tiny")
    return ex, _export_clean(ex)


@pytest.fixture(scope="module")
def digits_cnn():
    from digits import train_digits_cnn

    d = train_digits_cnn(epochs=2)
    m, _ = Pipeline.parse("cleanup").run(d.export())
    return d, m


# --- unstructured --------------------------------------------------------------------------------


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
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                          [numpy_helper.from_array(w, "w")])
    model = ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    pruned, p = _prune(model, mode="2:4", min_size=0)
    assert p.details["layers"][0]["already_nm"] is True
    assert satisfies_nm(w, 2, 4, 0) and not satisfies_nm(np.ones((8, 4)), 2, 4, 0)


# --- structured -----------------------------------------------------------------------------------


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
    shapes = {tuple(v.const_value.shape) for v in pruned.graph.initializers.values() if v.const_value is not None}
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
    shapes = {n: tuple(v.const_value.shape) for n, v in pruned.graph.initializers.items() if v.const_value is not None}
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


def test_structured_activation_importance_uses_calibration_and_differs_from_l1(digits_cnn):
    d, model = digits_cnn
    _, pl1 = _prune(model, mode="structured", sparsity=0.5)
    pruned, pact = _prune(model, {"calibration": d.calibration(64)}, mode="structured", sparsity=0.5,
                          importance="activation")
    r1 = [g["removed"] for g in pl1.details["groups"]]
    ra = [g["removed"] for g in pact.details["groups"]]
    assert len(r1) == len(ra) == 3 and r1 != ra
    _check(pruned)
    light, _ = _prune(model, {"calibration": d.calibration(64)}, mode="structured", sparsity=0.25,
                      importance="activation")
    acc = (run_model(light, {"x": d.x_test})[0][1].argmax(-1) == d.y_test).mean()
    assert acc > 0.5  # still a classifier (no fine-tuning)
    with pytest.raises(PipelineError, match="calibration"):
        _prune(model, mode="structured", importance="activation")


def test_unstructured_activation_importance_is_wanda_per_output(bert):
    ex, model = bert
    calib = [ex.feeds(2, 12, seed=s) for s in range(3)]
    pruned, p = _prune(model, {"calibration": calib}, sparsity=0.5, importance="activation")
    before, after = _inits(model), _inits(pruned)
    from graphopt.calibration import CalibrationData, stream_tensors

    e = next(e for e in p.details["layers"] if e["pruned"] and e["op_type"] == "MatMul")
    node = next(n for n in model.graph if n.name == e["nodes"][0])
    x_name = node.inputs[0].name
    sq = 0
    for batch in stream_tensors(model, [x_name], CalibrationData.from_any(calib)):
        a = batch[x_name].reshape(-1, batch[x_name].shape[-1]).astype(np.float64)
        sq = sq + (a * a).sum(0)
    w, got = before[e["weight"]], after[e["weight"]]
    score = np.abs(w) * np.sqrt(sq)[:, None]
    k = w.shape[0] // 2
    for col in range(w.shape[1]):  # per output column: exactly half zeroed, the lowest scores
        zero = got[:, col] == 0
        assert zero.sum() == k
        assert score[zero, col].max() <= score[~zero, col].min()
    mag, _ = _prune(model, sparsity=0.5)
    assert not np.array_equal(_inits(mag)[e["weight"]] == 0, got == 0)  # not plain magnitude
    with pytest.raises(PipelineError, match="calibration"):
        _prune(model, sparsity=0.5, importance="activation")


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
    model = _graph([
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
        helper.make_node("Concat", ["r", "r"], ["c"], axis=-1),
        helper.make_node("MatMul", ["c", "w3"], ["z"]),
    ], {"w1": w1, "w2": w2, "w3": w3}, outputs=("y", "z"))
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
    model = _graph([
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Gelu", ["hb"], ["g"], domain=""),
        helper.make_node("MatMul", ["g", "w2"], ["y"]),
    ], {"w1": w1, "b1": b1, "w2": w2})
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


# --- storage, composition, options -----------------------------------------------------------------


def test_sparse_storage_shrinks_the_file_and_loads_in_onnxruntime(tmp_path, bert):
    ex, model = bert
    pruned, _ = _prune(model, sparsity=0.9, sparse_storage=True)
    assert pruned.metadata_props.get("graphopt.sparse_storage") == "1"
    dense_path, sparse_path, auto_path = tmp_path / "dense.onnx", tmp_path / "sparse.onnx", tmp_path / "auto.onnx"
    graphopt.save(pruned, dense_path, sparse=False)
    size = save_sparse(pruned, str(sparse_path))
    graphopt.save(pruned, auto_path)  # the pass's metadata flag asks graphopt.save for sparse storage
    assert auto_path.read_bytes() == sparse_path.read_bytes()
    # graphopt loads its own sparse files back (densified, as ONNX Runtime does)
    reloaded = graphopt.load(sparse_path)
    np.testing.assert_array_equal(run_model(reloaded, ex.feeds(2, 12))[0][1], run_model(pruned, ex.feeds(2, 12))[0][1])
    assert size < 0.75 * dense_path.stat().st_size  # embeddings and norms stay dense
    proto = onnx.load(str(sparse_path))
    assert len(proto.graph.sparse_initializer) >= 12
    onnx.checker.check_model(proto)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(sparse_path), providers=["CPUExecutionProvider"])
    feeds = ex.feeds(2, 12)
    got = sess.run(None, feeds)[0]
    np.testing.assert_allclose(got, run_model(pruned, feeds)[0][1], atol=1e-5)
    # at 50 % COO storage would be larger than dense: nothing is converted
    half, _ = _prune(model, sparsity=0.5)
    assert len(to_sparse_proto(half).graph.sparse_initializer) == 0


def test_prune_composes_with_fusion_in_one_pipeline(bert):
    ex, model = bert
    out, report = Pipeline.parse("cleanup,prune(mode=structured,sparsity=0.5),fuse,cleanup").run(model.clone())
    rows = [r for r in report.passes if r.name == "prune"]
    assert rows and rows[0].modified and rows[0].details["groups"]
    feeds = ex.feeds(2, 9)
    ref, _ = _prune(model, mode="structured", sparsity=0.5)
    np.testing.assert_allclose(run_model(out, feeds)[0][1], run_model(ref, feeds)[0][1], atol=1e-4, rtol=1e-3)


def test_prune_then_quantize_in_one_pipeline_and_through_optimize(bert):
    ex, model = bert
    feeds = ex.feeds(2, 10)
    base = "cleanup,prune(mode=structured,sparsity=0.5),fuse,cleanup"
    pruned, _ = Pipeline.parse(base).run(model.clone())
    quant, report = Pipeline.parse(base + ",quantize-dynamic").run(model.clone())
    assert [r.name for r in report.passes if r.name in ("prune", "quantize-dynamic")] == ["prune", "quantize-dynamic"]
    assert next(r for r in report.passes if r.name == "quantize-dynamic").stats.get("quantized", 0) > 0
    a, b = run_model(pruned, feeds)[0][1].ravel(), run_model(quant, feeds)[0][1].ravel()
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99
    r = graphopt.optimize(model, prune={"sparsity": 0.5, "mode": "structured"})
    row = next(p for p in r.report.passes if p.name == "prune")
    assert row.stats["removed_units:ffn"] == 128 and row.stats["removed_units:heads"] == 4
    np.testing.assert_allclose(run_model(r.model, feeds)[0][1], run_model(pruned, feeds)[0][1], atol=1e-4)


@pytest.mark.parametrize("options,match", [
    ({"sparsity": 1.5}, "sparsity"),
    ({"mode": "3:2"}, "N:M"),
    ({"mode": "blocky"}, "mode"),
    ({"targets": ["rows"]}, "target"),
    ({"scope": "world"}, "scope"),
])
def test_bad_options_raise_pipeline_errors(options, match):
    with pytest.raises(PipelineError, match=match):
        PrunePass(**options)


def test_pipeline_text_accepts_nm_mode_and_is_deterministic(bert):
    _, model = bert
    pipe = Pipeline.parse('prune(mode="2:4")')
    out, report = pipe.run(model.clone())
    assert report.passes[0].stats["pruned_weights"] >= 12
    assert Pipeline.parse(str(pipe)) == pipe
    p1, _ = _prune(model, mode="structured", sparsity=0.5)
    p2, _ = _prune(model, mode="structured", sparsity=0.5)
    assert graphopt.to_bytes(p1) == graphopt.to_bytes(p2)


@pytest.mark.parametrize("kind,expect", [
    ("gpt2", {"ffn": 2, "heads": 2}),  # Conv1D FFN through [B*S, C] ⇄ [B, S, C] reshapes; fused QKV + Split heads
    pytest.param("vit", {"ffn": 2, "heads": 2}, marks=pytest.mark.slow),  # literal head counts rewritten
    pytest.param("resnet", {"channels": 11}, marks=pytest.mark.slow),  # bottlenecks, shortcut convs
])
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

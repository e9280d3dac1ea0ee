"""lower-ort-cpu: SkipLayerNormalization → Sum + LayerNormalization (and the RMS variant), exact on
ONNX Runtime, left alone where the plain ops cannot stand in; end to end on BERT/GPT-2/Llama."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.passes.lowering.ort_cpu import LowerOrtCpuPass
from graphopt.verify import run_model

H = 16


def _skip_model(
    op: str = "SkipLayerNormalization", outputs: tuple[str, ...] = ("y",), opset: int = 18, bias: bool = True
) -> ir.Model:
    rng = np.random.default_rng(0)
    params = [("gamma", rng.uniform(0.5, 1.5, H))]
    if op == "SkipLayerNormalization":
        params.append(("beta", rng.standard_normal(H)))
    if bias:
        params.append(("bias", rng.standard_normal(H)))
    inits = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in params]
    names = ["x", "skip", *[n for n, _ in params]]
    outs = {"y": "y", "mean": "", "inv": "", "sum": ""}
    for o in outputs:
        outs[o] = o
    node = helper.make_node(
        op, names, [outs["y"], outs["mean"], outs["inv"], outs["sum"]], domain="com.microsoft", epsilon=1e-5
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", H]) for n in ("x", "skip")],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 9
    return ir.serde.deserialize_model(model)


def _run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(graphopt.to_bytes(model), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {n: rng.standard_normal((2, 5, H)).astype(np.float32) * 3 for n in ("x", "skip")}


@pytest.mark.parametrize("op", ["SkipLayerNormalization", "SkipSimplifiedLayerNormalization"])
@pytest.mark.parametrize("bias", [True, False])
def test_skip_norm_becomes_sum_and_norm_with_the_same_outputs(op, bias):
    model = _skip_model(op, outputs=("y", "sum"), bias=bias)
    want = _run(model, _feeds())
    lowered = model.clone()
    result = LowerOrtCpuPass()(lowered)
    assert result.modified
    ops = collections.Counter(n.op_type for n in lowered.graph)
    plain = "LayerNormalization" if op == "SkipLayerNormalization" else "SimplifiedLayerNormalization"
    assert ops == collections.Counter({"Sum": 1, plain: 1})
    assert len(next(n for n in lowered.graph if n.op_type == "Sum").inputs) == (3 if bias else 2)
    assert [o.name for o in lowered.graph.outputs] == ["y", "sum"]  # graph outputs keep their names
    got = _run(lowered, _feeds())
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_used_statistics_or_old_opset_stay_fused():
    model = _skip_model(outputs=("y", "mean"))
    assert not LowerOrtCpuPass()(model).modified  # mean / inv_std_var have no plain equivalent
    model = _skip_model(opset=16)
    assert not LowerOrtCpuPass()(model).modified  # no LayerNormalization before opset 17


def test_ort_session_does_not_refuse_the_lowered_form():
    """ONNX Runtime's own SkipLayerNormFusion matches Add + LayerNormalization; the Sum stays."""
    model = _skip_model()
    LowerOrtCpuPass()(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = ""
    sess = ort.InferenceSession(graphopt.to_bytes(model), so, providers=["CPUExecutionProvider"])
    assert sess.run(None, _feeds())[0].shape == (2, 5, H)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_ort_cpu_target_lowers_every_skip_norm_and_keeps_outputs(kind):
    from models import build

    built = build(kind, "tiny")
    raw = built.export()
    r = graphopt.optimize(raw, "ort-cpu")
    ops = collections.Counter(n.op_type for n in r.model.graph)
    assert ops["SkipLayerNormalization"] == 0 and ops["SkipSimplifiedLayerNormalization"] == 0
    row = next(p for p in r.report.passes if p.name == "lower-ort-cpu")
    assert row.stats.get("skip-norm-to-sum", 0) >= 2
    feeds = built.feeds(2, 12)
    for (name, a), (_, b) in zip(run_model(raw, feeds), run_model(r.model, feeds), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4, err_msg=name)

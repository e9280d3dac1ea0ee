"""pack-sibling-matmulnbits: MatMulNBits siblings on one input become one product + Split, with
outputs equal on ONNX Runtime; siblings that differ, or whose weight has another reader, stay."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

from graphopt.passes.lowering.pack_nbits import pack_sibling_nbits
from graphopt.pipeline import Pipeline
from graphopt.verify import run_model

K = 64


def _model(widths: list[int], *, symmetric: bool = True):
    """x @ W_i for each width, quantized to MatMulNBits by the weight-only pass (so the packed
    layout is the quantizer's own), each product a graph output."""
    from graphopt.passes.cleanup import ShapeInferencePass

    rng = np.random.default_rng(0)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", "S", K]))
    nodes, inits, outs = [], [], []
    for i, n in enumerate(widths):
        w = rng.standard_normal((K, n)).astype(np.float32)
        wv = ir.Value(
            name=f"w{i}",
            type=ir.TensorType(ir.DataType.FLOAT),
            shape=ir.Shape(w.shape),
            const_value=ir.tensor(w, name=f"w{i}"),
        )
        inits.append(wv)
        mm = ir.node("MatMul", [x, wv], name=f"mm{i}")
        nodes.append(mm)
        y = mm.outputs[0]
        y.name, y.dtype = f"y{i}", ir.DataType.FLOAT
        outs.append(y)
    graph = ir.Graph([x], outs, nodes=nodes, initializers=inits, opset_imports={"": 21})
    model = ir.Model(graph, ir_version=10)
    ShapeInferencePass()(model)
    sym = str(symmetric).lower()
    model, _ = Pipeline.parse(f"quantize-weight-only(symmetric={sym},min_size=0)").run(model)
    return model


def _ops(model):
    return collections.Counter(n.op_type for n in model.graph)


@pytest.mark.parametrize("symmetric", [True, False])
def test_siblings_pack_into_one_product_and_split_with_equal_outputs(symmetric):
    model = _model([48, 16, 16], symmetric=symmetric)
    x = np.random.default_rng(1).standard_normal((2, 3, K)).astype(np.float32)
    before = run_model(model, {"x": x})
    assert pack_sibling_nbits(model) == 1
    assert _ops(model) == {"MatMulNBits": 1, "Split": 1}
    (node,) = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert node.attributes.get_int("N") == 80
    after = run_model(model, {"x": x})
    assert [n for n, _ in after] == ["y0", "y1", "y2"]  # the interface keeps its names
    for (_, a), (_, b) in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_siblings_that_differ_stay_apart():
    model = _model([32, 32])
    for n in model.graph:
        if n.op_type == "MatMulNBits" and n.name == "mm1":
            n.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 0)
    assert pack_sibling_nbits(model) == 0
    assert _ops(model)["MatMulNBits"] == 2


def test_a_weight_with_another_reader_is_not_copied():
    model = _model([32, 32])
    mm = [n for n in model.graph if n.op_type == "MatMulNBits"]
    extra = ir.node("Identity", [mm[0].inputs[1]], name="reader")
    extra.outputs[0].name = "reader_out"
    model.graph.append(extra)
    model.graph.outputs.append(extra.outputs[0])
    assert pack_sibling_nbits(model) == 0


def test_the_ort_cpu_target_packs_a_decoders_projections():
    """End to end: a Llama layer's Q/K/V and gate/up MatMulNBits come out packed, outputs kept."""
    pytest.importorskip("transformers")
    from models import build

    import graphopt

    built = build("llama", "tiny")
    raw = built.export()
    plain = graphopt.optimize(raw, "ort-cpu", quantize="int4", pipeline=None)
    row = next(p for p in plain.report.passes if p.name == "lower-ort-cpu")
    assert row.stats.get("pack-sibling-matmulnbits", 0) >= 2
    ops = _ops(plain.model)
    assert ops["Split"] >= 2
    feeds = built.feeds(2, 12)
    ref = run_model(raw, feeds)
    out = run_model(plain.model, feeds)
    for (name, a), (_, b) in zip(ref, out, strict=True):
        cos = float((a.ravel() @ b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))
        assert cos > 0.98, name

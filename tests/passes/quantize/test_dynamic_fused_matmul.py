"""quantize-dynamic and ``fuse-ort``'s FusedMatMul: a Transpose → MatMul (or MatMul · c) with a
constant weight, fused before quantization, is still quantized (an SVTR-style OCR recognizer's
classifier was left in float without a report row); with MatMul excluded it stays fused."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.verify import run_model


def head(opset: int = 11) -> onnx.ModelProto:
    """(batch, 64, T) features → Transpose to (batch, T, 64) → MatMul by a 64×512 classifier."""
    w = np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32) * 0.1
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
            helper.make_node("MatMul", ["xt", "w"], ["y"], name="classifier"),
        ],
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64, "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "T", 512])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def fused(**attrs) -> onnx.ModelProto:
    """A FusedMatMul as fuse-ort leaves it, with ``attrs`` (transA, transB, alpha)."""
    w = np.random.default_rng(0).standard_normal((512, 64) if attrs.get("transB") else (64, 512))
    graph = helper.make_graph(
        [helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain="com.microsoft", name="fm", **attrs)],
        "fused",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64, "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "T", 512])],
        [numpy_helper.from_array((w * 0.1).astype(np.float32), "w")],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _check(proto: onnx.ModelProto, pipeline: str | None = None, **options) -> tuple:
    model = graphopt.load(proto)
    if pipeline is not None:
        result = graphopt.optimize(model, target="ort-cpu", pipeline=pipeline)
    else:
        result = graphopt.optimize(model, target="ort-cpu", quantize={"mode": "dynamic", **options})
    row = next(p for p in result.report.passes if p.name == "quantize")
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 64, 30)).astype(np.float32)}
    ref = run_model(graphopt.load(proto), feeds)[0][1]
    got = run_model(result.model, feeds)[0][1]
    assert got.shape == ref.shape
    assert _cosine(ref, got) > 0.999
    return result, row


def test_fuse_ort_makes_a_fused_matmul_of_this_head() -> None:
    """The precondition the other tests rely on: the fp32 pipeline fuses the Transpose."""
    result = graphopt.optimize(graphopt.load(head()), target="ort-cpu")
    assert [n.op_type for n in result.model.graph] == ["FusedMatMul"]


def test_transposed_input_classifier_is_quantized() -> None:
    result, row = _check(head())
    assert row.stats.get("unfused:FusedMatMul") == 1
    # The row names the node the fusion made (its name is the rewriter's).
    assert [(r["op_type"], r["quantized"]) for r in row.details["nodes"]] == [("MatMul", True)]
    ops = [n.op_type for n in result.model.graph]
    assert "FusedMatMul" not in ops and "Transpose" in ops
    assert "notice" not in row.details


def test_alpha_and_transposed_weight_fold_into_the_new_weight() -> None:
    proto = fused(transA=1, transB=1, alpha=0.5)
    result, row = _check(proto, pipeline="quantize(mode=dynamic)")
    assert row.stats.get("unfused:FusedMatMul") == 1
    assert [(r["node"], r["quantized"]) for r in row.details["nodes"]] == [("fm", True)]
    assert "FusedMatMul" not in {n.op_type for n in result.model.graph}


def test_excluded_fused_matmul_stays_fused() -> None:
    result, row = _check(head(), exclude=["MatMul"])
    assert "unfused:FusedMatMul" not in row.stats
    assert [n.op_type for n in result.model.graph] == ["FusedMatMul"]

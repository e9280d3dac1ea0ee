"""Static int8 sensitivity / min_cosine on a model with pass-through ops between quantized layers.

With one layer selected (how sensitivity measures a layer alone), a MaxPool or Reshape output
whose input stays float needs a calibrated range of its own; before, the pass looked it up in the
full plan's ranges, where it had none (KeyError, exit 3 on every real CNN tried)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphopt


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.3, "w2")
    fc = numpy_helper.from_array(rng.standard_normal((8 * 4 * 4, 10)).astype(np.float32) * 0.1, "fc")
    shape = numpy_helper.from_array(np.array([0, -1], np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["c1"], ["p1"], "pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], "conv2", pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["c2"], ["p2"], "pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p2", "shape"], ["flat"], "flatten"),
        helper.make_node("MatMul", ["flat", "fc"], ["y"], "fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "passthrough",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [w1, w2, fc, shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _calibration() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(4)]


def test_sensitivity_measures_every_layer_through_pass_through_ops():
    result = graphopt.optimize(
        _model(), quantize={"mode": "static", "sensitivity": True}, calibration=_calibration()
    )
    (row,) = [r for r in result.report.to_dict()["passes"] if r["name"].startswith("quantize")]
    measured = {r["node"] for r in row["details"]["sensitivity"]}
    assert {"conv1", "conv2", "fc"} <= measured


def test_min_cosine_runs_through_pass_through_ops():
    result = graphopt.optimize(
        _model(), quantize={"mode": "static", "min_cosine": 0.9999}, calibration=_calibration()
    )
    (row,) = [r for r in result.report.to_dict()["passes"] if r["name"].startswith("quantize")]
    assert len(row["details"]["sensitivity"]) >= 3

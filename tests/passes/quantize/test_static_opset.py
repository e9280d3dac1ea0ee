"""quantize-static on models below opset 13 (issue 18, defect 4): upgraded to 13 for per-channel
QDQ, or quantized per tensor at their own opset when the converter cannot upgrade them; never
refused while ONNX Runtime's quantizer accepts the model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import PassFailedError
from graphopt.pipeline import Pipeline


def old_opset_cnn(opset: int, seed: int = 0) -> onnx.ModelProto:
    """Conv-Relu, depthwise Conv-Clip(0,6), Conv, GlobalAveragePool, Squeeze (axes attribute before
    opset 13), Gemm: ops whose signature changes between opset 11 and 13."""
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        init("w1", 16, 3, 3, 3),
        init("b1", 16, scale=0.1),
        init("w2", 16, 1, 3, 3),  # depthwise
        init("b2", 16, scale=0.1),
        init("w3", 24, 16, 1, 1),
        init("b3", 24, scale=0.1),
        init("wf", 24, 4),
        init("bf", 4, scale=0.1),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=16, strides=[2, 2]),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"]),
        helper.make_node("GlobalAveragePool", ["c3"], ["g"]),
        helper.make_node("Squeeze", ["g"], ["s"], axes=[2, 3]),
        helper.make_node("Gemm", ["s", "wf", "bf"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds(seed: int, batch: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, 3, 16, 16)).astype(np.float32)}


def run(model, x: dict[str, np.ndarray]) -> np.ndarray:
    data = model if isinstance(model, bytes) else graphopt.to_bytes(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, x)[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def quantize(proto: onnx.ModelProto):
    model = graphopt.load(proto)
    calibration = [feeds(s) for s in range(8)]
    out, report = Pipeline.parse("quantize-static,cleanup").run(model, context={"calibration": calibration})
    return out, report.passes[0]


@pytest.mark.parametrize("opset", [11, 12])
def test_old_opset_is_upgraded_and_quantized_per_channel(opset: int) -> None:
    proto = old_opset_cnn(opset)
    model, row = quantize(proto)
    assert model.opset_imports[""] == 13
    assert row.stats["opset_upgraded_from"] == opset
    ops = [n.op_type for n in model.graph]
    assert ops.count("Conv") == 3 and "QuantizeLinear" in ops
    weight_dqs = [
        n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[1].const_value is not None
    ]
    assert any(n.attributes.get_int("axis") == 0 and n.inputs[1].const_value.size > 1 for n in weight_dqs)
    onnx.checker.check_model(onnx.load_from_string(graphopt.to_bytes(model)), full_check=True)
    x = feeds(99)
    assert cosine(run(proto.SerializeToString(), x), run(model, x)) > 0.999


def test_old_opset_that_cannot_be_upgraded_is_quantized_per_tensor(monkeypatch) -> None:
    from graphopt.passes.opset import UpgradeOpsetPass

    def refuse(self, model):
        raise PassFailedError("upgrade-opset: an op without an adapter")

    monkeypatch.setattr(UpgradeOpsetPass, "call", refuse)
    proto = old_opset_cnn(12)
    model, row = quantize(proto)
    assert model.opset_imports[""] == 12
    assert row.stats["per_tensor_weights_old_opset"] == 1
    assert row.stats["weights_int8"] == 4 and row.stats["biases_int32"] == 4
    for n in model.graph:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert "axis" not in n.attributes, n
            assert n.inputs[1].const_value.size == 1
    onnx.checker.check_model(onnx.load_from_string(graphopt.to_bytes(model)), full_check=True)
    x = feeds(99)
    assert cosine(run(proto.SerializeToString(), x), run(model, x)) > 0.995


def test_opset_below_qdq_that_cannot_be_upgraded_is_refused(monkeypatch) -> None:
    from graphopt.errors import GraphoptError
    from graphopt.passes.opset import UpgradeOpsetPass

    monkeypatch.setattr(
        UpgradeOpsetPass, "call", lambda self, m: (_ for _ in ()).throw(PassFailedError("upgrade-opset: no"))
    )
    proto = old_opset_cnn(11)
    proto.opset_import[0].version = 9
    for n in proto.graph.node:  # Clip takes attributes before opset 11
        if n.op_type == "Clip":
            del n.input[1:]
            n.attribute.extend([helper.make_attribute("min", 0.0), helper.make_attribute("max", 6.0)])
    with pytest.raises(GraphoptError, match="opset 9 has no QuantizeLinear"):
        quantize(proto)

"""quantize-static's ort-cpu placement on detector blocks (issue 18, defect 7): ONNX Runtime must
fuse every group into integer kernels, as it does with quantize_static's output; a Split (YOLO's
C2f) whose pieces got their own ranges ran in float between a DequantizeLinear and one
QuantizeLinear per piece."""

from __future__ import annotations

import collections
import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.pipeline import Pipeline

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def c2f_block(seed: int = 0) -> onnx.ModelProto:
    """Conv → Split in two → a 3x3 Conv on the second half → Concat of all three → Conv:
    YOLOv8's C2f, SiLU left out (Sigmoid·Mul is quantized as elsewhere)."""
    rng = np.random.default_rng(seed)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [
        w("w1", 16, 8, 1, 1),
        w("b1", 16),
        w("w2", 8, 8, 3, 3),
        w("b2", 8),
        w("w3", 16, 24, 1, 1),
        w("b3", 16),
        numpy_helper.from_array(np.array([8, 8], np.int64), "halves"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"]),
        helper.make_node("Split", ["c1", "halves"], ["s0", "s1"], axis=1),
        helper.make_node("Conv", ["s1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["s0", "s1", "c2"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w3", "b3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "c2f",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 20, 20])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 20, 20])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def feeds(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((1, 8, 20, 20)).astype(np.float32)}


def ort_optimized_ops(model_bytes: bytes) -> collections.Counter[str]:
    """Op types of the graph ONNX Runtime (CPU, all optimizations) actually runs."""
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_split_runs_on_uint8_and_every_group_fuses() -> None:
    model, report = Pipeline.parse("quantize-static,cleanup").run(
        graphopt.load(c2f_block()), context={"calibration": [feeds(s) for s in range(4)]}
    )
    # The pieces of the Split share its input's parameters (so ORT drops the pairs around it).
    split = next(n for n in model.graph if n.op_type == "Split")
    dq_in = split.inputs[0].producer()
    assert dq_in is not None and dq_in.op_type == "DequantizeLinear"
    for piece in split.outputs:
        (q,) = [c for c in piece.consumers() if c.op_type == "QuantizeLinear"]
        assert q.inputs[1] is dq_in.inputs[1] and q.inputs[2] is dq_in.inputs[2]
    decisions = report.passes[0].details["nodes"]
    assert any(d["op_type"] == "Split" and d["quantized"] for d in decisions)

    ops = ort_optimized_ops(graphopt.to_bytes(model))
    assert ops["QLinearConv"] == 3 and ops["QLinearConcat"] == 1 and ops["Split"] == 1
    # Only the graph input's Q and the output's DQ are left: nothing runs in float in between.
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1, ops


@pytest.mark.slow
def test_yolo_detector_placement_no_worse_than_quantize_static() -> None:
    """The YOLOv8n-style detector: after ORT's fusions, graphopt's model leaves no more float
    Q/DQ work than quantize_static's (QDQ, per-channel, uint8 activations), and is as close."""
    from models import build_yolo_detector
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    e = build_yolo_detector()
    float_model = graphopt.optimize(e.export(), pipeline="cleanup,fuse(domains=[standard]),cleanup").model
    name = float_model.graph.inputs[0].name
    calibration = [{name: e.feeds(1, 320, s)["images"]} for s in range(4)]
    ours, _ = Pipeline.parse("quantize-static,cleanup").run(
        float_model.clone(), context={"calibration": calibration}
    )

    class Reader:
        def __init__(self) -> None:
            self.it = iter(calibration)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
        graphopt.save(float_model, src)
        quantize_static(
            src,
            dst,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        with open(dst, "rb") as f:
            theirs = f.read()
    a, b = ort_optimized_ops(graphopt.to_bytes(ours)), ort_optimized_ops(theirs)
    assert a["QLinearConv"] == b["QLinearConv"] == 64
    assert a["QuantizeLinear"] <= b["QuantizeLinear"] and a["DequantizeLinear"] <= b["DequantizeLinear"], (
        a,
        b,
    )
    assert a["Split"] == b["Split"] and a.get("Softmax", 0) <= b.get("Softmax", 0)

    test = e.feeds(1, 320, 99)
    feed = {name: test["images"]}
    ref = ort.InferenceSession(graphopt.to_bytes(float_model)).run(None, feed)[0].ravel()
    got = ort.InferenceSession(graphopt.to_bytes(ours)).run(None, feed)[0].ravel()
    alt = ort.InferenceSession(theirs).run(None, feed)[0].ravel()

    def cos(u: np.ndarray, v: np.ndarray) -> float:
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

    assert cos(ref, got) >= cos(ref, alt) - 1e-4


def hard_swish_block(seed: int = 0) -> onnx.ModelProto:
    """Conv → HardSwish → Conv at opset 14 (MobileNetV3's activation, fused or native)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((8, 8, 1, 1)) * 0.3).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c1"], ["h"]),
        helper.make_node("Conv", ["h", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "hswish",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 20, 20])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 20, 20])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def test_hard_swish_is_expanded_so_ort_runs_its_mul_on_int8() -> None:
    """ONNX Runtime CPU inlines HardSwish as HardSigmoid·Mul after loading; with the pairs placed
    around the HardSwish its Mul ran in float between unmatched Q/DQ (PP-OCR's classifier at opset
    14: cosine 0.960 against 0.9996). Expanded first, the Mul is a QLinearMul."""
    model, report = Pipeline.parse("quantize-static,cleanup").run(
        graphopt.load(hard_swish_block()), context={"calibration": [feeds(s) for s in range(4)]}
    )
    assert report.passes[0].stats["expanded_functions"] == 1
    assert "HardSwish" not in {n.op_type for n in model.graph}
    ops = ort_optimized_ops(graphopt.to_bytes(model))
    assert ops["QLinearMul"] == 1 and ops["QLinearConv"] == 2 and "Mul" not in ops, ops
    # the float computation is unchanged: HardSigmoid(1/6, ½)·x is HardSwish's own definition
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(hard_swish_block().SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(graphopt.to_bytes(model), so, providers=["CPUExecutionProvider"])
    f = feeds(9)
    a, b = ref.run(None, f)[0].ravel(), got.run(None, f)[0].ravel()
    assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) > 0.999

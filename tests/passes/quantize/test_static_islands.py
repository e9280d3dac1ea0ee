"""quantize-static leaves float the elementwise ops that read or write a power of one tensor, and
those no quantized Conv/MatMul/Gemm reaches (issue 18, triage T8): jax2tf/tf2onnx exports keep
LayerNorm and tanh-GELU decomposed, and their x·x, mean² and x³ terms (ranges over several orders
of magnitude) got their own Q/DQ pairs: the pretrained magika classifier's output cosine fell to
0.38 with the default calibrator."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.passes.quantize.static.plan import ISLAND, POWER
from graphopt.pipeline import Pipeline


def jax_block(opset: int = 15) -> onnx.ModelProto:
    """Dense → jax tanh-GELU (``x·(x·(0.044715·x))``) → jax LayerNorm (variance as E[x²] − E[x]²)
    → Dense, the way jax2tf/tf2onnx write them (magika's blocks)."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((16, 32)) * 0.8).astype(np.float32)
    w2 = (rng.standard_normal((32, 8)) * 0.3).astype(np.float32)

    def c(name: str, value: float) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(value, np.float32), name)

    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(np.array([-1], np.int64), "axis"),
        c("c3", 0.044715),
        c("k", math.sqrt(2 / math.pi)),
        c("one", 1.0),
        c("half", 0.5),
        c("inv_n", 1 / 32),
        c("eps", 1e-6),
        c("zero", 0.0),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        # GELU: h · (½ · (1 + tanh(k · (h + h·(h·(c3·h))))))
        helper.make_node("Mul", ["c3", "h"], ["g0"]),
        helper.make_node("Mul", ["h", "g0"], ["g1"]),
        helper.make_node("Mul", ["h", "g1"], ["g2"]),
        helper.make_node("Add", ["h", "g2"], ["g3"]),
        helper.make_node("Mul", ["k", "g3"], ["g4"]),
        helper.make_node("Tanh", ["g4"], ["g5"]),
        helper.make_node("Add", ["one", "g5"], ["g6"]),
        helper.make_node("Mul", ["half", "g6"], ["g7"]),
        helper.make_node("Mul", ["h", "g7"], ["a"]),
        # LayerNorm: (a − mean) · rsqrt(max(0, E[a²] − mean²) + eps)
        helper.make_node("ReduceSum", ["a", "axis"], ["s1"], keepdims=1),
        helper.make_node("Mul", ["s1", "inv_n"], ["mean"]),
        helper.make_node("Mul", ["a", "a"], ["sq"]),
        helper.make_node("ReduceSum", ["sq", "axis"], ["s2"], keepdims=1),
        helper.make_node("Mul", ["s2", "inv_n"], ["ex2"]),
        helper.make_node("Mul", ["mean", "mean"], ["mean2"]),
        helper.make_node("Sub", ["ex2", "mean2"], ["var0"]),
        helper.make_node("Max", ["zero", "var0"], ["var"]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Reciprocal", ["sd"], ["rs"]),
        helper.make_node("Sub", ["a", "mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "rs"], ["n"]),
        helper.make_node("MatMul", ["n", "w2"], ["y"]),
    ]
    for node in nodes:
        node.name = node.output[0]
    graph = helper.make_graph(
        nodes,
        "jax_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def feeds(seed: int) -> dict[str, np.ndarray]:
    return {"x": (np.random.default_rng(seed).standard_normal((4, 16)) * 3).astype(np.float32)}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_powers_of_one_tensor_stay_float_and_the_matmuls_are_quantized() -> None:
    model, report = Pipeline.parse("quantize-static").run(
        graphopt.load(jax_block()), context={"calibration": [feeds(s) for s in range(8)]}
    )
    decisions = {d["node"]: d for d in report.passes[0].details["nodes"]}
    # h·(c3·h), h·(h·(c3·h)), the Add reading h³, a·a and mean·mean
    for out in ("g1", "g2", "g3", "sq", "mean2"):
        d = decisions[out]
        assert not d["quantized"] and d["reason"] == POWER, d
    assert decisions["a"]["quantized"]  # h · ½(1 + tanh): a product of two different tensors
    matmuls = [d for d in decisions.values() if d["op_type"] == "MatMul"]
    assert len(matmuls) == 2 and all(d["quantized"] for d in matmuls)


def test_elementwise_islands_stay_float() -> None:
    """Mul(x, z) into a ReduceSum, apart from the quantized MatMul: Q/DQ there would only cost."""
    w = (np.random.default_rng(2).standard_normal((16, 16)) * 0.3).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "z"], ["m"], name="m"),
            helper.make_node("ReduceSum", ["m"], ["s"], name="s", keepdims=0),
            helper.make_node("MatMul", ["x", "w"], ["y"], name="y"),
        ],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 16]) for n in ("x", "z")],
        [
            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16]),
        ],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    rng = np.random.default_rng(3)
    calib = [{n: rng.standard_normal((4, 16)).astype(np.float32) for n in ("x", "z")} for _ in range(4)]
    _, report = Pipeline.parse("quantize-static").run(graphopt.load(model), context={"calibration": calib})
    decisions = {d["node"]: d for d in report.passes[0].details["nodes"]}
    assert decisions["m"] == {"node": "m", "op_type": "Mul", "quantized": False, "reason": ISLAND}
    assert decisions["y"]["quantized"]
    # TensorRT fuses Q/DQ on elementwise inputs into the producer's epilogue: no island rule there
    _, trt = Pipeline.parse("quantize-static(placement=tensorrt)").run(
        graphopt.load(model), context={"calibration": calib}
    )
    assert {d["node"]: d["reason"] for d in trt.passes[0].details["nodes"]}.get("m") != ISLAND


def test_decomposed_jax_block_keeps_its_output() -> None:
    result = graphopt.optimize(jax_block(), quantize="static", calibration=[feeds(s) for s in range(8)])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(jax_block().SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(graphopt.to_bytes(result.model), so, providers=["CPUExecutionProvider"])
    for seed in (100, 101, 102):
        f = feeds(seed)
        assert _cosine(ref.run(None, f)[0], got.run(None, f)[0]) > 0.995


def test_an_elementwise_op_next_to_a_quantized_matmul_is_still_quantized() -> None:
    """The island rule removes nothing next to integer compute: Mul(MatMul, MatMul) runs on int8."""
    w = (np.random.default_rng(1).standard_normal((16, 16)) * 0.3).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["a"]),
            helper.make_node("MatMul", ["x", "w"], ["b"]),
            helper.make_node("Mul", ["a", "b"], ["m"]),
            helper.make_node("MatMul", ["m", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    _, report = Pipeline.parse("quantize-static").run(
        graphopt.load(model), context={"calibration": [feeds(s) for s in range(4)]}
    )
    decisions = {d["op_type"]: d for d in report.passes[0].details["nodes"]}
    assert decisions["Mul"]["quantized"], decisions["Mul"]

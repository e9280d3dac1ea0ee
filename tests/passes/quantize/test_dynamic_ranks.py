"""quantize-dynamic on opset-12 recurrent OCR heads (CRNN): every MatMul is quantized although the
export computes its Reshape targets in the graph (Shape → Gather → Unsqueeze → Concat), where
onnx's Reshape-5/13 inference gives up; an input whose rank nothing determines gets per-tensor
activations instead of staying float."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.verify import run_model

OPSET = 12


def _const(name: str, values: int | list[int]) -> onnx.NodeProto:
    """A Constant int64 node (an int gives a scalar)."""
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64), name)
    )


def _dims_then_minus_one(prefix: str, x: str, axes: list[int]) -> list[onnx.NodeProto]:
    """Nodes computing ``[x.shape[a] for a in axes] + [-1]`` the way torch's opset-12 exporter
    writes ``x.reshape(x.shape[0], x.shape[1], -1)`` (scalar Gathers, Unsqueeze with an axes
    attribute, Concat)."""
    nodes = [helper.make_node("Shape", [x], [f"{prefix}_shape"])]
    parts = []
    for a in axes:
        nodes += [
            _const(f"{prefix}_i{a}", a),  # a scalar index
            helper.make_node("Gather", [f"{prefix}_shape", f"{prefix}_i{a}"], [f"{prefix}_d{a}"], axis=0),
            helper.make_node("Unsqueeze", [f"{prefix}_d{a}"], [f"{prefix}_u{a}"], axes=[0]),
        ]
        parts.append(f"{prefix}_u{a}")
    nodes += [
        _const(f"{prefix}_rest", [-1]),
        helper.make_node("Concat", [*parts, f"{prefix}_rest"], [f"{prefix}_target"], axis=0),
    ]
    return nodes


def crnn(lstm: bool = True, seed: int = 0) -> onnx.ModelProto:
    """Conv stack → MaxPool to height 1 → Squeeze(axes attr) → Transpose to (W, N, C) → computed
    Reshape → [bidirectional LSTM → Transpose → computed Reshape] → MatMul+Add → Relu →
    MatMul+Add classifier, at opset 12 with a dynamic batch and width."""
    rng = np.random.default_rng(seed)
    c, hidden, classes = 32, 48, 40

    def init(name: str, *shape: int, scale: float = 0.2) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("conv_w", c, 3, 3, 3), init("conv_b", c, scale=0.1)]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("MaxPool", ["relu"], ["pool"], kernel_shape=[8, 1], strides=[8, 1]),
        helper.make_node("Squeeze", ["pool"], ["seq_nc"], axes=[2]),
        helper.make_node("Transpose", ["seq_nc"], ["seq"], perm=[2, 0, 1]),  # (W, N, C)
        *_dims_then_minus_one("r0", "seq", [0, 1]),
        helper.make_node("Reshape", ["seq", "r0_target"], ["feat"]),
    ]
    width = c
    if lstm:
        inits += [
            init("lstm_w", 2, 4 * hidden, c),
            init("lstm_r", 2, 4 * hidden, hidden),
            init("lstm_b", 2, 8 * hidden, scale=0.05),
        ]
        nodes += [
            helper.make_node(
                "LSTM",
                ["feat", "lstm_w", "lstm_r", "lstm_b"],
                ["lstm_y"],
                hidden_size=hidden,
                direction="bidirectional",
            ),
            helper.make_node("Transpose", ["lstm_y"], ["lstm_t"], perm=[0, 2, 1, 3]),  # (W, N, 2, H)
            *_dims_then_minus_one("r1", "lstm_t", [0, 1]),
            helper.make_node("Reshape", ["lstm_t", "r1_target"], ["rnn_out"]),
        ]
        width = 2 * hidden
    else:
        nodes.append(helper.make_node("Identity", ["feat"], ["rnn_out"]))
    inits += [init("fc1_w", width, 64), init("fc1_b", 64, scale=0.1)]
    inits += [init("fc2_w", 64, classes), init("fc2_b", classes, scale=0.1)]
    nodes += [
        helper.make_node("MatMul", ["rnn_out", "fc1_w"], ["fc1"], name="fc1"),
        helper.make_node("Add", ["fc1", "fc1_b"], ["fc1_biased"]),
        helper.make_node("Relu", ["fc1_biased"], ["fc1_act"]),
        helper.make_node("MatMul", ["fc1_act", "fc2_w"], ["fc2"], name="fc2"),
        helper.make_node("Add", ["fc2", "fc2_b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "crnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(seed: int = 0, batch: int = 2, width: int = 24) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, 3, 8, width)).astype(np.float32)}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _rows(report) -> list[dict]:
    row = next(p for p in report.passes if p.name == "quantize")
    return row.details["nodes"]


@pytest.mark.parametrize("lstm", [True, False], ids=["lstm-head", "matmul-head"])
def test_crnn_matmuls_are_quantized_at_opset_12(lstm: bool) -> None:
    proto = crnn(lstm=lstm)
    result = graphopt.optimize(graphopt.load(proto), target="ort-cpu", quantize="dynamic")
    rows = {r["node"]: r for r in _rows(result.report) if r["op_type"] == "MatMul"}
    assert set(rows) == {"fc1", "fc2"}
    assert all(r["quantized"] for r in rows.values()), rows
    model = result.model
    assert model.opset_imports[""] == OPSET
    assert not [n for n in model.graph if n.op_type == "MatMul"]
    for seed, (batch, width) in enumerate([(2, 24), (1, 40)]):
        feeds = _feeds(seed, batch, width)
        ref = run_model(graphopt.load(proto), feeds)[0][1]
        got = run_model(model, feeds)[0][1]
        assert got.shape == ref.shape == (width, batch, 40)
        assert _cosine(ref, got) > 0.999


def test_crnn_matmul_inputs_get_their_shapes_from_the_graph() -> None:
    """The root cause: the ranks (and here every dim) after the computed Reshapes come from shape
    inference, not from a guess in the quantizer."""
    from graphopt.passes.ir_helpers import infer_shapes

    model = graphopt.load(crnn(lstm=True))
    infer_shapes(model)
    by_name = {n.name: n for n in model.graph}
    fc1_in = by_name["fc1"].inputs[0]
    assert fc1_in.shape is not None and len(fc1_in.shape) == 3
    assert fc1_in.shape[2] == 96  # -1 resolved: (W, N, 2, 48) -> (W, N, 96)
    fc2_in = by_name["fc2"].inputs[0]
    assert fc2_in.shape is not None and len(fc2_in.shape) == 3 and fc2_in.shape[2] == 64


def _unknown_rank_model() -> onnx.ModelProto:
    """A MatMul whose input is reshaped by a target the model takes as an input of unknown length:
    nothing determines its rank before it runs."""
    w = np.random.default_rng(3).standard_normal((32, 48)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("MatMul", ["r", "w"], ["y"], name="mm"),
        ],
        "unknown_rank",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, ["k"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def test_input_of_unknown_rank_gets_per_tensor_activations() -> None:
    proto = _unknown_rank_model()
    result = graphopt.optimize(graphopt.load(proto), target="ort-cpu", quantize="dynamic")
    row = next(p for p in result.report.passes if p.name == "quantize")
    assert [r["quantized"] for r in row.details["nodes"]] == [True]
    assert row.stats.get("per-tensor:input rank unknown") == 1
    assert [n.op_type for n in result.model.graph if n.op_type != "Reshape"] == ["DynamicQuantizeMatMul"]
    x = np.random.default_rng(0).standard_normal((6, 32)).astype(np.float32)
    for shape in ([2, 3, 32], [6, 32]):  # the same model at two ranks
        feeds = {"x": x, "shape": np.array(shape, np.int64)}
        ref = run_model(graphopt.load(proto), feeds)[0][1]
        got = run_model(result.model, feeds)[0][1]
        assert got.shape == ref.shape == (*shape[:-1], 48)
        assert _cosine(ref, got) > 0.999

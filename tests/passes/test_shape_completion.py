"""Shapes onnx's inference leaves out at old opsets (ir_helpers.complete_shapes, run by
infer_shapes): a Reshape-5/13 whose target the graph computes gets the rank (and the dims the
computation determines), and every dim it sets matches what ONNX Runtime produces."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.passes.ir_helpers import complete_shapes, infer_shapes
from graphopt.verify import run_model


def _i64(name: str, values) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64), name)
    )


def _model(nodes, inputs, opset: int = 12) -> ir.Model:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((4, 3), np.float32), "w")],
    )
    # The output feeds a MatMul so the test also sees the shape travel downstream.
    graph.node.append(helper.make_node("MatMul", ["r", "w"], ["y"]))
    return graphopt.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _x(*dims) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))]


def _value(model: ir.Model, name: str) -> ir.Value:
    return next(o for n in model.graph for o in n.outputs if o.name == name)


def _dims(value: ir.Value) -> list:
    assert value.shape is not None
    return [d if isinstance(d, int) else d.value for d in value.shape]


def _check_against_ort(model: ir.Model, feeds: dict[str, np.ndarray]) -> None:
    """Every int dim the inference set on r and y is what ORT produces."""
    probe = model.clone()
    for name in ("r", "y"):
        v = _value(probe, name)
        if not v.is_graph_output():
            probe.graph.outputs.append(v)
    got = dict(run_model(probe, feeds))
    for name in ("r", "y"):
        dims = _dims(_value(model, name))
        assert len(dims) == got[name].ndim
        for d, real in zip(dims, got[name].shape, strict=True):
            assert not isinstance(d, int) or d == real


def _shape_gather_concat(axes: list[int], tail: list[int]) -> list[onnx.NodeProto]:
    nodes = [helper.make_node("Shape", ["x"], ["s"])]
    parts = []
    for a in axes:
        nodes += [
            _i64(f"i{a}", a),
            helper.make_node("Gather", ["s", f"i{a}"], [f"g{a}"], axis=0),
            helper.make_node("Unsqueeze", [f"g{a}"], [f"u{a}"], axes=[0]),
        ]
        parts.append(f"u{a}")
    return [*nodes, _i64("tail", tail), helper.make_node("Concat", [*parts, "tail"], ["t"], axis=0)]


def test_computed_target_with_minus_one_gets_every_dim() -> None:
    nodes = [*_shape_gather_concat([0, 1], [-1]), helper.make_node("Reshape", ["Xt", "t"], ["r"])]
    nodes.insert(0, helper.make_node("Transpose", ["x"], ["Xt"], perm=[0, 1, 3, 2]))
    # Shape of x: (batch, seq, 2, 2) -> target (batch, seq, -1) on the transposed x -> (batch, seq, 4)
    model = _model(nodes, _x("batch", "seq", 2, 2))
    infer_shapes(model)
    assert _dims(_value(model, "r")) == ["batch", "seq", 4]
    assert _dims(_value(model, "y")) == ["batch", "seq", 3]
    _check_against_ort(model, {"x": np.ones((2, 5, 2, 2), np.float32)})


def test_zero_copies_the_input_dim_and_slices_of_shapes_are_read() -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        _i64("st", [1]),
        _i64("en", [2]),
        helper.make_node("Slice", ["s", "st", "en"], ["seq"]),
        _i64("head", [0]),
        _i64("last", [4]),
        helper.make_node("Concat", ["head", "seq", "last"], ["t"], axis=0),
        helper.make_node("Reshape", ["x", "t"], ["r"]),
    ]
    model = _model(nodes, _x("batch", "seq", 4))
    infer_shapes(model)
    assert _dims(_value(model, "r")) == ["batch", "seq", 4]
    _check_against_ort(model, {"x": np.ones((3, 7, 4), np.float32)})


def test_unknown_element_keeps_the_rank() -> None:
    """Shape arithmetic it cannot follow (a product of two symbolic dims) still gives the rank."""
    nodes = [
        *_shape_gather_concat([0, 1], []),  # t = (batch, seq)
        helper.make_node("Mul", ["t", "t"], ["t2"]),  # (batch², seq²): unknown elements
        _i64("one", [1]),
        _i64("four", [4]),
        helper.make_node("Concat", ["one", "four"], ["t3"], axis=0),
        helper.make_node("Reshape", ["x", "t3"], ["r0"]),
        helper.make_node("Shape", ["t2"], ["n"]),  # a length-2 tensor
        helper.make_node("Concat", ["t2", "four"], ["t4"], axis=0),
        helper.make_node("Reshape", ["r0", "t4"], ["r"]),
    ]
    model = _model(nodes, _x("batch", "seq", 4))
    infer_shapes(model)
    dims = _dims(_value(model, "r"))
    assert len(dims) == 3 and dims[2] == 4 and dims[0] is None and dims[1] is None
    _check_against_ort(model, {"x": np.ones((1, 1, 4), np.float32)})


def test_target_of_known_length_only_gives_the_rank() -> None:
    graph_inputs = [
        *_x("n", 4),
        helper.make_tensor_value_info("shape", TensorProto.INT64, [3]),
    ]
    model = _model([helper.make_node("Reshape", ["x", "shape"], ["r"])], graph_inputs)
    infer_shapes(model)
    assert _dims(_value(model, "r")) == [None, None, None]
    assert len(_dims(_value(model, "y"))) == 3


def test_target_of_unknown_length_stays_unknown() -> None:
    graph_inputs = [*_x("n", 4), helper.make_tensor_value_info("shape", TensorProto.INT64, ["k"])]
    model = _model([helper.make_node("Reshape", ["x", "shape"], ["r"])], graph_inputs)
    assert not complete_shapes(model)
    infer_shapes(model)
    assert _value(model, "r").shape is None


def test_a_shape_already_there_is_kept() -> None:
    nodes = [*_shape_gather_concat([0], [-1]), helper.make_node("Reshape", ["x", "t"], ["r"])]
    model = _model(nodes, _x("batch", 2, 2))
    r = _value(model, "r")
    r.shape = ir.Shape(["batch", 4])
    assert not complete_shapes(model)
    assert _dims(r) == ["batch", 4]


@pytest.mark.parametrize("opset", [12, 13, 14])
def test_every_reshape_opset_gets_the_rank(opset: int) -> None:
    nodes = [*_shape_gather_concat([0], [-1]), helper.make_node("Reshape", ["x", "t"], ["r"])]
    if opset >= 13:  # Unsqueeze takes its axes as an input from 13 on
        nodes = [n for n in nodes if n.op_type != "Unsqueeze"]
        nodes[3:3] = [_i64("ax", [0]), helper.make_node("Unsqueeze", ["g0", "ax"], ["u0"])]
    model = _model(nodes, _x("batch", 2, 2), opset=opset)
    infer_shapes(model)
    dims = _dims(_value(model, "r"))
    # From 14 on, onnx's own rank-only inference answers first (its second dim is a new symbol).
    assert dims[0] == "batch" and (dims[1] == 4 if opset < 14 else len(dims) == 2)
    _check_against_ort(model, {"x": np.ones((3, 2, 2), np.float32)})

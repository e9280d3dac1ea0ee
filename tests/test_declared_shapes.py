"""Declared shapes are claims, not facts (issue 18, defect 2).

A model may declare an output ``[1, seqlen]`` that it computes as ``(20, 1, 8210)`` (ONNX Runtime only
warns). A rewrite that takes such a claim as the shape (onnxscript's MaterializeReshapeShape made a
Reshape ``[1, -1]`` from it) changes the outputs. Rewrites may rely only on what shape inference
derives from the inputs and constants; see graphopt.annotations for what of a declaration survives.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.annotations import DECLARED_SHAPES_KEY, adopt_declared_dims, set_aside_declared_shapes

RNG = np.random.default_rng(0)


def _run(data: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


def _assert_same_outputs(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], **kw) -> onnx.ModelProto:
    expected = _run(proto.SerializeToString(), feeds)
    out = graphopt.to_bytes(graphopt.optimize(proto, **kw).model)
    got = _run(out, feeds)
    for e, g in zip(expected, got):
        assert e.shape == g.shape, (e.shape, g.shape)
        np.testing.assert_array_equal(e, g)
    return onnx.load_from_string(out)


def _crnn_like(opset: int, declared: list | None, value_info: list | None = None) -> onnx.ModelProto:
    """Conv, then ``Reshape(c, Concat(Shape(c)[0], [-1]))``: the output is (N, 144), which shape
    inference cannot derive (the target is computed). ``declared`` is what the model claims."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 3, 3, 3], RNG.standard_normal(108).astype(np.float32))
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Shape", ["c"], ["s"]),
            helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
            helper.make_node("Concat", ["n", "m1"], ["shp"], axis=0),
            helper.make_node("Reshape", ["c", "shp"], ["r" if value_info else "y"]),
            *([helper.make_node("Relu", ["r"], ["y"])] if value_info else []),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, declared)],
        [
            w,
            helper.make_tensor("i0", TensorProto.INT64, [1], [0]),
            helper.make_tensor("m1", TensorProto.INT64, [1], [-1]),
        ],
    )
    if value_info:
        graph.value_info.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, value_info))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


FEEDS = {"x": RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)}


@pytest.mark.parametrize("opset", [12, 14, 18])
@pytest.mark.parametrize("declared", [[1, "seqlen"], [7, "a", "b"], [2, 144]])
def test_a_wrong_declared_output_shape_does_not_change_the_output(opset: int, declared: list) -> None:
    """[1, seqlen]: the issue's CRNN (the model really returns batch 2); [7, a, b]: another rank;
    [2, 144]: right for this batch, wrong for the next (a traced example's sizes)."""
    _assert_same_outputs(_crnn_like(opset, declared), FEEDS)
    _assert_same_outputs(_crnn_like(opset, declared), {"x": FEEDS["x"][:1]})


@pytest.mark.parametrize("opset", [12, 14])
def test_a_wrong_declared_intermediate_shape_does_not_change_the_output(opset: int) -> None:
    _assert_same_outputs(_crnn_like(opset, None, value_info=[1, 288]), FEEDS)


def test_a_wrong_declared_shape_after_an_lstm_does_not_change_the_output() -> None:
    """An LSTM's sequence output, flattened by a computed Reshape, declared as ``[1, seqlen]``."""
    hidden, feat = 5, 4
    w = RNG.standard_normal((1, 4 * hidden, feat)).astype(np.float32)
    r = RNG.standard_normal((1, 4 * hidden, hidden)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("LSTM", ["x", "W", "R"], ["Y"], hidden_size=hidden),
            helper.make_node("Shape", ["Y"], ["s"]),
            helper.make_node("Gather", ["s", "i0"], ["t"], axis=0),
            helper.make_node("Concat", ["t", "m1"], ["shp"], axis=0),
            helper.make_node("Reshape", ["Y", "shp"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 1, feat])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seqlen"])],
        [
            onnx.numpy_helper.from_array(w, "W"),
            onnx.numpy_helper.from_array(r, "R"),
            helper.make_tensor("i0", TensorProto.INT64, [1], [0]),
            helper.make_tensor("m1", TensorProto.INT64, [1], [-1]),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=7)
    _assert_same_outputs(proto, {"x": RNG.standard_normal((7, 1, feat)).astype(np.float32)})


def test_the_file_keeps_the_declared_output_shape_where_inference_does_not_contradict_it() -> None:
    out = _assert_same_outputs(_crnn_like(14, ["N", "flat"]), FEEDS)
    dims = out.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", "flat"]


def _value(name: str, shape: list | None) -> ir.Value:
    return ir.Value(
        name=name, shape=None if shape is None else ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT)
    )


def test_what_survives_of_a_declaration() -> None:
    """Rank and sizes come from inference; a declaration inference gives no rank to, or contradicts,
    is dropped; a graph output gets back only the names of its symbolic dims."""
    x = ir.Value(name="x", shape=ir.Shape(["N", 4]), type=ir.TensorType(ir.DataType.FLOAT))
    names = ["mid", "norank", "contra", "out"]
    nodes = [ir.node("Relu", [x], outputs=[_value(n, None)]) for n in names]
    graph = ir.Graph([x], [nodes[-1].outputs[0]], nodes=nodes, opset_imports={"": 17})
    model = ir.Model(graph, ir_version=8)
    declared = {"mid": [1, "seq", 3], "norank": [1, 2], "contra": [5, "seq"], "out": [1, "seq"]}
    for node, n in zip(nodes, names):
        node.outputs[0].shape = ir.Shape(declared[n])
    assert set_aside_declared_shapes(model)
    assert all(node.outputs[0].shape is None for node in nodes)
    assert set(model.meta[DECLARED_SHAPES_KEY]) == set(names)
    # what inference derives (unknown dims as ONNX writes them)
    inferred = {"mid": [None, "unk__1", 3], "norank": None, "contra": [4, None], "out": ["unk__2", None]}
    runs = []

    def infer(m: ir.Model) -> bool:
        runs.append(1)
        for node, n in zip(nodes, names):
            if node.outputs[0].shape is None and inferred[n] is not None:
                node.outputs[0].shape = ir.Shape(inferred[n])
        return True

    assert adopt_declared_dims(model, infer)
    assert len(runs) == 2  # once more after the fill: what follows from it
    got = {n: node.outputs[0].shape for node, n in zip(nodes, names)}
    assert got["mid"] == ir.Shape([1, "seq", 3])  # an intermediate: names and sizes
    assert got["norank"] is None  # no rank from inference: nothing of the claim
    assert got["contra"] == ir.Shape([4, None])  # contradicted: inference only
    assert got["out"] == ir.Shape(["unk__2", "seq"])  # a graph output: names only, never a size
    adopt_declared_dims(model, infer)
    assert len(runs) == 3  # once per model: later calls only infer


def test_a_wrong_declared_output_shape_is_not_trusted_after_an_in_memory_upgrade() -> None:
    """The pretrained CRNN's path (TRIAGE T12): upgrade-opset in memory, then optimize the result;
    the declaration must not come back as a fact on the way."""
    proto = _crnn_like(12, [1, "seqlen"])
    up = graphopt.optimize(proto, pipeline="upgrade-opset").model
    out = graphopt.to_bytes(graphopt.optimize(up).model)
    for feeds in (FEEDS, {"x": FEEDS["x"][:1]}):
        (expected,), (got,) = _run(proto.SerializeToString(), feeds), _run(out, feeds)
        assert expected.shape == got.shape
        np.testing.assert_array_equal(expected, got)

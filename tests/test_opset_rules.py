"""Every rule emits only ops and attributes that exist at the model's opset (issue 18, defect 1).

onnxscript's rules and constant folder build their replacements for the newest opset: a Reshape
with ``allowzero`` (opset 14), ``Split`` with sizes as an input (13) or ``num_outputs`` (18),
``Squeeze``/``Unsqueeze`` with axes as an input (13), ``Constant(value_ints)`` (12). At a lower
opset ONNX Runtime refuses the file. Each test builds a small model at a low opset where such a
rewrite fires and checks that the output loads and computes what the input does.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.passes.cleanup import FoldConstantsPass, SimplifyPass
from graphopt.passes.ir_helpers import opset_guarded
from graphopt.schemas import model_problems


def _run(model: onnx.ModelProto | bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


def _optimize_and_compare(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], **kw) -> onnx.ModelProto:
    expected = _run(proto, feeds)
    out = graphopt.to_bytes(graphopt.optimize(proto, **kw).model)
    got = _run(out, feeds)  # ONNX Runtime loads it: no op or attribute the opset lacks
    for e, g in zip(expected, got):
        assert e.shape == g.shape and np.array_equal(e, g)
    return onnx.load_from_string(out)


def _dynamic_reshape_model(opset: int, dims: list[int | str]) -> ir.Model:
    """``Reshape(x, Concat(Shape(x)[0], [-1]))`` whose output shape is known as ``dims`` (as
    inference would annotate it): what onnxscript's MaterializeReshapeShape rewrites."""
    proto = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("Shape", ["x"], ["s"]),
                helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
                helper.make_node("Concat", ["n", "m1"], ["shp"], axis=0),
                helper.make_node("Reshape", ["x", "shp"], ["r"]),
                helper.make_node("Relu", ["r"], ["y"]),
            ],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [
                helper.make_tensor("i0", TensorProto.INT64, [1], [0]),
                helper.make_tensor("m1", TensorProto.INT64, [1], [-1]),
            ],
        ),
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=7,
    )
    model = ir.serde.deserialize_model(proto)
    r = next(n for n in model.graph if n.op_type == "Reshape").outputs[0]
    r.shape = ir.Shape(dims)
    return model


def _reshape(model: ir.Model) -> ir.Node:
    return next(n for n in model.graph if n.op_type == "Reshape")


@pytest.mark.parametrize("opset", [12, 13, 14, 18])
def test_a_materialized_reshape_shape_carries_allowzero_only_where_the_opset_has_it(opset: int) -> None:
    model = _dynamic_reshape_model(opset, ["N", 12])
    assert SimplifyPass()(model).modified
    node = _reshape(model)
    assert ir.convenience.get_const_tensor(node.inputs[1]).numpy().tolist() == [-1, 12]
    assert "allowzero" not in node.attributes  # no 0 in the shape: not needed at any opset
    assert not list(model_problems(model))
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    assert _run(ir.serde.serialize_model(model), {"x": x})[0].shape == (2, 12)


@pytest.mark.parametrize(("opset", "materialized"), [(12, False), (13, False), (14, True)])
def test_a_materialized_zero_dim_needs_allowzero_so_before_opset_14_the_site_is_left_alone(
    opset: int, materialized: bool
) -> None:
    model = _dynamic_reshape_model(opset, [0, 12])
    SimplifyPass()(model)
    node = _reshape(model)
    assert (ir.convenience.get_const_tensor(node.inputs[1]) is not None) == materialized
    if materialized:
        assert node.attributes.get_int("allowzero") == 1
    assert not list(model_problems(model))


def test_an_opset_guarded_onnxscript_rule_skips_a_replacement_the_opset_lacks() -> None:
    """onnxscript's own MaterializeReshapeShape (always ``allowzero=1``), guarded: it does not fire at
    opset 12 and leaves the opset imports as they were; at opset 14 it fires."""
    from onnxscript.rewriter.rules.common import materialize_reshape_shape_rule

    old = _dynamic_reshape_model(12, ["N", 12])
    before = dict(old.opset_imports)
    assert opset_guarded(materialize_reshape_shape_rule).apply_to_model(old) == 0
    assert dict(old.opset_imports) == before
    assert ir.convenience.get_const_tensor(_reshape(old).inputs[1]) is None
    new = _dynamic_reshape_model(14, ["N", 12])
    assert opset_guarded(materialize_reshape_shape_rule).apply_to_model(new) == 1


def _split_to_sequence_model(opset: int, keepdims: int) -> onnx.ModelProto:
    split = helper.make_tensor("sp", TensorProto.INT64, [2], [2, 4]) if keepdims else None
    if split is None:
        split = helper.make_tensor("sp", TensorProto.INT64, [], [1])
    return helper.make_model(
        helper.make_graph(
            [
                helper.make_node("SplitToSequence", ["x", "sp"], ["seq"], axis=1, keepdims=keepdims),
                helper.make_node("SequenceAt", ["seq", "i1"], ["a"]),
                helper.make_node("Relu", ["a"], ["y"]),
            ],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [split, helper.make_tensor("i1", TensorProto.INT64, [], [1])],
        ),
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=7,
    )


@pytest.mark.parametrize(("opset", "keepdims"), [(11, 1), (12, 1), (11, 0), (13, 0), (17, 0)])
def test_the_folder_does_not_rewrite_split_to_sequence_into_split_forms_the_opset_lacks(
    opset: int, keepdims: int
) -> None:
    """onnxscript's folder turns SplitToSequence into Split with the sizes as an input (opset 13) or
    with ``num_outputs`` (18), and Squeeze with axes as an input (13): ORT refused the file."""
    proto = _split_to_sequence_model(opset, keepdims)
    x = np.arange(24, dtype=np.float32).reshape(4, 6) - 12
    out = _optimize_and_compare(proto, {"x": x})
    for n in out.graph.node:
        if n.op_type == "Split":
            assert opset >= 13 or len(n.input) == 1
            assert opset >= 18 or not any(a.name == "num_outputs" for a in n.attribute)


def test_the_folder_rewrites_split_to_sequence_where_the_opset_has_the_split_form() -> None:
    proto = _split_to_sequence_model(18, 0)
    out = _optimize_and_compare(proto, {"x": np.ones((4, 6), np.float32)})
    assert "SplitToSequence" not in [n.op_type for n in out.graph.node]


def test_a_folded_shape_is_a_constant_every_opset_has() -> None:
    """The folder writes a static Shape as ``Constant(value_ints)``, an attribute Constant has from
    opset 12; at opset 11 it must be ``Constant(value=tensor)``."""
    proto = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("Shape", ["x"], ["s"]),
                helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
                helper.make_node("Mul", ["x", "sf"], ["y"]),
            ],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])],
        ),
        opset_imports=[helper.make_opsetid("", 11)],
        ir_version=6,
    )
    model = ir.serde.deserialize_model(proto)
    FoldConstantsPass()(model)
    assert not list(model_problems(model))
    _optimize_and_compare(proto, {"x": np.ones((3, 2), np.float32)}, pipeline="fold-constants")


def test_concat_from_sequence_with_new_axis_keeps_its_form_before_opset_13() -> None:
    """The folder turns ConcatFromSequence(new_axis=1) into Unsqueeze with axes as an input (opset 13)."""
    proto = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("SequenceConstruct", ["x", "x"], ["seq"]),
                helper.make_node("ConcatFromSequence", ["seq"], ["c"], axis=0, new_axis=1),
                helper.make_node("Relu", ["c"], ["y"]),
            ],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        ),
        opset_imports=[helper.make_opsetid("", 12)],
        ir_version=7,
    )
    _optimize_and_compare(proto, {"x": np.arange(6, dtype=np.float32).reshape(2, 3) - 3})

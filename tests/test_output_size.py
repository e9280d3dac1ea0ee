"""The optimized file holds what the rewrites need and no more: type and shape annotations that
shape inference adds while passes run are not written out unless the input had them."""

from __future__ import annotations

import numpy as np
import onnx
from models import chain_model
from onnx import TensorProto, helper

import graphopt
from graphopt.verify import run_model


def test_a_chain_without_annotations_comes_out_no_larger() -> None:
    src = chain_model(2000)
    out = graphopt.to_bytes(graphopt.optimize(graphopt.load(src)).model)
    assert len(out) <= len(src.SerializeToString()) * 1.02  # metadata only (pipeline text)
    graph = onnx.load_from_string(out).graph
    produced = {o for n in graph.node for o in n.output}
    assert not [v.name for v in graph.value_info if v.name in produced]


def test_annotations_the_input_had_are_kept() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Neg", ["r"], ["n"]),
            helper.make_node("Relu", ["n"], ["y"]),
        ],
        "g",
        [x],
        [y],
        value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    out = onnx.load_from_string(graphopt.to_bytes(graphopt.optimize(graphopt.load(model)).model))
    assert [v.name for v in out.graph.value_info] == ["r"]
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3) - 3}
    assert np.array_equal(
        run_model(graphopt.load(out), feeds)[0][1], np.maximum(-np.maximum(feeds["x"], 0), 0)
    )

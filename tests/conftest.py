"""Shared fixtures for the I/O and CLI tests: a small real MLP, with and without external data."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((16, 32)).astype(np.float32)  # 2 KiB: above the external-data threshold
B1 = RNG.standard_normal(32).astype(np.float32)  # 128 B: stays inline unless forced
W2 = RNG.standard_normal((32, 4)).astype(np.float32)
FEEDS = {"x": RNG.standard_normal((3, 16)).astype(np.float32)}


def mlp_proto(opset: int = 17) -> onnx.ModelProto:
    """2-layer MLP with an Identity, a Dropout and a foldable Constant chain (17 → fewer nodes)."""
    nodes = [
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.float32([2.0]), "two")),
        helper.make_node("Mul", ["b1", "two"], ["b1x2"]),
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Identity", ["h"], ["hi"]),
        helper.make_node("Add", ["hi", "b1x2"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("Dropout", ["r"], ["d"]),
        helper.make_node("MatMul", ["d", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [
            numpy_helper.from_array(W1, "w1"),
            numpy_helper.from_array(B1, "b1"),
            numpy_helper.from_array(W2, "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def reference_output() -> np.ndarray:
    h = np.maximum(FEEDS["x"] @ W1 + B1 * 2, 0)
    return h @ W2


def save_external(proto: onnx.ModelProto, path: str | os.PathLike, location: str = "weights.bin") -> None:
    """Save with every initializer (small ones too) in ``location`` next to the model."""
    onnx.save_model(
        proto,
        os.fspath(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )


def external_ref_model(
    location: str, *, offset: int = 0, length: int | None = None, as_attribute: bool = False
) -> onnx.ModelProto:
    """A model whose one 4x4 float weight points at ``location`` (raw bytes are not written here)."""
    t = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    set_external_data(t, location=location, offset=offset, length=64 if length is None else length)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])
    if as_attribute:
        nodes = [helper.make_node("Constant", [], ["w"], value=t), helper.make_node("Add", ["x", "w"], ["y"])]
        inits = []
    else:
        nodes, inits = [helper.make_node("Add", ["x", "w"], ["y"])], [t]
    graph = helper.make_graph(nodes, "ext", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def mlp_path(tmp_path):
    """``tmp_path/in/model.onnx``: the MLP with inline weights."""
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save_model(mlp_proto(), os.fspath(path))
    return path


@pytest.fixture
def mlp_ext_path(tmp_path):
    """``tmp_path/ext/model.onnx`` + ``weights.bin``: the MLP with every weight in external data."""
    folder = tmp_path / "ext"
    folder.mkdir()
    path = folder / "model.onnx"
    save_external(mlp_proto(), path)
    return path

"""`--sensitivity-plot` always writes the plot it was asked for, or refuses before any work."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import main

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"


def two_matmuls(path, k: int) -> str:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((k, k)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((k, 8)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("MatMul", ["h", "w2"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [w1, w2],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return str(path)


def test_plot_is_written_even_when_no_layer_was_quantized(tmp_path, capsys) -> None:
    """The reproducer: two small MatMuls, --quantize dynamic: exit 0 and no plot."""
    model, plot = two_matmuls(tmp_path / "m.onnx", 16), tmp_path / "plot.png"
    code = main(
        [
            "optimize",
            model,
            "-o",
            str(tmp_path / "o.onnx"),
            "--quantize",
            "dynamic",
            "--sensitivity-plot",
            str(plot),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert plot.read_bytes().startswith(PNG)
    assert "nothing to measure, no layer was quantized: weight smaller than min_size" in out
    assert f"wrote {plot}" in out


def test_plot_of_quantized_layers(tmp_path, capsys) -> None:
    model, plot = two_matmuls(tmp_path / "m.onnx", 64), tmp_path / "plot.png"
    code = main(
        [
            "optimize",
            model,
            "-o",
            str(tmp_path / "o.onnx"),
            "--quantize",
            "dynamic",
            "--sensitivity",
            "--sensitivity-plot",
            str(plot),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert plot.read_bytes().startswith(PNG)
    assert "per-layer sensitivity (each layer quantized alone" in out and "mm1" in out


def test_missing_matplotlib_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch) -> None:
    model = two_matmuls(tmp_path / "m.onnx", 16)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = main(
        [
            "optimize",
            model,
            "-o",
            str(tmp_path / "o.onnx"),
            "--quantize",
            "dynamic",
            "--sensitivity-plot",
            str(tmp_path / "plot.png"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs matplotlib" in err[0]
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]

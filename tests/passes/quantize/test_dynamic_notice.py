"""quantize-dynamic never reports a no-op as a plain success: its report row carries a one-line
``summary`` (layers and share of the weights quantized) and, when under half of the weights were
quantized (a CNN: Conv stays float), a ``notice`` naming the mode that would help; the CLI prints
the notice as one line on stderr and exits 0."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.cli import main


def cnn(seed: int = 0) -> onnx.ModelProto:
    """Two 3x3 convolutions (most of the weights), global pooling and a linear head."""
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node("Relu", ["c2"], ["r2"]),
            helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
            helper.make_node("Flatten", ["gap"], ["flat"]),
            helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], transB=1),
        ],
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [
            init("w1", 32, 3, 3, 3),
            init("b1", 32),
            init("w2", 64, 32, 3, 3),
            init("b2", 64),
            init("fc_w", 10, 64),
            init("fc_b", 10),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def mlp(seed: int = 0) -> onnx.ModelProto:
    """MatMul+Add, Relu, MatMul+Add: every weight has an int8 dynamic kernel."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((64, 128)) * 0.1).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(128, np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((128, 32)) * 0.1).astype(np.float32), "w2"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["m1"]),
            helper.make_node("Add", ["m1", "b1"], ["a1"]),
            helper.make_node("Relu", ["a1"], ["r1"]),
            helper.make_node("MatMul", ["r1", "w2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _quantize_row(proto: onnx.ModelProto):
    result = graphopt.optimize(graphopt.load(proto), target="ort-cpu", quantize="dynamic")
    return result, next(p for p in result.report.passes if p.name == "quantize")


def test_cnn_report_says_nothing_was_quantized_and_which_mode_would_help() -> None:
    result, row = _quantize_row(cnn())
    assert not row.modified
    assert row.details["summary"].startswith("dynamic int8 quantized 0 of 3 ")
    notice = row.details["notice"]
    assert "0% of the float weights" in notice and "Conv" in notice
    assert "--quantize static with --calibration" in notice
    assert "\n" not in notice
    ops = {n.op_type for n in result.model.graph}
    assert not ops & {"ConvInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}


def test_model_of_matmuls_gets_a_summary_and_no_notice() -> None:
    _, row = _quantize_row(mlp())
    assert row.modified
    assert row.details["summary"] == "dynamic int8 quantized 2 of 2 MatMul layers (99% of the float weights)"
    assert "notice" not in row.details


def test_matmuls_all_kept_float_name_the_reason() -> None:
    """Nothing quantized for a reason the user controls: the notice names it."""
    result = graphopt.optimize(
        graphopt.load(mlp()), target="ort-cpu", pipeline="cleanup,quantize(mode=dynamic,min_size=100000)"
    )
    row = next(p for p in result.report.passes if p.name == "quantize")
    assert "kept float: weight smaller than min_size" in row.details["notice"]


@pytest.fixture
def cnn_path(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn(), os.fspath(path))
    return path


def test_cli_prints_the_notice_on_stderr_and_exits_0(tmp_path, capsys, cnn_path) -> None:
    out = tmp_path / "out.onnx"
    code = main(["optimize", os.fspath(cnn_path), "-o", os.fspath(out), "--quantize", "dynamic"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert out.exists() and "wrote" in stdout
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("graphopt: notice: dynamic int8 quantized 0 of 3 ")
    assert "--quantize static with --calibration" in lines[0]


def test_cli_is_quiet_when_the_mode_helps(tmp_path, capsys) -> None:
    path, out = tmp_path / "mlp.onnx", tmp_path / "out.onnx"
    onnx.save(mlp(), os.fspath(path))
    code = main(["optimize", os.fspath(path), "-o", os.fspath(out), "--quantize", "dynamic"])
    _, err = capsys.readouterr()
    assert code == 0 and "notice" not in err


def branchy() -> onnx.ModelProto:
    """All the weights inside an If's branches (as in a voice-activity model with a branch per
    sample rate): a Conv in each."""
    rng = np.random.default_rng(0)

    def branch(name: str) -> onnx.GraphProto:
        w = numpy_helper.from_array(
            (rng.standard_normal((16, 3, 3, 3)) * 0.1).astype(np.float32), f"{name}_w"
        )
        return helper.make_graph(
            [helper.make_node("Conv", ["x", f"{name}_w"], [f"{name}_y"], pads=[1, 1, 1, 1])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)],
            [w],
        )

    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else"))],
        "branchy",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_weights_inside_subgraphs_are_named_not_a_mode_that_cannot_reach_them() -> None:
    _, row = _quantize_row(branchy())
    notice = row.details["notice"]
    assert "0 of 2 Conv layers" in notice
    assert "100% of the weights sit inside If/Loop subgraphs" in notice
    assert "--quantize static" not in notice

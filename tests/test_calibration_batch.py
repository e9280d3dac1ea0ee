"""Stacked samples for a model with a static batch (issue 18, defect 8): a calibration or
``--inputs`` .npz holding N samples is split into the batches the model takes instead of being fed
whole (ONNX Runtime refuses a batch of N for an input declared [1, ...]); a symbolic batch still
takes the file whole."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.calibration import CalibrationData, CalibrationError, stream_tensors
from graphopt.cli import main
from graphopt.verify import verify

RNG = np.random.default_rng(8)
W = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)


def conv(batch: int | str = 1, state: bool = False) -> onnx.ModelProto:
    """Conv + Relu on [batch, 3, 8, 8]; with ``state``, a second input [2, 1, 4] (a recurrent
    state, shared by every sample) added to the output's first channels."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 8, 8])]
    if state:
        nodes.append(helper.make_node("ReduceSum", ["s"], ["s_sum"], keepdims=0))
        inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 1, 4]))
        outputs.append(helper.make_tensor_value_info("s_sum", TensorProto.FLOAT, []))
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(W, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _npz(tmp_path, name: str = "data.npz", **arrays) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return os.fspath(path)


def _samples(n: int) -> np.ndarray:
    return RNG.standard_normal((n, 3, 8, 8)).astype(np.float32)


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([os.fspath(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# Calibration


@pytest.mark.parametrize(("batch", "parts"), [(1, 8), (2, 4)])
def test_stacked_samples_are_split_by_the_static_batch(tmp_path, batch, parts) -> None:
    path = _npz(tmp_path, x=_samples(8))
    data = CalibrationData.from_any(path)
    data.check(graphopt.load(conv(batch)))  # refused before: "needs 1 on axis 0; reshape the data"
    shapes = [b["x"].shape for b in data.batches()]
    assert shapes == [(batch, 3, 8, 8)] * parts
    assert [b["x"].shape for b in data.batches(limit=3)] == [(batch, 3, 8, 8)] * 3
    first = next(iter(data.batches()))["x"]
    np.testing.assert_array_equal(first, np.load(path)["x"][:batch])


def test_static_int8_calibrates_on_stacked_samples(tmp_path) -> None:
    path = _npz(tmp_path, x=_samples(8))
    result = graphopt.optimize(conv(1), quantize="static", calibration=path)
    (row,) = [p for p in result.report.passes if p.name == "quantize"]
    assert row.details["calibration"]["batches"] == 8


def test_cli_static_int8_on_stacked_samples(tmp_path, capsys) -> None:
    model_path = tmp_path / "m.onnx"
    onnx.save(conv(1), model_path)
    path = _npz(tmp_path, x=_samples(6))
    out = tmp_path / "q.onnx"
    code, _, err = cli(
        capsys, "optimize", model_path, "-o", out, "--quantize", "static", "--calibration", path
    )
    assert code == 0, err
    assert out.exists()


def test_symbolic_batch_takes_the_file_whole(tmp_path) -> None:
    data = CalibrationData.from_any(_npz(tmp_path, x=_samples(8)))
    data.check(graphopt.load(conv("batch")))
    assert [b["x"].shape for b in data.batches()] == [(8, 3, 8, 8)]


def test_array_that_fits_goes_with_every_part(tmp_path) -> None:
    state = RNG.standard_normal((2, 1, 4)).astype(np.float32)
    data = CalibrationData.from_any(_npz(tmp_path, x=_samples(3), s=state))
    data.check(graphopt.load(conv(1, state=True)))
    parts = list(data.batches())
    assert len(parts) == 3 and all(np.array_equal(p["s"], state) for p in parts)


def test_different_sample_counts_are_refused(tmp_path, capsys) -> None:
    path = _npz(tmp_path, x=_samples(4), s=RNG.standard_normal((6, 1, 4)).astype(np.float32))
    with pytest.raises(
        CalibrationError, match=r"stacks different numbers of samples per input \(s: 3, x: 4\)"
    ):
        CalibrationData.from_any(path).check(graphopt.load(conv(1, state=True)))
    model_path = tmp_path / "m.onnx"
    onnx.save(conv(1, state=True), model_path)
    out = tmp_path / "q.onnx"
    code, _, err = cli(
        capsys, "optimize", model_path, "-o", out, "--quantize", "static", "--calibration", path
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "same number of samples" in err
    assert not out.exists()


def test_stream_tensors_splits_data_never_checked_against_the_model(tmp_path) -> None:
    # a pass given calibration=PATH as its own option reads the file without optimize()'s check
    data = CalibrationData.from_any(_npz(tmp_path, x=_samples(5)))
    values = list(stream_tensors(conv(1), ["c"], data))
    assert len(values) == 5 and all(v["c"].shape == (1, 4, 8, 8) for v in values)


# ---------------------------------------------------------------------------------------------
# Verification inputs


def test_verify_runs_stacked_inputs_batch_by_batch(tmp_path) -> None:
    model = conv(1)
    path = _npz(tmp_path, "in.npz", x=_samples(4))
    result = verify(model, model, path)  # refused before: ORT got a batch of 4 for [1, 3, 8, 8]
    assert result.passed
    assert result.outputs[0].shape == (4, 1, 4, 8, 8)  # the 4 runs, stacked
    changed = conv(1)
    changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(W * 1.5, "w"))
    assert not verify(model, changed, path).passed


def test_cli_verify_with_stacked_inputs(tmp_path, capsys) -> None:
    model_path = tmp_path / "m.onnx"
    onnx.save(conv(1), model_path)
    path = _npz(tmp_path, "in.npz", x=_samples(3))
    code, _, err = cli(capsys, "verify", model_path, model_path, "--inputs", path)
    assert code == 0, err


def test_fixed_first_dim_beside_a_symbolic_batch_is_not_split(tmp_path) -> None:
    """Silero-VAD: audio [?, ?] and a state [2, ?, 128]: the state's 2 is layers, not a batch, so
    a state stacked on axis 0 is refused as before (the samples belong on the symbolic batch)."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["s"], ["y"], keepdims=0), helper.make_node("Identity", ["a"], ["z"])],
        "g",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, None]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, None, 4]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, None]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = _npz(tmp_path, a=np.zeros((3, 16), np.float32), s=np.zeros((6, 1, 4), np.float32))
    with pytest.raises(CalibrationError, match="needs 2 on axis 0"):
        CalibrationData.from_any(path).check(graphopt.load(model))


def test_literal_minus_one_dim_is_dynamic_in_the_check(tmp_path) -> None:
    """paddle2onnx declares [-1, 3, ?, ?]: -1 is "any size", not a size the data must have."""
    model = conv(1)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    data = CalibrationData.from_any(_npz(tmp_path, x=_samples(2)))
    data.check(graphopt.load(model))  # refused before: "needs -1 on axis 0"
    assert [b["x"].shape for b in data.batches()] == [(2, 3, 8, 8)]

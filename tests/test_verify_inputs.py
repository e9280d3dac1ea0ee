"""Generated inputs real models run on (issue 18, defect 3): literal -1 dims, nets that need a
larger spatial size, scalar inputs the graph compares with constants, RNN state inputs; and the
whole, actionable error (exit 2) when no generated input runs."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import main
from graphopt.errors import GraphoptError
from graphopt.inputs import InputsError, generate_inputs, input_attempts
from graphopt.verify import ort_error_text, ort_refusal, runnable_inputs, verify

RNG = np.random.default_rng(18)


def _model(nodes, inputs, outputs, inits=(), opset: int = 17, metadata=None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(arr, name)


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([os.fspath(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _save(tmp_path, model: onnx.ModelProto, name: str = "m.onnx"):
    path = tmp_path / name
    onnx.save(model, path)
    return path


# ---------------------------------------------------------------------------------------------
# Models


def literal_dims() -> onnx.ModelProto:
    """Inputs declared with a literal -1 for "any size" (paddle2onnx writes it) and a literal 0
    (ONNX Runtime holds that one to 0: an empty tensor)."""
    return _model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["z"], ["w"])],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, -1, -1]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [0]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, -1, -1]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [0]),
        ],
    )


def strided_cnn(head: str) -> onnx.ModelProto:
    """Five stride-2 convs (a detector/OCR backbone), then a head with a fixed feature count:
    Flatten + Gemm over 4x2x2 features, or a Reshape to a constant [1, 16]. Runs only where the
    last feature map is 2x2: inputs of 33..64, so not at the default 8 nor at 16 or 32."""
    nodes, inits = [], []
    prev, ch = "x", 3
    for i in range(5):
        w = RNG.standard_normal((4, ch, 3, 3)).astype(np.float32) * 0.3
        inits.append(_init(f"w{i}", w))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], strides=[2, 2], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev, ch = f"r{i}", 4
    if head == "gemm":
        inits += [_init("fc", RNG.standard_normal((16, 5)).astype(np.float32))]
        nodes += [
            helper.make_node("Flatten", [prev], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "fc"], ["y"]),
        ]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])
    else:
        inits += [_init("shape", np.array([1, 16], np.int64))]
        nodes += [helper.make_node("Reshape", [prev, "shape"], ["y"])]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    return _model(nodes, [x], [out], inits, opset=12)


def _branch(name: str, nodes, out: str, rank: int) -> onnx.GraphProto:
    shape = [f"{out}_{i}" for i in range(rank)]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)])


def _raising_branch(name: str, out: str, rank: int) -> onnx.GraphProto:
    """A branch that fails at run time: 12 elements reshaped to 5 (a [5, 1, ...] of ``rank``)."""
    target = np.array([5] + [1] * (rank - 1), np.int64)
    return _branch(
        name,
        [
            helper.make_node("Constant", [], [f"{name}_x"], value=_init("v", np.zeros(12, np.float32))),
            helper.make_node("Constant", [], [f"{name}_s"], value=_init("s", target)),
            helper.make_node("Reshape", [f"{name}_x", f"{name}_s"], [out]),
        ],
        out,
        rank,
    )


def sample_rate(valid_rate: int = 16000, match_is_valid: bool = True) -> onnx.ModelProto:
    """A voice-activity-style model: an int64 scalar ``sr`` compared with a constant decides an If;
    the wrong branch raises. ``match_is_valid``: the branch taken when ``sr`` equals the constant
    is the one that runs (else only a rate other than the constant runs)."""
    good = _branch(f"good{valid_rate}", [helper.make_node("Sigmoid", ["audio"], ["g_out"])], "g_out", 2)
    bad = _raising_branch("bad", "b_out", 2)
    then_b, else_b = (good, bad) if match_is_valid else (bad, good)
    return _model(
        [
            helper.make_node("Equal", ["sr", "rate"], ["is_rate"]),
            helper.make_node("If", ["is_rate"], ["y"], then_branch=then_b, else_branch=else_b),
        ],
        [
            helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", "samples"]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["d0", "d1"])],
        [_init("rate", np.array(valid_rate, np.int64))],
        opset=13,
    )


HIDDEN, FEAT = 8, 4


def _lstm_weights(prefix: str = "") -> list[onnx.TensorProto]:
    return [
        _init(f"{prefix}W", RNG.standard_normal((1, 4 * HIDDEN, FEAT)).astype(np.float32) * 0.3),
        _init(f"{prefix}R", RNG.standard_normal((1, 4 * HIDDEN, HIDDEN)).astype(np.float32) * 0.3),
        _init(f"{prefix}B", RNG.standard_normal((1, 8 * HIDDEN)).astype(np.float32) * 0.1),
    ]


def lstm_state() -> onnx.ModelProto:
    """Data [batch, seq, 4] and LSTM initial states declared [1, ?, 8]: the state's free dim is
    the data's batch, which the names do not say."""
    return _model(
        [
            helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
            helper.make_node(
                "LSTM", ["xt", "W", "R", "B", "", "h0", "c0"], ["Y", "Yh", "Yc"], hidden_size=HIDDEN
            ),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", FEAT]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, None, HIDDEN]),
            helper.make_tensor_value_info("c0", TensorProto.FLOAT, [1, None, HIDDEN]),
        ],
        [
            helper.make_tensor_value_info("Yh", TensorProto.FLOAT, [1, "b", HIDDEN]),
            helper.make_tensor_value_info("Yc", TensorProto.FLOAT, [1, "b", HIDDEN]),
        ],
        _lstm_weights(),
        opset=13,
    )


def vad_like() -> onnx.ModelProto:
    """Silero-VAD's shape: audio [?, ?], a stacked state [2, ?, 8] and an int64 ``sr`` scalar;
    ``If(sr == 16000)`` holds the network, whose LSTM takes the state's two halves as initial
    states, each Gathered inside a nested If (the branch output is the If's output); the other
    branch raises. The state's free dim is the audio's batch."""

    def half(tag: str, index: str) -> onnx.GraphProto:
        return _branch(
            f"half_{tag}",
            [
                helper.make_node("Gather", ["state", index], [f"h_{tag}"], axis=0),
                helper.make_node("Unsqueeze", [f"h_{tag}", "ax"], [f"h3_{tag}"]),
            ],
            f"h3_{tag}",
            3,
        )

    inner = [
        helper.make_node("Constant", [], ["i0"], value=_init("i0", np.array(0, np.int64))),
        helper.make_node("Constant", [], ["i1"], value=_init("i1", np.array(1, np.int64))),
        helper.make_node("Constant", [], ["ax"], value=_init("ax", np.array([0], np.int64))),
        helper.make_node("If", ["is16k"], ["h3"], then_branch=half("h", "i0"), else_branch=half("h2", "i0")),
        helper.make_node("If", ["is16k"], ["c3"], then_branch=half("c", "i1"), else_branch=half("c2", "i1")),
        helper.make_node("Constant", [], ["shp"], value=_init("shp", np.array([0, -1, FEAT], np.int64))),
        helper.make_node("Reshape", ["audio", "shp"], ["frames"]),  # [batch, samples/4, 4]
        helper.make_node("Transpose", ["frames"], ["xt"], perm=[1, 0, 2]),
        helper.make_node(
            "LSTM", ["xt", "W", "R", "B", "", "h3", "c3"], ["Y", "Yh", "Yc"], hidden_size=HIDDEN
        ),
        helper.make_node("Concat", ["Yh", "Yc"], ["new_state"], axis=0),
    ]
    good = _branch("net", inner, "new_state", 3)
    bad = _raising_branch("bad", "b_out", 3)
    return _model(
        [
            helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
            helper.make_node("If", ["is16k"], ["stateN"], then_branch=good, else_branch=bad),
        ],
        [
            helper.make_tensor_value_info("audio", TensorProto.FLOAT, [None, None]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, HIDDEN]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("stateN", TensorProto.FLOAT, ["s0", "s1", "s2"])],
        [_init("rate", np.array(16000, np.int64)), *_lstm_weights()],
        opset=13,
    )


def never_runs() -> onnx.ModelProto:
    """Reshapes its input to exactly 5 elements: no generated size fits (11 is prime to 8's powers)."""
    return _model(
        [helper.make_node("Reshape", ["x", "s"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])],
        [_init("s", np.array([5], np.int64))],
    )


def hinted(size: int = 96) -> onnx.ModelProto:
    """Needs exactly ``size`` x ``size`` (a Reshape to a constant), which its metadata states
    (``imgsz``, as detector exports record it) and no size of the growth series hits."""
    return _model(
        [helper.make_node("Reshape", ["x", "s"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, size * size])],
        [_init("s", np.array([1, size * size], np.int64))],
        metadata={"imgsz": f"[{size}, {size}]"},
    )


# ---------------------------------------------------------------------------------------------
# Literal -1 / 0 dims


def test_literal_negative_and_zero_dims_are_free() -> None:
    feeds = generate_inputs(literal_dims())  # numpy raised "negative dimensions are not allowed"
    assert feeds["x"].shape == (1, 3, 8, 8)  # the first dim is the batch, the others free
    assert feeds["z"].shape == (0,)
    assert verify(literal_dims(), literal_dims()).passed


def test_literal_dims_via_cli_verify_exit_0(tmp_path, capsys) -> None:
    path = _save(tmp_path, literal_dims())
    code, out, err = cli(capsys, "verify", path, path)
    assert code == 0, err
    assert "ok" in out


def test_unnamed_dims_can_be_given_as_input_axis(tmp_path, capsys) -> None:
    assert runnable_inputs(literal_dims(), dims={"x:2": 5, "x:3": 6})["x"].shape == (1, 3, 5, 6)
    path = _save(tmp_path, literal_dims())
    code, _, err = cli(capsys, "verify", path, path, "--dim", "x:2=16")
    assert code == 0, err


def test_negative_dim_given_is_bad_input(tmp_path, capsys) -> None:
    path = _save(tmp_path, strided_cnn("gemm"))
    code, _, err = cli(capsys, "verify", path, path, "--dim", "height=-3")  # exit 3 before
    assert code == 2 and len(err.strip().splitlines()) == 1 and "size >= 0" in err
    with pytest.raises(InputsError, match="sizes >= 0"):
        generate_inputs(strided_cnn("gemm"), dims={"height": -3})


# ---------------------------------------------------------------------------------------------
# Sizes the model runs with


@pytest.mark.parametrize("head", ["gemm", "reshape"])
def test_strided_cnn_runs_at_a_grown_size(head) -> None:
    model = strided_cnn(head)
    with pytest.raises(GraphoptError, match="cannot run"):  # the default size does not run
        verify(model, model, {"x": generate_inputs(model)["x"]})
    feeds = runnable_inputs(model)
    assert feeds["x"].shape == (1, 3, 64, 64)
    result = verify(model, model)
    assert result.passed and result.inputs["x"].shape == (1, 3, 64, 64)


def test_user_dims_are_kept_and_others_grown() -> None:
    model = strided_cnn("gemm")
    assert runnable_inputs(model, dims={"height": 40})["x"].shape == (1, 3, 40, 64)
    with pytest.raises(InputsError, match="--dim NAME=SIZE"):
        runnable_inputs(model, dims={"height": 8, "width": 8})  # the user's sizes are kept


def test_strided_cnn_via_cli_verify_and_optimize_verify(tmp_path, capsys) -> None:
    path = _save(tmp_path, strided_cnn("reshape"))
    code, _, err = cli(capsys, "verify", path, path)
    assert code == 0, err
    out = tmp_path / "out.onnx"
    code, _, err = cli(capsys, "optimize", path, "-o", out, "--verify")
    assert code == 0, err
    assert out.exists()


def test_numeric_check_after_each_pass_uses_runnable_sizes() -> None:
    import graphopt

    result = graphopt.optimize(strided_cnn("gemm"), numeric_each=True, verify=True)
    assert result.report.verification.passed


def test_size_from_metadata_is_tried() -> None:
    feeds = runnable_inputs(hinted(96))
    assert feeds["x"].shape == (1, 1, 96, 96)


def test_attempts_are_deterministic() -> None:
    model = strided_cnn("gemm")
    a = list(input_attempts(model, seed=3))
    b = list(input_attempts(model, seed=3))
    assert [label for label, _ in a] == [label for label, _ in b]
    assert all(np.array_equal(fa["x"], fb["x"]) for (_, fa), (_, fb) in zip(a, b))
    assert a[0][1]["x"].shape == (1, 3, 8, 8)
    sizes = [f["x"].shape[2] for _, f in a]
    assert sizes == sorted(sizes) and 32 in sizes and 64 in sizes
    np.testing.assert_array_equal(runnable_inputs(model)["x"], runnable_inputs(model)["x"])


def test_growth_stays_under_the_memory_bound() -> None:
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "c", "d", "e"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "c", "d", "e"])],
    )
    assert all(f["x"].size <= 1 << 24 for _, f in input_attempts(model))


def test_refusal_oracle_uses_runnable_sizes() -> None:
    # asked after a pass fails: a model that runs at a grown size is not "refused by ORT"
    assert ort_refusal(strided_cnn("gemm")) is None
    assert "cannot be reshaped" in (ort_refusal(never_runs()) or "")


def test_refusal_oracle_runs_the_users_inputs_when_given() -> None:
    # never_runs() runs on a [1, 5] input: with the user's data, a pass failure is not blamed on it
    assert ort_refusal(never_runs(), inputs={"x": np.ones((1, 5), np.float32)}) is None
    assert "cannot be reshaped" in (
        ort_refusal(never_runs(), inputs={"x": np.ones((1, 6), np.float32)}) or ""
    )


# ---------------------------------------------------------------------------------------------
# Scalars compared with constants


@pytest.mark.parametrize("rate", [16000, 8000])
def test_sample_rate_scalar_takes_the_compared_constant(rate) -> None:
    model = sample_rate(rate)
    feeds = generate_inputs(model)
    assert feeds["sr"].shape == () and feeds["sr"].dtype == np.int64 and int(feeds["sr"]) == rate
    result = verify(model, model)
    assert result.passed and int(result.inputs["sr"]) == rate


def test_sample_rate_scalar_other_branch_is_tried() -> None:
    model = sample_rate(16000, match_is_valid=False)  # only a rate other than 16000 runs
    feeds = runnable_inputs(model)
    assert int(feeds["sr"]) != 16000
    assert verify(model, model).passed


def test_compared_constant_is_tried_at_larger_sizes_before_other_values() -> None:
    """The 16 kHz branch needs frames of 32 samples; the other branch runs at any size: the
    constant at a grown size wins over a made-up rate at the default size."""
    frames = _branch(
        "frames",
        [
            helper.make_node("Constant", [], ["fshape"], value=_init("fs", np.array([1, -1, 32], np.int64))),
            helper.make_node("Reshape", ["audio", "fshape"], ["f_out"]),
        ],
        "f_out",
        3,
    )
    other = _branch(
        "other",
        [
            helper.make_node("Constant", [], ["ax0"], value=_init("ax0", np.array([0], np.int64))),
            helper.make_node("Unsqueeze", ["audio", "ax0"], ["o_out"]),
        ],
        "o_out",
        3,
    )
    model = _model(
        [
            helper.make_node("Equal", ["sr", "rate"], ["is_rate"]),
            helper.make_node("If", ["is_rate"], ["y"], then_branch=frames, else_branch=other),
        ],
        [
            helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", "samples"]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["d0", "d1", "d2"])],
        [_init("rate", np.array(16000, np.int64))],
        opset=13,
    )
    feeds = runnable_inputs(model)
    assert int(feeds["sr"]) == 16000 and feeds["audio"].shape == (1, 32)


def test_sample_rate_via_cli_verify(tmp_path, capsys) -> None:
    path = _save(tmp_path, sample_rate(16000))
    code, _, err = cli(capsys, "verify", path, path)
    assert code == 0, err


def test_uncompared_scalar_int_is_small_positive() -> None:
    model = _model(
        [helper.make_node("Cast", ["k"], ["y"], to=TensorProto.FLOAT)],
        [helper.make_tensor_value_info("k", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    values = {int(generate_inputs(model, seed=s)["k"]) for s in range(20)}
    assert values and min(values) >= 1 and max(values) < 8


# ---------------------------------------------------------------------------------------------
# RNN state inputs


def test_lstm_state_free_dim_is_the_batch() -> None:
    model = lstm_state()
    feeds = generate_inputs(model)
    assert feeds["x"].shape == (1, 8, FEAT)
    assert feeds["h0"].shape == (1, 1, HIDDEN) and feeds["c0"].shape == (1, 1, HIDDEN)
    assert verify(model, model).passed


def test_vad_like_model_state_through_if_and_sample_rate(tmp_path, capsys) -> None:
    model = vad_like()
    feeds = runnable_inputs(model)
    assert feeds["state"].shape == (2, 1, HIDDEN) and int(feeds["sr"]) == 16000
    assert feeds["audio"].shape[0] == 1 and feeds["audio"].shape[1] % FEAT == 0
    path = _save(tmp_path, model)
    code, _, err = cli(capsys, "verify", path, path)
    assert code == 0, err
    code, _, err = cli(capsys, "optimize", path, "-o", tmp_path / "out.onnx", "--verify")
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# When nothing runs: one whole line, what to do, exit 2


def test_no_generated_input_runs_error_is_whole_and_says_what_to_do() -> None:
    with pytest.raises(InputsError) as info:
        verify(never_runs(), never_runs())
    msg = str(info.value)
    assert isinstance(info.value, GraphoptError) and info.value.exit_code == 2
    assert msg.startswith("reference model cannot run on ONNX Runtime: ")
    assert "cannot be reshaped" in msg  # what failed
    assert "generated input sets" in msg and "n = " in msg  # what was tried
    assert msg.endswith(
        "give real inputs with --inputs FILE.npz (named arrays) or sizes with --dim NAME=SIZE "
        "(INPUT:AXIS=SIZE for an unnamed dim)"
    )
    assert "\n" not in msg and "onnxruntime_src" not in msg


def test_no_generated_input_runs_cli_exit_2_nothing_written(tmp_path, capsys) -> None:
    path = _save(tmp_path, never_runs())
    code, out, err = cli(capsys, "verify", path, path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: reference model cannot run")
    assert lines[0].endswith("--dim NAME=SIZE (INPUT:AXIS=SIZE for an unnamed dim)")
    out_path = tmp_path / "out.onnx"
    code, _, err = cli(capsys, "optimize", path, "-o", out_path, "--verify")
    assert code == 2, err
    assert not out_path.exists()


def test_ort_error_text_is_one_whole_line() -> None:
    raw = (
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Add node. "
        "Name:'Add.178' Status Message: /onnxruntime_src/onnxruntime/core/framework/op_kernel.cc:87 "
        "virtual OrtValue* onnxruntime::OpKernelContext::OutputMLValue(int, const onnxruntime::TensorShape&) "
        "[ONNXRuntimeError] : 1 : FAIL : Shape mismatch attempting to re-use buffer. {1,96,1,1} != "
        "{1,96,2,2}. Validate usage of dim_value\n"
    )
    text = ort_error_text(RuntimeError(raw))
    assert text == (
        "Non-zero status code returned while running Add node. Name:'Add.178' Status Message: Shape "
        "mismatch attempting to re-use buffer. {1,96,1,1} != {1,96,2,2}. Validate usage of dim_value"
    )
    long = " ".join(f"Sentence number {i} says something." for i in range(40))
    cut = ort_error_text(RuntimeError(long))
    assert cut.endswith("something. (...)") and len(cut) < 420

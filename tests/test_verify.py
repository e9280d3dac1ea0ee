"""graphopt.verify: generated inputs, running on ONNX Runtime, per-output comparison and reporting."""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import GraphoptError
from graphopt.inputs import generate_inputs, load_inputs
from graphopt.verify import (
    OutputComparison,
    VerificationResult,
    run_model,
    verify,
)

RNG = np.random.default_rng(1)
W = RNG.standard_normal((4, 3)).astype(np.float32)
B = RNG.standard_normal(3).astype(np.float32)


def _model(nodes, inputs, outputs, inits=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def mlp(w: np.ndarray = W, out_name: str = "y") -> onnx.ModelProto:
    """MatMul + Add + Relu with a symbolic batch dim."""
    return _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["hb"]),
            helper.make_node("Relu", ["hb"], [out_name]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(B, "b")],
    )


def embedding() -> onnx.ModelProto:
    """Token ids (vocab 50) → embedding; a second table of 10 rows reached through Cast+Unsqueeze;
    an attention mask and position ids; an unrelated integer input."""
    rng = np.random.default_rng(2)
    table = rng.standard_normal((50, 6)).astype(np.float32)
    small = rng.standard_normal((10, 6)).astype(np.float32)
    pos_table = rng.standard_normal((64, 6)).astype(np.float32)
    return _model(
        [
            helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
            helper.make_node("Cast", ["type_ids"], ["type64"], to=TensorProto.INT64),
            helper.make_node("Unsqueeze", ["type64", "axes"], ["type_u"]),
            helper.make_node("Gather", ["small", "type_u"], ["temb4"]),
            helper.make_node("Gather", ["table", "type_ids"], ["temb_big"]),
            helper.make_node("Gather", ["pos_table", "position_ids"], ["pemb"]),
            helper.make_node("Add", ["emb", "pemb"], ["sum"]),
            helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["maskf", "axes_last"], ["mask3"]),
            helper.make_node("Mul", ["sum", "mask3"], ["y"]),
            helper.make_node("Cast", ["other"], ["y2"], to=TensorProto.FLOAT),
        ],
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("type_ids", TensorProto.INT32, ["batch", "seq"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("other", TensorProto.INT64, [None, 5]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 6]),
            helper.make_tensor_value_info("temb4", TensorProto.FLOAT, [1, "batch", "seq", 6]),
            helper.make_tensor_value_info("temb_big", TensorProto.FLOAT, ["batch", "seq", 6]),
            helper.make_tensor_value_info("y2", TensorProto.FLOAT, [None, 5]),
        ],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(small, "small"),
            numpy_helper.from_array(pos_table, "pos_table"),
            numpy_helper.from_array(np.array([0], np.int64), "axes"),
            numpy_helper.from_array(np.array([-1], np.int64), "axes_last"),
        ],
    )


def two_outputs(shift: int = 0) -> onnx.ModelProto:
    """A float output and an int64 ArgMax output; ``shift`` adds to the int output."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["scores"]),
        helper.make_node("ArgMax", ["scores"], ["raw"], axis=1, keepdims=0),
        helper.make_node("Add", ["raw", "shift"], ["idx"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch"]),
        ],
        [numpy_helper.from_array(W, "w"), numpy_helper.from_array(np.array(shift, np.int64), "shift")],
    )


def sqrt_model(abs_first: bool) -> onnx.ModelProto:
    """y = sqrt(x) (NaN for negative x), or sqrt(|x|) (never NaN)."""
    nodes = [
        helper.make_node("Abs" if abs_first else "Identity", ["x"], ["t"]),
        helper.make_node("Sqrt", ["t"], ["y"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )


def bad_reshape(out_name: str = "y") -> onnx.ModelProto:
    """Valid ONNX that fails at run time: reshapes 12 elements to 5."""
    return _model(
        [helper.make_node("Reshape", ["x", "s"], [out_name])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [5])],
        [numpy_helper.from_array(np.array([5], np.int64), "s")],
    )


# ---------------------------------------------------------------------------------------------
# Passing and failing comparisons


def test_identical_models_pass_with_zero_error() -> None:
    result = verify(mlp(), mlp())
    assert result.passed and result.error is None
    (out,) = result.outputs
    assert out.name == "y" and out.dtype == "float32" and out.shape == (1, 3)
    assert out.max_abs == 0.0 and out.max_rel == 0.0 and out.mismatches == 0
    assert out.sqnr_db == math.inf
    assert out.cosine == pytest.approx(1.0)
    assert "all 1 outputs match" in result.failure_summary()


def test_result_values_match_numpy() -> None:
    result = verify(mlp(), mlp(), dims={"batch": 5})
    x = result.inputs["x"]
    ((name, y),) = run_model(mlp(), result.inputs)
    assert name == "y"
    np.testing.assert_allclose(y, np.maximum(x @ W + B, 0), rtol=1e-5, atol=1e-6)


def test_perturbed_weight_fails_and_summary_names_output() -> None:
    w = W.copy()
    w[0, 0] += 0.5
    result = verify(mlp(), mlp(w), dims={"batch": 16})
    assert not result.passed
    (out,) = result.outputs
    assert not out.passed and out.max_abs > 1e-3 and out.mismatches > 0
    assert out.sqnr_db < 60 and out.cosine < 1.0
    summary = result.failure_summary()
    assert "'y'" in summary and "max_abs=" in summary and "max_rel=" in summary
    assert "\n" not in summary
    assert "FAIL" in result.table() and "FAIL" in str(result)


def test_tiny_difference_within_tolerance_passes() -> None:
    result = verify(mlp(), mlp(W + np.float32(1e-6)))
    assert result.passed
    assert 0 < result.outputs[0].max_abs < 1e-4
    assert math.isfinite(result.outputs[0].sqnr_db)


def test_tolerance_is_configurable() -> None:
    w = W.copy()
    w[1, 1] += 1e-2
    assert not verify(mlp(), mlp(w)).passed
    assert verify(mlp(), mlp(w), rtol=1.0, atol=1.0).passed


def test_int_output_compared_exactly() -> None:
    same = verify(two_outputs(), two_outputs(), dims={"batch": 6})
    assert same.passed and [o.name for o in same.outputs] == ["scores", "idx"]
    idx = same.outputs[1]
    assert idx.dtype == "int64" and idx.max_abs == 0 and idx.mismatches == 0 and idx.sqnr_db is None

    diff = verify(two_outputs(), two_outputs(shift=1), dims={"batch": 6})
    assert not diff.passed
    scores, idx = diff.outputs
    assert scores.passed
    assert not idx.passed and idx.mismatches == 6 and idx.max_abs == 1.0
    assert "'idx'" in diff.failure_summary() and "'scores'" not in diff.failure_summary()


def test_nan_in_same_positions_passes_and_mismatch_fails() -> None:
    x = np.array([-1.0, 4.0, -9.0, 16.0], np.float32)
    ok = verify(sqrt_model(False), sqrt_model(False), {"x": x})
    assert ok.passed and ok.outputs[0].max_abs == 0.0
    bad = verify(sqrt_model(False), sqrt_model(True), {"x": x})
    assert not bad.passed
    assert "NaN" in bad.outputs[0].note and bad.outputs[0].mismatches == 2


def test_infinities_must_match() -> None:
    def recip(scale: float) -> onnx.ModelProto:
        return _model(
            [helper.make_node("Div", ["one", "x"], ["r"]), helper.make_node("Mul", ["r", "k"], ["y"])],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
            [numpy_helper.from_array(np.float32(1), "one"), numpy_helper.from_array(np.float32(scale), "k")],
        )

    x = np.array([0.0, 2.0, -4.0], np.float32)
    assert verify(recip(1.0), recip(1.0), {"x": x}).passed
    flipped = verify(recip(1.0), recip(-1.0), {"x": x})
    assert not flipped.passed and "infinities" in flipped.outputs[0].note


def test_output_name_and_count_mismatch_fail() -> None:
    renamed = verify(mlp(), mlp(out_name="z"))
    assert not renamed.passed and "'z'" in renamed.outputs[0].note

    fewer = _model(
        [helper.make_node("MatMul", ["x", "w"], ["scores"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(W, "w")],
    )
    result = verify(two_outputs(), fewer)
    assert not result.passed
    assert [o.passed for o in result.outputs] == [True, False]
    assert "missing" in result.outputs[1].note and "'idx'" in result.failure_summary()


def test_dtype_mismatch_fails() -> None:
    as_double = _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["r"]),
            helper.make_node("Cast", ["r"], ["y"], to=TensorProto.DOUBLE),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["batch", 3])],
        [numpy_helper.from_array(W, "w"), numpy_helper.from_array(B, "b")],
    )
    result = verify(mlp(), as_double)
    assert not result.passed and "dtype" in result.outputs[0].note


def test_sequence_outputs_compared_elementwise() -> None:
    def seq(k: float) -> onnx.ModelProto:
        return _model(
            [
                helper.make_node("Mul", ["x", "k"], ["a"]),
                helper.make_node("SequenceConstruct", ["x", "a"], ["s"]),
            ],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2])],
            [numpy_helper.from_array(np.float32(k), "k")],
        )

    same = verify(seq(2.0), seq(2.0))
    assert same.passed and same.outputs[0].dtype == "sequence" and same.outputs[0].shape == (2,)
    diff = verify(seq(2.0), seq(3.0))
    assert not diff.passed and "s[1]" in diff.outputs[0].note and diff.outputs[0].max_abs > 0


def test_bfloat16_outputs_run_and_compare() -> None:
    def bf16(k: float) -> onnx.ModelProto:
        return _model(
            [
                helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
                helper.make_node("Mul", ["xf", "k"], ["mf"]),
                helper.make_node("Cast", ["mf"], ["m"], to=TensorProto.BFLOAT16),
                helper.make_node("Cast", ["m"], ["y"], to=TensorProto.FLOAT),
            ],
            [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 3])],
            [
                helper.make_tensor_value_info("m", TensorProto.BFLOAT16, [2, 3]),
                helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
            ],
            [numpy_helper.from_array(np.float32(k), "k")],
            opset=21,
        )

    feeds = generate_inputs(bf16(2.0))
    assert feeds["x"].dtype == ml_dtypes.bfloat16
    (_, m), (_, y) = run_model(bf16(2.0), feeds)
    assert m.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(m.astype(np.float32), feeds["x"].astype(np.float32) * 2)
    np.testing.assert_array_equal(y, m.astype(np.float32))
    assert verify(bf16(2.0), bf16(2.0)).passed
    diff = verify(bf16(2.0), bf16(2.5))
    assert not diff.passed and diff.outputs[0].dtype == "bfloat16"


# ---------------------------------------------------------------------------------------------
# Models that cannot run


def test_candidate_that_cannot_run_gives_failed_result() -> None:
    reference = _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
    )
    result = verify(reference, bad_reshape())
    assert result.passed is False
    assert result.error.startswith("candidate model cannot run on ONNX Runtime: ")
    assert "\n" not in result.error
    assert result.failure_summary() == result.error
    json.dumps(result.to_dict(), allow_nan=False)


def test_reference_that_cannot_run_raises() -> None:
    with pytest.raises(GraphoptError, match=r"^reference model cannot run on ONNX Runtime: .+") as info:
        verify(bad_reshape(), bad_reshape())
    assert "\n" not in str(info.value)


def test_missing_feed_for_reference_raises() -> None:
    with pytest.raises(GraphoptError, match="reference model cannot run"):
        verify(mlp(), mlp(), {"not_x": np.zeros((1, 4), np.float32)})


# ---------------------------------------------------------------------------------------------
# Generated inputs


def test_token_ids_stay_within_vocab() -> None:
    feeds = generate_inputs(embedding(), dims={"batch": 4, "seq": 64})
    ids = feeds["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (4, 64)
    assert ids.min() >= 0 and ids.max() < 50
    assert ids.max() >= 8  # the vocab bound, not the default [0, 8)
    # type_ids index a 50-row table directly and a 10-row one through Cast+Unsqueeze: min wins
    assert feeds["type_ids"].dtype == np.int32 and feeds["type_ids"].max() < 10
    np.testing.assert_array_equal(feeds["attention_mask"], np.ones((4, 64), np.int64))
    np.testing.assert_array_equal(feeds["position_ids"], np.broadcast_to(np.arange(64), (4, 64)))
    # an unnamed first dim is the batch (1), like one named "batch"
    assert feeds["other"].shape == (1, 5) and feeds["other"].min() >= 0 and feeds["other"].max() < 8
    assert verify(embedding(), embedding(), dims={"batch": 4, "seq": 64}).passed


def test_position_ids_wrap_inside_their_table() -> None:
    feeds = generate_inputs(embedding(), dims={"seq": 100})
    assert feeds["position_ids"].shape == (1, 100) and feeds["position_ids"].max() == 63


def test_dims_defaults_and_override() -> None:
    defaults = generate_inputs(embedding())
    assert defaults["input_ids"].shape == (1, 8)  # batch → 1, other symbols → 8
    assert generate_inputs(mlp(), dims={"batch": 3})["x"].shape == (3, 4)
    assert generate_inputs(embedding(), dims={"batch": 2, "seq": 5})["input_ids"].shape == (2, 5)


def test_generation_is_seeded() -> None:
    a, b = generate_inputs(mlp(), seed=3), generate_inputs(mlp(), seed=3)
    c = generate_inputs(mlp(), seed=4)
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], c["x"])
    assert a["x"].dtype == np.float32


def test_initializer_inputs_are_not_fed() -> None:
    proto = mlp()
    proto.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3]))
    assert set(generate_inputs(proto)) == {"x"}


def test_bool_and_string_inputs() -> None:
    model = _model(
        [helper.make_node("Not", ["flag"], ["nf"]), helper.make_node("Identity", ["text"], ["t"])],
        [
            helper.make_tensor_value_info("flag", TensorProto.BOOL, [5]),
            helper.make_tensor_value_info("text", TensorProto.STRING, [2]),
        ],
        [
            helper.make_tensor_value_info("nf", TensorProto.BOOL, [5]),
            helper.make_tensor_value_info("t", TensorProto.STRING, [2]),
        ],
    )
    feeds = generate_inputs(model)
    assert feeds["flag"].dtype == bool and list(feeds["text"]) == ["a", "a"]
    result = verify(model, model)
    assert result.passed and result.outputs[1].mismatches == 0


def test_sequence_input_must_be_given() -> None:
    model = _model(
        [helper.make_node("SequenceLength", ["s"], ["n"])],
        [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("n", TensorProto.INT64, [])],
    )
    with pytest.raises(GraphoptError, match="explicitly"):
        generate_inputs(model)


# ---------------------------------------------------------------------------------------------
# Input files


def test_inputs_from_npz_path_are_used(tmp_path) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4) - 3
    path = tmp_path / "in.npz"
    np.savez(path, x=x)
    result = verify(mlp(), mlp(), path)
    assert result.passed
    np.testing.assert_array_equal(result.inputs["x"], x)
    assert result.outputs[0].shape == (2, 3)


def test_load_inputs_refuses_pickled_object_arrays(tmp_path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(GraphoptError, match="object arrays are not allowed"):
        load_inputs(path)


def test_load_inputs_errors(tmp_path) -> None:
    with pytest.raises(GraphoptError, match="no such input file"):
        load_inputs(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(GraphoptError):
        load_inputs(junk)
    single = tmp_path / "one.npy"
    np.save(single, np.zeros(2))
    with pytest.raises(GraphoptError, match="named arrays"):
        load_inputs(single)


def test_load_inputs_roundtrip(tmp_path) -> None:
    path = tmp_path / "ok.npz"
    np.savez(path, a=np.ones(3, np.int64), b=np.zeros((2, 2), np.float16))
    data = load_inputs(path)
    assert set(data) == {"a", "b"} and data["b"].dtype == np.float16 and data["a"].sum() == 3


# ---------------------------------------------------------------------------------------------
# Reporting


def test_to_dict_is_strict_json() -> None:
    w = W.copy()
    w[0] += 1
    for result in (verify(mlp(), mlp()), verify(mlp(), mlp(w))):
        text = json.dumps(result.to_dict(), allow_nan=False)
        data = json.loads(text)
        assert "inputs" not in data and data["passed"] == result.passed
        assert data["outputs"][0]["name"] == "y" and data["outputs"][0]["shape"] == [1, 3]
    assert json.loads(json.dumps(verify(mlp(), mlp()).to_dict()))["outputs"][0]["sqnr_db"] == "inf"


def test_table_is_aligned() -> None:
    result = verify(two_outputs(), two_outputs(shift=2))
    lines = result.table().splitlines()
    assert lines[0].split() == ["output", "shape", "max_abs", "max_rel", "cosine", "SQNR", "dB", "ok"]
    assert lines[1].startswith("scores") and lines[1].rstrip().endswith("ok")
    assert lines[2].startswith("idx") and "FAIL" in lines[2]
    assert lines[0].index("shape") == lines[1].index("1x3")


def test_failure_summary_limits_to_first_outputs() -> None:
    outs = [OutputComparison(f"o{i}", "float32", (1,), False, 1.0, 2.0, 0.5, 3.0, 1, "") for i in range(5)]
    summary = VerificationResult(outs, False, 1e-3, 1e-4).failure_summary()
    assert "'o0'" in summary and "'o2'" in summary and "'o3'" not in summary and "2 more" in summary


def test_public_api_exposes_verify() -> None:
    assert graphopt.verify is verify and graphopt.VerificationResult is VerificationResult


def test_large_models_run_from_external_data(monkeypatch) -> None:
    import graphopt.ir

    calls = []
    real_save = graphopt.ir.save

    def spy(model, path, **kw):
        calls.append(kw)
        real_save(model, path, **kw)

    monkeypatch.setattr(graphopt.ir, "AUTO_EXTERNAL_BYTES", 0)
    monkeypatch.setattr(graphopt.ir, "save", spy)
    big_w = np.random.default_rng(3).standard_normal((4, 300)).astype(np.float32)  # over the 1 KiB threshold
    proto = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 300])],
        [numpy_helper.from_array(big_w, "w")],
    )
    x = np.ones((2, 4), np.float32)
    ((_, y),) = run_model(proto, {"x": x})
    assert calls == [{"external_data": True}]
    np.testing.assert_allclose(y, x @ big_w, rtol=1e-5)

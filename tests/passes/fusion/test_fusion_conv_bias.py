"""fuse-conv-bias: a constant per-channel Add/Sub after Conv/ConvTranspose folds into the bias
(PaddlePaddle's export of every conv bias); look-alikes that are not one value per output channel,
or whose Conv output is needed elsewhere, stay as they are. ONNX Runtime outputs unchanged."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from corpus import assert_same, run
from onnx import helper, numpy_helper

import graphopt
from graphopt.passes.fusion.composite import fusion_steps

RNG = np.random.default_rng(0)
F32 = onnx.TensorProto.FLOAT
PIPE = "cleanup,fuse-conv-bias"


def w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def make(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list[int]],
    outputs: dict[str, list[int]],
    inits: dict[str, np.ndarray],
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, F32, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, F32, s) for n, s in outputs.items()],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    onnx.checker.check_model(model, full_check=True)
    return model


def check(proto: onnx.ModelProto, pipeline: str = PIPE) -> tuple[ir.Model, dict[str, int]]:
    """Optimize; ORT outputs unchanged (1e-5 relative, 1e-5 absolute) and output names kept."""
    feeds = {
        i.name: RNG.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
        for i in proto.graph.input
    }
    expected = run(proto.SerializeToString(), feeds)
    result = graphopt.optimize(graphopt.load(proto), pipeline=pipeline, verify_each=True)
    got = run(graphopt.to_bytes(result.model), feeds)
    for i, (r, g) in enumerate(zip(expected, got, strict=True)):
        assert_same(r, g, rtol=1e-5, atol=1e-5, where=f"output {i}")
    assert [o.name for o in result.model.graph.outputs] == [o.name for o in proto.graph.output]
    return result.model, dict(result.report.passes[-1].stats)


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph if n.op_type != "Constant"]


def conv_bias(model: ir.Model, index: int = 0) -> np.ndarray:
    conv = [n for n in model.graph if n.op_type in ("Conv", "ConvTranspose")][index]
    return conv.inputs[2].const_value.numpy()  # type: ignore[union-attr]


@pytest.mark.parametrize("opset", [11, 17])
def test_paddle_conv_bias_folds(opset: int) -> None:
    # Paddle writes Conv → Add(Reshape(bias[C], [1, C, 1, 1])); cleanup folds the Reshape.
    b = w(6)
    proto = make(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Reshape", ["b", "shape"], ["b4"]),
            helper.make_node("Add", ["c", "b4"], ["y"]),
        ],
        {"x": [2, 3, 5, 5]},
        {"y": [2, 6, 5, 5]},
        {"w": w(6, 3, 3, 3), "b": b, "shape": np.array([1, 6, 1, 1], np.int64)},
        opset,
    )
    m, stats = check(proto)
    assert ops(m) == ["Conv"] and stats == {"conv": 1}
    assert m.graph.node(0).metadata_props["graphopt.rule"] == "fuse-conv-bias/conv"
    np.testing.assert_array_equal(conv_bias(m), b)


@pytest.mark.parametrize(
    ("c", "swap"),
    [
        (w(1, 4, 1), False),  # [1, C, 1] on a 1-D conv output [N, C, L]
        (w(4, 1), True),  # [C, 1], constant first: c + Conv
        (np.array(0.25, np.float32), False),  # a scalar: every channel's bias + 0.25
        (np.array([[[0.25]]], np.float32), True),  # one element, rank 3
    ],
)
def test_constant_per_channel_or_single_value_folds_into_an_existing_bias(c: np.ndarray, swap: bool) -> None:
    b = w(4)
    proto = make(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["t"], group=2),
            helper.make_node("Add", ["c", "t"] if swap else ["t", "c"], ["y"]),
        ],
        {"x": [1, 2, 7]},
        {"y": [1, 4, 5]},
        {"w": w(4, 1, 3), "b": b, "c": c},
    )
    m, stats = check(proto)
    assert ops(m) == ["Conv"] and stats == {"conv": 1}
    np.testing.assert_allclose(conv_bias(m), b + np.broadcast_to(c.reshape(-1), (4,)), rtol=1e-6)


def test_sub_folds_as_negative_bias_but_not_the_reverse() -> None:
    proto = make(
        [
            helper.make_node("Conv", ["x", "w1"], ["t1"]),
            helper.make_node("Sub", ["t1", "c"], ["y1"]),
            helper.make_node("Conv", ["x", "w2"], ["t2"]),
            helper.make_node("Sub", ["c", "t2"], ["y2"]),  # c − Conv negates the output
        ],
        {"x": [1, 3, 4, 4]},
        {"y1": [1, 2, 4, 4], "y2": [1, 2, 4, 4]},
        {"w1": w(2, 3, 1, 1), "w2": w(2, 3, 1, 1), "c": w(2, 1, 1)},
    )
    m, stats = check(proto)
    assert sorted(ops(m)) == ["Conv", "Conv", "Sub"] and stats == {"conv": 1}


def test_grouped_conv_transpose_bias_folds() -> None:
    proto = make(
        [
            helper.make_node("ConvTranspose", ["x", "w"], ["t"], group=2, strides=[2, 2]),
            helper.make_node("Add", ["t", "c"], ["y"]),
        ],
        {"x": [1, 4, 3, 3]},
        {"y": [1, 6, 7, 7]},
        {"w": w(4, 3, 3, 3), "c": w(1, 6, 1, 1)},
    )
    m, stats = check(proto)
    assert ops(m) == ["ConvTranspose"] and stats == {"conv-transpose": 1}


@pytest.mark.parametrize(
    ("why", "c", "shape", "extra"),
    [
        ("[C] broadcasts over the last spatial axis, not channels", w(4), [1, 4, 5, 4], None),
        ("c broadcasts over spatial dims", w(1, 4, 5, 1), [1, 4, 5, 4], None),
        ("c broadcasts over the batch", w(2, 4, 1, 1), [2, 4, 5, 4], None),
        ("c has a larger rank than the output", w(1, 1, 4, 1, 1), [1, 1, 4, 5, 4], None),
        ("c is not constant (graph input)", None, [1, 4, 5, 4], None),
        ("the Conv output has another consumer", w(1, 4, 1, 1), [1, 4, 5, 4], "other-use"),
        ("the Conv output is a graph output", w(1, 4, 1, 1), [1, 4, 5, 4], "graph-output"),
        ("the Conv's own bias is not constant", w(1, 4, 1, 1), [1, 4, 5, 4], "input-bias"),
    ],
)
def test_not_one_value_per_channel_or_not_removable_is_left_alone(
    why: str, c: np.ndarray | None, shape: list[int], extra: str | None
) -> None:
    inits: dict[str, Any] = {"w": w(4, 3, 2, 2)}
    inputs = {"x": [shape[0] if why.endswith("batch") else 1, 3, 6, 5]}
    outputs = {"y": shape}
    conv_inputs = ["x", "w"]
    if c is None:
        inputs["c"] = [1, 4, 1, 1]
    else:
        inits["c"] = c
    if extra == "input-bias":
        inputs["b"] = [4]
        conv_inputs.append("b")
    nodes = [helper.make_node("Conv", conv_inputs, ["t"]), helper.make_node("Add", ["t", "c"], ["y"])]
    if extra == "other-use":
        nodes.append(helper.make_node("Relu", ["t"], ["r"]))
        outputs["r"] = [inputs["x"][0], 4, 5, 4]
    if extra == "graph-output":
        outputs["t"] = [1, 4, 5, 4]
    proto = make(nodes, inputs, outputs, inits)
    m, stats = check(proto)
    assert stats == {}, why
    assert "Add" in ops(m), why


def test_a_bias_shared_with_another_conv_is_copied_not_changed() -> None:
    b = w(2)
    proto = make(
        [
            helper.make_node("Conv", ["x", "w1", "b"], ["t"]),
            helper.make_node("Add", ["t", "c"], ["y1"]),
            helper.make_node("Conv", ["x", "w2", "b"], ["y2"]),
        ],
        {"x": [1, 3, 4, 4]},
        {"y1": [1, 2, 4, 4], "y2": [1, 2, 4, 4]},
        {"w1": w(2, 3, 1, 1), "w2": w(2, 3, 1, 1), "b": b, "c": w(1, 2, 1, 1)},
    )
    m, stats = check(proto)
    assert stats == {"conv": 1}
    np.testing.assert_array_equal(conv_bias(m, 1), b)


def test_every_target_folds_before_quantization() -> None:
    assert all("fuse-conv-bias" in fusion_steps(d) for d in (["standard"], ["standard", "contrib"]))
    proto = make(
        [
            helper.make_node("Conv", ["x", "w"], ["t"], pads=[1, 1, 1, 1]),
            helper.make_node("Add", ["t", "c"], ["a"]),
            helper.make_node("Relu", ["a"], ["y"]),
        ],
        {"x": [1, 3, 8, 8]},
        {"y": [1, 8, 8, 8]},
        {"w": w(8, 3, 3, 3), "c": w(1, 8, 1, 1)},
        opset=13,
    )
    calibration = [{"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    result = graphopt.optimize(
        graphopt.load(proto), target="ort-cpu", quantize={"mode": "static"}, calibration=calibration
    )
    assert "Add" not in ops(result.model)  # the bias is the Conv's, quantized as int32 with it
    conv = next(n for n in result.model.graph if n.op_type == "Conv")
    assert len(conv.inputs) == 3 and conv.inputs[2].producer().op_type == "DequantizeLinear"  # type: ignore[union-attr]


@pytest.mark.parametrize("opset", [13, 14])
def test_paddle_hardswish_after_a_conv_bias_fuses_only_where_hardswish_exists(opset: int) -> None:
    # Paddle's hardswish: x·Clip(x+3, 0, 6)/6 on the biased conv output. HardSwish exists from
    # opset 14; below that it becomes x·HardSigmoid(x) (fuse-activations emits nothing newer).
    scalars = {"three": np.array(3.0, np.float32), "zero": np.array(0.0, np.float32)}
    proto = make(
        [
            helper.make_node("Conv", ["x", "w"], ["t"], pads=[1, 1, 1, 1]),
            helper.make_node("Add", ["t", "c"], ["h"]),
            helper.make_node("Add", ["h", "three"], ["a"]),
            helper.make_node("Clip", ["a", "zero", "six"], ["cl"]),
            helper.make_node("Mul", ["h", "cl"], ["m"]),
            helper.make_node("Div", ["m", "six"], ["y"]),
        ],
        {"x": [1, 3, 6, 6]},
        {"y": [1, 4, 6, 6]},
        {"w": w(4, 3, 3, 3) * 2, "c": w(1, 4, 1, 1), "six": np.array(6.0, np.float32), **scalars},
        opset,
    )
    m, _ = check(proto, "cleanup,fuse-conv-bias,fuse-activations")
    assert ops(m) == (["Conv", "HardSwish"] if opset >= 14 else ["Conv", "HardSigmoid", "Mul"])

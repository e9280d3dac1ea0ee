"""fuse-batchnorm, fuse-gemm, fuse-shape-chains: each rule fires where it is safe (ONNX Runtime
outputs unchanged), stays away from look-alikes, and keeps graph outputs and their names."""

from __future__ import annotations

import collections
import os
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from corpus import assert_same, run
from onnx import helper, numpy_helper

import graphopt

RNG = np.random.default_rng(0)
F32 = onnx.TensorProto.FLOAT


def make(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, tuple[list[Any], int]],
    outputs: dict[str, list[Any] | None],
    inits: dict[str, np.ndarray] | None = None,
    opset: int = 17,
    ir_version: int = 8,
    out_type: int = F32,
) -> onnx.ModelProto:
    """A checked model; ``inputs``: name → (shape, elem type), ``outputs``: name → shape of type
    ``out_type`` (None: ``["y_d0", "y_d1", ...]`` of the rank ONNX shape inference finds)."""
    inits = inits or {}
    graph_inputs = [helper.make_tensor_value_info(n, t, s) for n, (s, t) in inputs.items()]
    if ir_version < 4:  # IR 3 lists every initializer as a graph input too
        graph_inputs += [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in inits.items()
        ]
    graph = helper.make_graph(
        nodes,
        "g",
        graph_inputs,
        [helper.make_tensor_value_info(n, out_type, s) for n, s in outputs.items()],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    if any(s is None for s in outputs.values()):
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        ranks = {
            vi.name: len(vi.type.tensor_type.shape.dim)
            for vi in [*inferred.graph.value_info, *inferred.graph.output]
        }
        for out in model.graph.output:
            if outputs[out.name] is None:
                out.CopyFrom(
                    helper.make_tensor_value_info(
                        out.name, out_type, [f"{out.name}_d{i}" for i in range(ranks[out.name])]
                    )
                )
    onnx.checker.check_model(model)
    return model


def feeds_for(proto: onnx.ModelProto, dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Random normal feeds of the declared shapes (symbolic dims from ``dims``)."""
    inits = {t.name for t in proto.graph.initializer}
    out = {}
    for i, vi in enumerate(proto.graph.input):
        if vi.name in inits:
            continue
        shape = [
            d.dim_value if d.HasField("dim_value") else (dims or {})[d.dim_param]
            for d in vi.type.tensor_type.shape.dim
        ]
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        rng = np.random.default_rng(i)
        out[vi.name] = (
            (rng.standard_normal(shape) * 3).astype(dtype)
            if dtype.kind in "iu"
            else rng.standard_normal(shape).astype(dtype)
        )
    return out


def check(
    proto: onnx.ModelProto,
    pipeline: str,
    dims: dict[str, int] | None = None,
    feeds: dict[str, np.ndarray] | None = None,
) -> tuple[ir.Model, dict[str, int]]:
    """Optimize; assert ORT outputs unchanged (1e-5 relative, 1e-4 absolute) and output names kept."""
    feeds = feeds_for(proto, dims) if feeds is None else feeds
    expected = run(proto.SerializeToString(), feeds)
    result = graphopt.optimize(graphopt.load(proto), pipeline=pipeline, verify_each=True)
    got = run(graphopt.to_bytes(result.model), feeds)
    for i, (r, g) in enumerate(zip(expected, got, strict=True)):
        assert_same(r, g, rtol=1e-5, atol=1e-4, where=f"output {i}")
    assert [o.name for o in result.model.graph.outputs] == [o.name for o in proto.graph.output]
    return result.model, dict(result.report.passes[-1].stats)


def ops(model: ir.Model) -> list[str]:
    """Op types in graph order; Constant nodes (axes, shapes) left out."""
    return [n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type != "Constant"]


def node(model: ir.Model, op_type: str) -> ir.Node:
    (found,) = [n for n in model.graph if n.op_type == op_type]
    return found


def bn_params(c: int, prefix: str = "", shape: tuple[int, ...] | None = None) -> dict[str, np.ndarray]:
    shape = shape or (c,)
    return {
        f"{prefix}s": RNG.uniform(0.5, 1.5, shape).astype(np.float32),
        f"{prefix}bb": RNG.standard_normal(shape).astype(np.float32),
        f"{prefix}m": RNG.standard_normal(shape).astype(np.float32),
        f"{prefix}v": RNG.uniform(0.5, 2.0, shape).astype(np.float32),
    }


def bn(x: str, y: str, prefix: str = "", **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(
        "BatchNormalization", [x, f"{prefix}s", f"{prefix}bb", f"{prefix}m", f"{prefix}v"], [y], **attrs
    )


def w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# --- fuse-batchnorm --------------------------------------------------------------------------------

BN = "cleanup,fuse-batchnorm"


def test_batchnorm_folds_into_grouped_conv_with_bias() -> None:
    proto = make(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], group=2, pads=[1, 1, 1, 1]),
            bn("c", "y", epsilon=1e-3),
        ],
        {"x": ([2, 4, 5, 5], F32)},
        {"y": [2, 6, 5, 5]},
        {"w": w(6, 2, 3, 3), "b": w(6), **bn_params(6)},
    )
    m, stats = check(proto, BN)
    assert ops(m) == ["Conv"] and stats == {"conv": 1}
    assert node(m, "Conv").metadata_props["graphopt.rule"] == "fuse-batchnorm/conv"


def test_batchnorm_folds_into_convs_without_bias_that_share_a_weight() -> None:
    # onnxscript's rule refuses a shared weight (it overwrites the weight in place); we copy it.
    proto = make(
        [
            helper.make_node("Conv", ["x1", "w"], ["c1"]),
            bn("c1", "y1", "p"),
            helper.make_node("Conv", ["x2", "w"], ["c2"]),
            bn("c2", "y2", "q"),
        ],
        {"x1": ([1, 3, 4, 4], F32), "x2": ([1, 3, 4, 4], F32)},
        {"y1": [1, 5, 4, 4], "y2": [1, 5, 4, 4]},
        {"w": w(5, 3, 1, 1), **bn_params(5, "p"), **bn_params(5, "q")},
    )
    m, stats = check(proto, BN)
    assert ops(m) == ["Conv", "Conv"] and stats == {"conv": 2}
    assert "w" not in m.graph.initializers  # the unfused original is dropped


def test_fused_tensors_never_overwrite_an_existing_initializer() -> None:
    # onnxscript names a missing bias "<weight>_bias" and its driver then replaces an initializer
    # of that name, which leaves the Add below reading a value that no longer exists.
    proto = make(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            bn("c", "y"),
            helper.make_node("Add", ["x", "w_bias"], ["z1"]),
            helper.make_node("Add", ["x", "w_bn_bias"], ["z2"]),
        ],
        {"x": ([1, 3, 1, 1], F32)},
        {"y": [1, 3, 1, 1], "z1": [1, 3, 1, 1], "z2": [1, 3, 1, 1]},
        {"w": w(3, 3, 1, 1), "w_bias": w(3, 1, 1), "w_bn_bias": w(3, 1, 1), **bn_params(3)},
    )
    m, stats = check(proto, "fuse-batchnorm")
    assert stats == {"conv": 1}
    assert {"w_bias", "w_bn_bias"} <= set(m.graph.initializers)


def test_batchnorm_folds_into_grouped_conv_transpose() -> None:
    proto = make(
        [helper.make_node("ConvTranspose", ["x", "w"], ["c"], group=2, strides=[2, 2]), bn("c", "y")],
        {"x": ([1, 4, 3, 3], F32)},
        {"y": [1, 6, 7, 7]},
        {"w": w(4, 3, 3, 3), **bn_params(6)},
    )
    m, stats = check(proto, BN)
    assert ops(m) == ["ConvTranspose"] and stats == {"conv-transpose": 1}


@pytest.mark.parametrize("trans_b", [0, 1])
def test_batchnorm_folds_into_gemm_with_alpha_and_beta(trans_b: int) -> None:
    weight = w(4, 3) if trans_b else w(3, 4)
    proto = make(
        [helper.make_node("Gemm", ["x", "w", "c"], ["g"], alpha=0.5, beta=2.0, transB=trans_b), bn("g", "y")],
        {"x": ([2, 3], F32)},
        {"y": [2, 4]},
        {"w": weight, "c": w(1, 4), **bn_params(4)},
    )
    m, stats = check(proto, BN)
    assert ops(m) == ["Gemm"] and stats == {"gemm": 1}
    assert "beta" not in node(m, "Gemm").attributes


@pytest.mark.parametrize("bias", [None, "after", "before", "row"])
def test_batchnorm_folds_into_2d_matmul(bias: str | None) -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"])]
    inits = {"w": w(3, 4), **bn_params(4)}
    if bias is not None:
        inits["c"] = w(1, 4) if bias == "row" else w(4)
        nodes.append(helper.make_node("Add", ["c", "mm"] if bias == "before" else ["mm", "c"], ["a"]))
    nodes.append(bn(nodes[-1].output[0], "y"))
    proto = make(nodes, {"x": (["N", 3], F32)}, {"y": ["N", 4]}, inits)
    m, stats = check(proto, BN, {"N": 5})
    assert ops(m) == ["MatMul", "Add"] and stats == {"matmul": 1}


def test_legacy_opset7_batchnorm_with_initializers_as_inputs_folds() -> None:
    proto = make(
        [helper.make_node("Conv", ["x", "w"], ["c"]), bn("c", "y", spatial=1, epsilon=1e-5)],
        {"x": ([1, 2, 4, 4], F32)},
        {"y": [1, 3, 4, 4]},
        {"w": w(3, 2, 3, 3), **bn_params(3)},
        opset=7,
        ir_version=3,
    )
    m, stats = check(proto, BN)
    assert ops(m) == ["Conv"] and stats == {"conv": 1}


def test_batchnorm_is_kept_when_the_conv_output_has_another_consumer() -> None:
    proto = make(
        [helper.make_node("Conv", ["x", "w"], ["c"]), bn("c", "y"), helper.make_node("Relu", ["c"], ["r"])],
        {"x": ([1, 2, 4, 4], F32)},
        {"y": [1, 3, 4, 4], "r": [1, 3, 4, 4]},
        {"w": w(3, 2, 1, 1), **bn_params(3)},
    )
    m, stats = check(proto, BN)
    assert "BatchNormalization" in ops(m) and not stats


def test_batchnorm_is_kept_when_the_conv_output_is_a_graph_output() -> None:
    proto = make(
        [helper.make_node("Conv", ["x", "w"], ["c"]), bn("c", "y")],
        {"x": ([1, 2, 4, 4], F32)},
        {"c": [1, 3, 4, 4], "y": [1, 3, 4, 4]},
        {"w": w(3, 2, 1, 1), **bn_params(3)},
    )
    m, _ = check(proto, BN)
    assert "BatchNormalization" in ops(m)


def test_batchnorm_with_a_non_constant_mean_is_kept() -> None:
    params = bn_params(3)
    mean = params.pop("m")
    proto = make(
        [helper.make_node("Conv", ["x", "w"], ["c"]), bn("c", "y")],
        {"x": ([1, 2, 4, 4], F32), "m": ([3], F32)},
        {"y": [1, 3, 4, 4]},
        {"w": w(3, 2, 1, 1), **params},
    )
    m, _ = check(proto, BN, feeds={**feeds_for(proto), "m": mean})
    assert "BatchNormalization" in ops(m)


def test_batchnorm_in_training_mode_is_kept() -> None:
    proto = make(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node(
                "BatchNormalization", ["c", "s", "bb", "m", "v"], ["y", "rm", "rv"], training_mode=1
            ),
        ],
        {"x": ([2, 2, 4, 4], F32)},
        {"y": [2, 3, 4, 4]},
        {"w": w(3, 2, 1, 1), **bn_params(3)},
        opset=15,
    )
    m, _ = check(proto, BN)
    assert "BatchNormalization" in ops(m)


def test_legacy_per_activation_batchnorm_is_kept() -> None:
    proto = make(
        [helper.make_node("Conv", ["x", "w"], ["c"]), bn("c", "y", spatial=0)],
        {"x": ([1, 2, 4, 4], F32)},
        {"y": [1, 3, 4, 4]},
        {"w": w(3, 2, 1, 1), **bn_params(3, shape=(3, 4, 4))},
        opset=7,
    )
    m, _ = check(proto, BN)
    assert "BatchNormalization" in ops(m)


@pytest.mark.parametrize("case", ["3d-input", "weight-input"])
def test_batchnorm_after_matmul_that_is_not_per_column_is_kept(case: str) -> None:
    # BN over [B, C, L] normalizes axis 1 (rows of the MatMul output), not W's output columns.
    if case == "3d-input":
        proto = make(
            [helper.make_node("MatMul", ["x", "w"], ["mm"]), bn("mm", "y")],
            {"x": ([2, 4, 3], F32)},
            {"y": [2, 4, 5]},
            {"w": w(3, 5), **bn_params(4)},
        )
    else:
        proto = make(
            [helper.make_node("MatMul", ["x", "w"], ["mm"]), bn("mm", "y")],
            {"x": ([2, 3], F32), "w": ([3, 4], F32)},
            {"y": [2, 4]},
            bn_params(4),
        )
    m, stats = check(proto, BN)
    assert "BatchNormalization" in ops(m) and not stats


# --- real models ---------------------------------------------------------------------------------------


class _Exports(dict):
    """kind → (ONNX bytes, feeds) of the tiny export, built on first use."""

    def __missing__(self, kind: str) -> tuple[bytes, dict[str, np.ndarray]]:
        from models import build

        e = build(kind, "tiny")
        self[kind] = (graphopt.to_bytes(e.export()), e.feeds())
        return self[kind]


@pytest.fixture(scope="module")
def exported() -> _Exports:
    return _Exports()


def run_export(exported: Any, kind: str, pipeline: str) -> tuple[ir.Model, dict[str, dict[str, int]]]:
    data, feeds = exported[kind]
    result = graphopt.optimize(graphopt.load(data), pipeline=pipeline, verify_each=True)
    assert_same(
        run(data, feeds), run(graphopt.to_bytes(result.model), feeds), rtol=1e-5, atol=1e-4, where=kind
    )
    return result.model, {p.name: dict(p.stats) for p in result.report.passes[1:]}


@pytest.mark.parametrize("kind", ["resnet", "cnn"])
def test_every_batchnorm_of_exported_cnns_is_folded(exported: Any, kind: str) -> None:
    m, stats = run_export(exported, kind, BN)
    assert "BatchNormalization" not in ops(m)
    assert stats["fuse-batchnorm"] == {"conv": 16 if kind == "resnet" else 2}


LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def light_reference(name: str) -> tuple[bytes, dict[str, np.ndarray]]:
    """light_<name> after cleanup with random weights (the zoo's light graphs fill every weight
    with 0.02, which would make any fold look right), and a random input."""
    model = graphopt.optimize(os.path.join(LIGHT, f"light_{name}.onnx"), "ort-cpu", pipeline="cleanup").model
    rng = np.random.default_rng(0)
    for v in model.graph.initializers.values():
        a = v.const_value.numpy()
        if a.dtype != np.float32:
            continue
        slots = {(u.op_type, i) for u, i in v.uses()}
        if ("BatchNormalization", 1) in slots or ("BatchNormalization", 4) in slots:
            a = rng.uniform(0.5, 2.0, a.shape)
        elif a.ndim > 1:
            a = rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[1:]))
        else:
            a = rng.standard_normal(a.shape) * 0.2
        v.const_value = ir.tensor(a.astype(np.float32), name=v.name)
    x = model.graph.inputs[0]
    return graphopt.to_bytes(model), {x.name: rng.standard_normal(list(x.shape)).astype(np.float32)}


@pytest.mark.parametrize(
    "name",
    [
        "shufflenet",
        pytest.param("resnet50", marks=pytest.mark.slow),
        pytest.param("densenet121", marks=pytest.mark.slow),
        pytest.param("inception_v2", marks=pytest.mark.slow),
    ],
)
def test_opset9_model_zoo_batchnorms_fold(name: str) -> None:
    data, feeds = light_reference(name)
    result = graphopt.optimize(graphopt.load(data), pipeline="fuse-batchnorm", verify_each=True)
    assert_same(run(data, feeds), run(graphopt.to_bytes(result.model), feeds), rtol=1e-4, atol=1e-5)
    left = [n for n in result.model.graph if n.op_type == "BatchNormalization"]
    # What stays: BN after Concat/pooling (DenseNet's pre-activation BN) and, in inception_v2, BNs
    # sharing one Conv (cleanup's CSE merged convolutions whose light weights are all equal).
    for n in left:
        producer = n.inputs[0].producer()
        assert producer is None or producer.op_type != "Conv" or len(n.inputs[0].uses()) > 1
    expected_left = {"shufflenet": 0, "resnet50": 0, "densenet121": 62, "inception_v2": 6}[name]
    assert len(left) == expected_left


# --- fuse-gemm -------------------------------------------------------------------------------------------

GEMM = "fuse-gemm"


@pytest.mark.parametrize(
    "bias_shape,order",
    [
        ((4,), "after"),
        ((4,), "before"),
        ((1, 4), "after"),
        ((3, 4), "after"),
        ((), "after"),
        ((3, 1), "after"),
    ],
)
def test_matmul_add_becomes_gemm(bias_shape: tuple[int, ...], order: str) -> None:
    add = helper.make_node("Add", ["mm", "c"] if order == "after" else ["c", "mm"], ["y"])
    proto = make(
        [helper.make_node("MatMul", ["x", "w"], ["mm"]), add],
        {"x": ([3, 5], F32)},
        {"y": [3, 4]},
        {"w": w(5, 4), "c": w(*bias_shape)},
    )
    m, stats = check(proto, GEMM)
    assert ops(m) == ["Gemm"] and stats == {"matmul-add": 1}


@pytest.mark.parametrize("trans", ["a", "b", "ab"])
def test_transposed_matmul_operands_become_gemm_flags(trans: str) -> None:
    nodes = []
    a, b = "x", "w"
    if "a" in trans:
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]))
        a = "xt"
    if "b" in trans:
        nodes.append(helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]))
        b = "wt"
    nodes += [helper.make_node("MatMul", [a, b], ["mm"]), helper.make_node("Add", ["mm", "c"], ["y"])]
    proto = make(
        nodes,
        {"x": ([5, 3] if "a" in trans else [3, 5], F32), "w": ([4, 5] if "b" in trans else [5, 4], F32)},
        {"y": [3, 4]},
        {"c": w(4)},
    )
    m, _ = check(proto, GEMM)
    assert ops(m) == ["Gemm"]
    gemm = node(m, "Gemm")
    assert gemm.attributes.get_int("transA", 0) == ("a" in trans)
    assert gemm.attributes.get_int("transB", 0) == ("b" in trans)


@pytest.mark.parametrize(
    "case", ["3d-input", "rank3-bias", "bias-broadcasts-the-output", "unprovable-rows", "int32"]
)
def test_matmul_add_that_gemm_cannot_express_is_kept(case: str) -> None:
    x_shape, bias, dtype, dims = [3, 5], w(4), F32, None
    if case == "3d-input":
        x_shape = [2, 3, 5]
    elif case == "rank3-bias":
        bias = w(1, 1, 4)  # Add output [1, 3, 4]: not Gemm's [M, N]
    elif case == "bias-broadcasts-the-output":
        x_shape, bias = [1, 5], w(6, 4)  # [1, 4] + [6, 4] → [6, 4]: C must broadcast *to* [M, N]
    elif case == "unprovable-rows":
        x_shape, bias, dims = ["N", 5], w(3, 4), {"N": 3}  # N == 3 only at run time
    weight = w(5, 4)
    if case == "int32":
        dtype, weight, bias = onnx.TensorProto.INT32, weight.astype(np.int32), bias.astype(np.int32)
    proto = make(
        [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "c"], ["y"])],
        {"x": (x_shape, dtype)},
        {"y": None},
        {"w": weight, "c": bias},
        out_type=dtype,
    )
    m, stats = check(proto, GEMM, dims)
    assert ops(m) == ["MatMul", "Add"] and not stats


def test_transposes_fold_into_gemm_flags() -> None:
    proto = make(
        [
            helper.make_node("Transpose", ["a"], ["at"]),  # no perm: reverses, i.e. [1, 0]
            helper.make_node("Transpose", ["b"], ["bt"], perm=[1, 0]),
            helper.make_node("Gemm", ["at", "bt", "c"], ["y"], transB=1, alpha=0.5),
        ],
        {"a": ([5, 3], F32), "b": ([5, 4], F32)},
        {"y": [3, 4]},
        {"c": w(4)},
    )
    m, stats = check(proto, GEMM)
    assert ops(m) == ["Gemm"] and stats == {"transpose-into-gemm": 1}
    gemm = node(m, "Gemm")
    assert gemm.attributes.get_int("transA", 0) == 1 and gemm.attributes.get_int("transB", 0) == 0
    assert gemm.metadata_props["graphopt.rule"] == "fuse-gemm/transpose-into-gemm"


@pytest.mark.parametrize("other_use", ["consumer", "graph-output"])
def test_transpose_with_another_use_is_kept_while_gemm_reads_its_input(other_use: str) -> None:
    nodes = [
        helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]),
        helper.make_node("MatMul", ["at", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "c"], ["y"]),
    ]
    outputs: dict[str, Any] = {"y": [3, 4]}
    if other_use == "consumer":
        nodes.append(helper.make_node("Relu", ["at"], ["r"]))
        outputs["r"] = [3, 5]
    else:
        outputs["at"] = [3, 5]
    proto = make(nodes, {"a": ([5, 3], F32)}, outputs, {"w": w(5, 4), "c": w(4)})
    m, _ = check(proto, GEMM)
    assert sorted(ops(m)) == sorted(["Transpose", "Gemm"] + (["Relu"] if other_use == "consumer" else []))
    gemm = node(m, "Gemm")
    assert gemm.inputs[0].name == "a" and gemm.attributes.get_int("transA", 0) == 1


def test_transposed_constant_weight_of_matmul_is_folded() -> None:
    proto = make(
        [
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "wt"], ["y"]),
        ],
        {"x": (["B", "S", 5], F32)},
        {"y": ["B", "S", 4]},
        {"w": w(4, 5)},
    )
    m, stats = check(proto, GEMM, {"B": 2, "S": 3})
    assert ops(m) == ["MatMul"] and stats == {"transpose-weight": 1}
    assert list(m.graph.initializers) == ["w_transposed"]
    assert node(m, "MatMul").inputs[1].shape == ir.Shape([5, 4])


@pytest.mark.parametrize("case", ["weight-used-elsewhere", "transpose-is-output", "non-matmul-consumer"])
def test_transposed_weight_is_kept_when_a_copy_would_be_needed(case: str) -> None:
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["y"]),
    ]
    outputs: dict[str, Any] = {"y": [2, 4]}
    if case == "weight-used-elsewhere":
        nodes.append(helper.make_node("Relu", ["w"], ["r"]))
        outputs["r"] = [4, 5]
    elif case == "transpose-is-output":
        outputs["wt"] = [5, 4]
    else:
        nodes.append(helper.make_node("Relu", ["wt"], ["r"]))
        outputs["r"] = [5, 4]
    proto = make(nodes, {"x": ([2, 5], F32)}, outputs, {"w": w(4, 5)})
    m, stats = check(proto, GEMM)
    assert "Transpose" in ops(m) and not stats


# --- fuse-shape-chains ------------------------------------------------------------------------------------

SHAPES = "fuse-shape-chains"
I64 = onnx.TensorProto.INT64


def ints(name: str, *values: int) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64), name)
    )


def test_transpose_pair_composes_into_one() -> None:
    proto = make(
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=[1, 2, 0]),
            helper.make_node("Transpose", ["t"], ["y"], perm=[0, 2, 1]),
        ],
        {"x": ([2, 3, 4], F32)},
        {"y": [3, 2, 4]},
    )
    m, stats = check(proto, SHAPES)
    assert ops(m) == ["Transpose"] and stats == {"transpose-transpose": 1}
    assert list(node(m, "Transpose").attributes.get_ints("perm")) == [1, 0, 2]


def test_inverse_transpose_pair_disappears() -> None:
    proto = make(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Transpose", ["r"], ["t"], perm=[2, 0, 1]),
            helper.make_node("Transpose", ["t"], ["u"], perm=[1, 2, 0]),
            helper.make_node("Neg", ["u"], ["y"]),
        ],
        {"x": ([2, 3, 4], F32)},
        {"y": [2, 3, 4]},
    )
    m, _ = check(proto, SHAPES)
    assert ops(m) == ["Relu", "Neg"]


def test_transpose_pair_whose_intermediate_is_a_graph_output_is_kept() -> None:
    proto = make(
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
            helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0]),
        ],
        {"x": ([2, 3], F32)},
        {"t": [3, 2], "y": [2, 3]},
    )
    m, stats = check(proto, SHAPES)
    assert ops(m) == ["Transpose", "Transpose"] and not stats


@pytest.mark.parametrize("squeeze_axes,cancels", [([1], True), ([-2], True), ([2], False), (None, False)])
def test_squeeze_of_unsqueeze_cancels_on_the_same_axes(squeeze_axes: list[int] | None, cancels: bool) -> None:
    nodes = [
        ints("a1", 1),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Unsqueeze", ["r", "a1"], ["u"]),
    ]
    if squeeze_axes is None:  # Squeeze() also removes x's own 1-dims, and x's N may be 1
        nodes.append(helper.make_node("Squeeze", ["u"], ["s"]))
    else:
        nodes += [ints("a2", *squeeze_axes), helper.make_node("Squeeze", ["u", "a2"], ["s"])]
    # ReduceSum to a scalar: Squeeze() of [N, 1, 3] has rank 1 or 2, which ONNX cannot declare.
    nodes.append(helper.make_node("ReduceSum", ["s"], ["y"], keepdims=0))
    shape = ["N", 3] if squeeze_axes is None else [2, 3]
    out_shape: list[Any] = []
    if squeeze_axes == [2]:
        shape = [2, 1]
    proto = make(nodes, {"x": (shape, F32)}, {"y": out_shape})
    m, stats = check(proto, SHAPES, {"N": 1})
    assert (ops(m) == ["Relu", "ReduceSum"]) == cancels
    assert bool(stats) == cancels


@pytest.mark.parametrize("unsqueeze_axes,cancels", [([1], True), ([-2], True), ([0], False)])
def test_unsqueeze_of_squeeze_cancels_on_the_same_axes(unsqueeze_axes: list[int], cancels: bool) -> None:
    proto = make(
        [
            ints("a1", 1),
            ints("a2", *unsqueeze_axes),
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Squeeze", ["r", "a1"], ["s"]),
            helper.make_node("Unsqueeze", ["s", "a2"], ["u"]),
            helper.make_node("Neg", ["u"], ["y"]),
        ],
        {"x": ([2, 1, 3], F32)},
        {"y": None},
    )
    m, _ = check(proto, SHAPES)
    assert (ops(m) == ["Relu", "Neg"]) == cancels


def test_unsqueeze_chain_becomes_one_unsqueeze() -> None:
    proto = make(
        [
            ints("a1", 0, 2),
            ints("a2", -1),
            helper.make_node("Unsqueeze", ["x", "a1"], ["u"]),
            helper.make_node("Unsqueeze", ["u", "a2"], ["y"]),
        ],
        {"x": ([2, 3], F32)},
        {"y": [1, 2, 1, 3, 1]},
    )
    m, stats = check(proto, SHAPES)
    assert ops(m) == ["Unsqueeze"] and stats == {"unsqueeze-unsqueeze": 1}
    assert node(m, "Unsqueeze").inputs[1].const_value.numpy().tolist() == [0, 2, 4]


def test_shared_inner_unsqueeze_is_folded_into_each_consumer() -> None:
    # The shape of the exporters' attention masks: x[None, None] feeding x[..., None] and x[:, :, None].
    proto = make(
        [
            ints("a1", 0, 1),
            ints("a2", 3),
            ints("a3", 2),
            helper.make_node("Unsqueeze", ["x", "a1"], ["u"]),
            helper.make_node("Unsqueeze", ["u", "a2"], ["y1"]),
            helper.make_node("Unsqueeze", ["u", "a3"], ["y2"]),
        ],
        {"x": (["S"], F32)},
        {"y1": [1, 1, "S", 1], "y2": [1, 1, 1, "S"]},
    )
    m, stats = check(proto, SHAPES, {"S": 4})
    assert ops(m) == ["Unsqueeze", "Unsqueeze"] and stats == {"unsqueeze-unsqueeze": 2}


def test_unsqueeze_chain_in_opset11_attribute_form() -> None:
    proto = make(
        [
            helper.make_node("Unsqueeze", ["x"], ["u"], axes=[1]),
            helper.make_node("Unsqueeze", ["u"], ["y"], axes=[0]),
        ],
        {"x": ([2, 3], F32)},
        {"y": [1, 2, 1, 3]},
        opset=11,
    )
    m, _ = check(proto, SHAPES)
    assert ops(m) == ["Unsqueeze"]
    assert list(node(m, "Unsqueeze").attributes.get_ints("axes")) == [0, 2]


def test_reshape_of_squeezed_1d_tensor_disappears() -> None:
    proto = make(
        [
            ints("s", -1),
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Squeeze", ["r"], ["q"]),
            helper.make_node("Reshape", ["q", "s"], ["p"]),
            helper.make_node("Neg", ["p"], ["y"]),
        ],
        {"x": ([1], F32)},
        {"y": [1]},
    )
    m, _ = check(proto, SHAPES)
    assert ops(m) == ["Relu", "Neg"]


@pytest.mark.parametrize("op", ["Squeeze", "Unsqueeze"])
def test_reshape_of_squeeze_or_unsqueeze_reads_the_input_directly(op: str) -> None:
    proto = make(
        [
            ints("a", 1),
            ints("s", 3, -1),
            helper.make_node(op, ["x", "a"], ["q"]),
            helper.make_node("Reshape", ["q", "s"], ["y"]),
        ],
        {"x": ([2, 1, 3] if op == "Squeeze" else [2, 3], F32)},
        {"y": [3, 2]},
    )
    m, stats = check(proto, SHAPES)
    assert ops(m) == ["Reshape"] and stats == {"reshape-of-squeeze": 1}


@pytest.mark.parametrize("static", [True, False])
def test_reshape_with_a_zero_after_unsqueeze_needs_a_static_output(static: bool) -> None:
    # [B, S] → [1, B, S] → [2, 0, -1]: the 0 copies B (the Unsqueeze output's dim 1), not x's S.
    proto = make(
        [
            ints("a", 0),
            ints("s", 2, 0, -1),
            helper.make_node("Unsqueeze", ["x", "a"], ["q"]),
            helper.make_node("Reshape", ["q", "s"], ["y"]),
        ],
        {"x": ([3, 4] if static else ["B", "S"], F32)},
        {"y": None},
    )
    m, _ = check(proto, SHAPES, {"B": 3, "S": 4})
    assert ops(m) == (["Reshape"] if static else ["Unsqueeze", "Reshape"])


def test_reshape_pair_becomes_one_reshape() -> None:
    proto = make(
        [
            ints("s1", 6, 4),
            ints("s2", 4, -1),
            helper.make_node("Reshape", ["x", "s1"], ["r"]),
            helper.make_node("Reshape", ["r", "s2"], ["y"]),
        ],
        {"x": ([2, 3, 4], F32)},
        {"y": [4, 6]},
    )
    m, stats = check(proto, SHAPES)
    assert ops(m) == ["Reshape"] and stats == {"reshape-reshape": 1}


@pytest.mark.parametrize("static", [True, False])
def test_reshape_pair_whose_zero_refers_to_the_intermediate_dim(static: bool) -> None:
    # [A, B, C] → [A*C, B] → [0, 2, -1]: the 0 is A*C (the intermediate's dim); on x it would be A.
    proto = make(
        [
            ints("s1", -1, 0),
            ints("s2", 0, 2, -1),
            helper.make_node("Reshape", ["x", "s1"], ["r"]),
            helper.make_node("Reshape", ["r", "s2"], ["y"]),
        ],
        {"x": ([2, 4, 3] if static else ["A", "B", "C"], F32)},
        {"y": None},
    )
    m, _ = check(proto, SHAPES, {"A": 2, "B": 4, "C": 3})
    # With static shapes the 0 is resolved to 6; with dynamic ones it cannot be, and must not fuse.
    assert ops(m) == (["Reshape"] if static else ["Reshape", "Reshape"])


def test_reshape_pair_does_not_overwrite_an_initializer_named_like_its_new_shape() -> None:
    # onnxscript's rule names the merged shape "<output>/shape"; its driver would replace the
    # initializer "y/shape" that the Add reads (cleanup's simplify pass breaks this model).
    proto = make(
        [
            ints("s1", 6, 4),
            ints("s2", 4, 6),
            helper.make_node("Reshape", ["x", "s1"], ["r"]),
            helper.make_node("Reshape", ["r", "s2"], ["y"]),
            helper.make_node("Add", ["x", "y/shape"], ["z"]),
        ],
        {"x": ([2, 3, 4], F32)},
        {"y": [4, 6], "z": [2, 3, 4]},
        {"y/shape": w(4)},
    )
    m, stats = check(proto, SHAPES)
    assert ops(m) == ["Reshape", "Add"] and stats == {"reshape-reshape": 1}


def test_reshape_pair_with_shared_intermediate_is_kept() -> None:
    proto = make(
        [
            ints("s1", 6, 4),
            ints("s2", 4, 6),
            helper.make_node("Reshape", ["x", "s1"], ["r"]),
            helper.make_node("Reshape", ["r", "s2"], ["y"]),
            helper.make_node("Relu", ["r"], ["z"]),
        ],
        {"x": ([2, 3, 4], F32)},
        {"y": [4, 6], "z": [6, 4]},
    )
    m, stats = check(proto, SHAPES)
    assert ops(m).count("Reshape") == 2 and not stats


def test_passes_report_unchanged_when_nothing_matches() -> None:
    proto = make([helper.make_node("Relu", ["x"], ["y"])], {"x": ([2, 3], F32)}, {"y": [2, 3]})
    for p in (BN, GEMM, SHAPES):
        result = graphopt.optimize(graphopt.load(proto), pipeline=f"cleanup,{p.split(',')[-1]}")
        assert not result.report.passes[-1].modified


# --- exported transformers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind",
    [
        "llama",
        pytest.param("bert", marks=pytest.mark.slow),
        pytest.param("gpt2", marks=pytest.mark.slow),
        pytest.param("vit", marks=pytest.mark.slow),
        pytest.param("resnet", marks=pytest.mark.slow),
    ],
)
def test_exported_models_keep_their_outputs(exported: Any, kind: str) -> None:
    _, stats = run_export(exported, kind, "cleanup,fuse-batchnorm,fuse-gemm,fuse-shape-chains")
    fired = collections.Counter(
        {f"{p}/{r}": n for p, rules in stats.items() if p.startswith("fuse") for r, n in rules.items()}
    )
    if kind in ("llama", "bert", "gpt2"):
        assert fired["fuse-shape-chains/unsqueeze-unsqueeze"] == 3  # the attention-mask unsqueezes

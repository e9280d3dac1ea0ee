"""Standard-ONNX fusions: constant chains (arith), LayerNorm/RMSNorm (normalization), GELU,
HardSwish, Relu/Clip chains and SiLU (activation).

Each rule: it fires where it should (ONNX Runtime outputs unchanged within 1e-5 relative / 1e-4
absolute, graph outputs keep their names) and stays away from look-alikes. The real exported
models are checked where the rule has something to do on them (GPT-2's tanh GELU, Llama's
RMSNorm after lifting the model to opset 23/24).
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from corpus import assert_same, run
from onnx import TensorProto, helper, numpy_helper

import graphopt

RTOL, ATOL = 1e-5, 1e-4
RNG = np.random.default_rng(0)


def parse(text: str) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto)
    return proto


def make(
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, int, list[Any]]],
    outputs: list[tuple[str, int, Any]],
    inits: dict[str, np.ndarray],
    opset: int,
) -> onnx.ModelProto:
    """A model from onnx.helper pieces (for dtypes the text parser cannot write, e.g. float16)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def fuse(
    proto: onnx.ModelProto,
    feeds: dict[str, Any] | None,
    pipeline: str,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> tuple[ir.Model, dict[str, int]]:
    """Run ``pipeline``; compare ORT outputs with the original's (when feeds are given)."""
    result = graphopt.optimize(graphopt.load(proto), pipeline=pipeline, verify_each=True)
    if feeds is not None:
        expected = run(proto.SerializeToString(), feeds)
        got = run(graphopt.to_bytes(result.model), feeds)
        assert_same(expected, got, rtol, atol, where=pipeline)
    assert [o.name for o in result.model.graph.outputs] == [o.name for o in proto.graph.output]
    return result.model, dict(result.report.passes[-1].stats)


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)]


def x_feed(shape: tuple[int, ...] = (2, 3, 4), dtype: Any = np.float32, low: float = -3.0, high: float = 3.0):
    return {"x": RNG.uniform(low, high, shape).astype(dtype)}


# =============================================================================================
# fuse-constant-chains


CHAIN = "fuse-constant-chains"
# (first op, second op, op left after merging); x is the non-constant operand, v the first result.
MUL_CASES = [
    ("Mul (x, c1)", "Mul (v, c2)", "Mul"),
    ("Mul (c1, x)", "Mul (c2, v)", "Mul"),
    ("Div (x, c1)", "Div (v, c2)", "Div"),
    ("Mul (x, c1)", "Div (v, c2)", "Mul"),
    ("Div (x, c1)", "Mul (c2, v)", "Mul"),
    ("Mul (x, c1)", "Div (c2, v)", "Div"),
    ("Div (x, c1)", "Div (c2, v)", "Div"),
    ("Div (c1, x)", "Mul (v, c2)", "Div"),
    ("Div (c1, x)", "Div (v, c2)", "Div"),
    ("Div (c1, x)", "Div (c2, v)", "Mul"),
]
ADD_CASES = [
    ("Add (x, c1)", "Add (v, c2)", "Add"),
    ("Add (c1, x)", "Add (c2, v)", "Add"),
    ("Sub (x, c1)", "Add (v, c2)", "Add"),
    ("Add (x, c1)", "Sub (v, c2)", "Add"),
    ("Sub (x, c1)", "Sub (v, c2)", "Sub"),
    ("Add (x, c1)", "Sub (c2, v)", "Sub"),
    ("Sub (x, c1)", "Sub (c2, v)", "Sub"),
    ("Sub (c1, x)", "Add (v, c2)", "Sub"),
    ("Sub (c1, x)", "Sub (v, c2)", "Sub"),
    ("Sub (c1, x)", "Sub (c2, v)", "Add"),
]


def chain_model(
    first: str,
    second: str,
    c1: str = "float c1 = {1.7}",
    c2: str = "float[1] c2 = {-0.3}",
    x_type: str = "float[2, 3]",
    extra: str = "",
    outputs: str = "float[2, 3] y",
) -> onnx.ModelProto:
    return parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g ({x_type} x) => ({outputs}) <{c1}, {c2}> {{
            v = {first}
            y = {second}
            {extra}
        }}""")


@pytest.mark.parametrize(("first", "second", "merged"), MUL_CASES + ADD_CASES)
def test_constant_chain_merges_into_one_node(first: str, second: str, merged: str) -> None:
    feeds = x_feed((2, 3), low=0.5, high=2.5)  # no zeros: c/x stays finite
    m, stats = fuse(chain_model(first, second), feeds, CHAIN)
    assert ops(m) == [merged]
    assert sum(stats.values()) == 1


def test_long_chain_merges_multiplicative_and_additive_parts_separately() -> None:
    m, stats = fuse(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] y) <float a = {2.0}, float b = {3.0}, float[1, 1] c = {0.5}> {
            t1 = Mul (x, a)
            t2 = Div (t1, b)
            t3 = Mul (c, t2)
            t4 = Add (t3, a)
            t5 = Sub (t4, b)
            y = Sub (c, t5)
        }"""),
        x_feed((2, 3)),
        CHAIN,
    )
    assert ops(m) == ["Mul", "Sub"]
    assert stats == {"mul-chain": 2, "add-chain": 2}


def test_chain_of_identical_vector_constants_merges_without_knowing_x_rank() -> None:
    m, _ = fuse(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float[N, 3] y) <float[3] a = {1.0, 2.0, 3.0}, float[3] b = {0.5, 0.25, 4.0}> {
            v = Mul (x, a)
            y = Mul (v, b)
        }"""),
        x_feed((2, 3)),
        CHAIN,
    )
    assert ops(m) == ["Mul"]
    const = m.graph.node(0).inputs[1].const_value.numpy()
    np.testing.assert_array_equal(const, np.float32([0.5, 0.5, 12.0]))


def test_constant_chain_keeps_graph_output_name_and_subgraph_chains_use_constant_nodes() -> None:
    m, stats = fuse(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x, bool cond) => (float[2, 3] y) <float a = {2.0}, float b = {4.0}> {
            y = If (cond) <
                then_branch = t () => (float[2, 3] ty) { tv = Mul (x, a)  ty = Mul (tv, b) },
                else_branch = e () => (float[2, 3] ey) { ey = Sub (x, a) }
            >
        }"""),
        {**x_feed((2, 3)), "cond": np.array(True)},
        CHAIN,
    )
    assert stats == {"mul-chain": 1}
    then = m.graph.node(0).attributes["then_branch"].as_graph()
    assert [n.op_type for n in then] == ["Constant", "Mul"] and then.outputs[0].name == "ty"


def _f16_chain(c1: float, c2: float, dtype: Any, first: str = "Mul", second: str = "Mul") -> onnx.ModelProto:
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return make(
        [helper.make_node(first, ["x", "c1"], ["v"]), helper.make_node(second, ["v", "c2"], ["y"])],
        [("x", t, [2, 3])],
        [("y", t, [2, 3])],
        {"c1": np.array(c1, dtype), "c2": np.array(c2, dtype)},
        17,
    )


def test_float16_chain_merged_constant_is_computed_in_float32_and_rounded_once() -> None:
    # Powers of two: the fp16 chain and the merged op are exact, so outputs are equal.
    m, _ = fuse(_f16_chain(2.0, 0.25, np.float16), x_feed((2, 3), np.float16), CHAIN)
    assert ops(m) == ["Mul"] and m.graph.node(0).inputs[1].const_value.numpy() == np.float16(0.5)
    m, _ = fuse(_f16_chain(0.1, 3.0, np.float16, "Div"), None, CHAIN)
    got = m.graph.node(0).inputs[1].const_value.numpy()
    assert got.dtype == np.float16 and got == np.float16(
        np.float32(np.float16(3.0)) / np.float32(np.float16(0.1))
    )


def test_bfloat16_chain_is_merged_in_its_own_dtype() -> None:
    m, _ = fuse(
        _f16_chain(3.0, 0.5, ml_dtypes.bfloat16), None, CHAIN
    )  # ORT CPU has no bf16 Mul: structure only
    const = m.graph.node(0).inputs[1].const_value.numpy()
    assert ops(m) == ["Mul"] and const.dtype == ml_dtypes.bfloat16 and float(const) == 1.5


@pytest.mark.parametrize(
    ("why", "model"),
    [
        (
            "intermediate has another consumer",
            chain_model(
                "Mul (x, c1)", "Mul (v, c2)", extra="z = Relu (v)", outputs="float[2, 3] y, float[2, 3] z"
            ),
        ),
        (
            "intermediate is a graph output",
            chain_model("Mul (x, c1)", "Mul (v, c2)", outputs="float[2, 3] y, float[2, 3] v"),
        ),
        (
            "integer division does not compose",
            chain_model(
                "Div (x, c1)",
                "Div (v, c2)",
                "int64 c1 = {2}",
                "int64 c2 = {2}",
                x_type="int64[2, 3]",
                outputs="int64[2, 3] y",
            ),
        ),
        (
            "constants of different shapes, not both single elements",
            chain_model("Mul (x, c1)", "Mul (v, c2)", "float[3] c1 = {1.0, 2.0, 3.0}", "float[1] c2 = {2.0}"),
        ),
        (
            "single-element constant of higher rank than x",
            chain_model(
                "Mul (x, c1)",
                "Mul (v, c2)",
                "float[1, 1, 1] c1 = {2.0}",
                "float c2 = {3.0}",
                outputs="float[1, 2, 3] y",
            ),
        ),
        ("zero constant", chain_model("Div (x, c1)", "Mul (v, c2)", "float c1 = {0.0}")),
        ("additive after multiplicative", chain_model("Mul (x, c1)", "Add (v, c2)")),
    ],
)
def test_constant_chain_refuses(why: str, model: onnx.ModelProto) -> None:
    x_type = model.graph.input[0].type.tensor_type
    if x_type.elem_type == TensorProto.INT64:
        feeds = {"x": RNG.integers(-9, 9, (2, 3)).astype(np.int64)}
    else:
        feeds = x_feed((2, 3))
    m, stats = fuse(model, feeds, CHAIN)
    assert stats == {}, why
    assert len(ops(m)) >= 2, why


def test_constant_chain_refuses_when_x_rank_is_not_declared() -> None:
    proto = chain_model("Mul (x, c1)", "Mul (v, c2)")
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    proto.graph.output[0].type.tensor_type.ClearField("shape")
    # onnx's checker rejects graph I/O without a shape field, so no per-pass checking here.
    result = graphopt.optimize(graphopt.load(proto), pipeline=CHAIN)
    assert dict(result.report.passes[-1].stats) == {}
    feeds = x_feed((2, 3))
    assert_same(
        run(proto.SerializeToString(), feeds),
        run(graphopt.to_bytes(result.model), feeds),
        RTOL,
        ATOL,
        where=CHAIN,
    )


def test_constant_chain_refuses_overflowing_merged_constant_and_overridable_initializer() -> None:
    _, stats = fuse(_f16_chain(300.0, 300.0, np.float16), None, CHAIN)  # 90000 > fp16 max
    assert stats == {}
    proto = chain_model("Mul (x, c1)", "Mul (v, c2)")
    proto.graph.input.append(
        helper.make_tensor_value_info("c1", TensorProto.FLOAT, [])
    )  # a caller may feed c1
    _, stats = fuse(proto, x_feed((2, 3)), CHAIN)
    assert stats == {}


# =============================================================================================
# fuse-normalization: LayerNormalization


NORM = "fuse-normalization"


def ln_model(
    *,
    opset: int = 18,
    squared: str = "Mul (d, d)",
    normalize: str = "Div (d, sd)",
    scale: str = "Mul (n, s)",
    bias: str | None = "Add (ns, b)",
    axes1: str = "-1",
    axes2: str = "-1",
    inits: str = "float[4] s = {1.0, 2.0, 3.0, 4.0}, float[4] b = {0.1, 0.2, 0.3, 0.4}",
    eps: str = "eps",
    extra_inputs: str = "",
    extra: str = "",
    extra_outputs: str = "",
) -> onnx.ModelProto:
    if opset >= 18:
        rm1, rm2 = "ReduceMean (x, ax1)", "ReduceMean (dd, ax2)"
        axes = f", int64[1] ax1 = {{{axes1}}}, int64[1] ax2 = {{{axes2}}}"
    else:
        rm1, rm2 = f"ReduceMean <axes = [{axes1}]> (x)", f"ReduceMean <axes = [{axes2}]> (dd)"
        axes = ""
    tail = f"ns = {scale}\n            y = {bias}" if bias else f"y = {scale}"
    recip = "r = Reciprocal (sd)" if ", r)" in normalize or "(r, " in normalize else ""
    return parse(f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[2, 3, 4] x{extra_inputs}) => (float[2, 3, 4] y{extra_outputs})
        <{inits}, float eps = {{1e-5}}, float two = {{2.0}}{axes}> {{
            m = {rm1}
            d = Sub (x, m)
            dd = {squared}
            v = {rm2}
            ve = Add (v, {eps})
            sd = Sqrt (ve)
            {recip}
            n = {normalize}
            {tail}
            {extra}
        }}""")


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(opset=17),  # ReduceMean axes as attribute
        dict(axes1="2", opset=17),  # last axis written as a positive index
        dict(squared="Pow (d, two)", normalize="Mul (d, r)"),
        dict(scale="Mul (s, n)", bias="Add (b, ns)"),
        dict(bias=None),
    ],
)
def test_layer_norm_decomposition_fuses(variant: dict[str, Any]) -> None:
    m, stats = fuse(ln_model(**variant), x_feed(), NORM)
    assert ops(m) == ["LayerNormalization"]
    node = m.graph.node(0)
    assert node.attributes["axis"].as_int() == -1
    assert len(node.inputs) == (2 if variant.get("bias", "") is None else 3)
    assert stats["layer-norm"] == 1


def test_layer_norm_over_two_trailing_axes_sets_axis() -> None:
    proto = ln_model(
        inits="float[3, 4] s = {1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12.}, float[3, 4] b = "
        "{0., 0., 0., 0., 0., 0., 0., 0., 0., 0., 0., 0.1}",
        opset=17,
        axes1="-2, -1",
        axes2="1, 2",
    )
    m, _ = fuse(proto, x_feed(), NORM)
    assert ops(m) == ["LayerNormalization"] and m.graph.node(0).attributes["axis"].as_int() == -2


def test_layer_norm_fp16_with_float32_casts_keeps_the_casts() -> None:
    f16, f32 = TensorProto.FLOAT16, TensorProto.FLOAT
    n = helper.make_node
    proto = make(
        [
            n("Cast", ["x"], ["xf"], to=f32),
            n("ReduceMean", ["xf", "ax"], ["m"]),
            n("Sub", ["xf", "m"], ["d"]),
            n("Mul", ["d", "d"], ["dd"]),
            n("ReduceMean", ["dd", "ax"], ["v"]),
            n("Add", ["v", "eps"], ["ve"]),
            n("Sqrt", ["ve"], ["sd"]),
            n("Div", ["d", "sd"], ["nrm"]),
            n("Mul", ["nrm", "s"], ["ns"]),
            n("Add", ["ns", "b"], ["yf"]),
            n("Cast", ["yf"], ["y"], to=f16),
        ],
        [("x", f16, [2, 3, 4])],
        [("y", f16, [2, 3, 4])],
        {
            "ax": np.array([-1]),
            "eps": np.float32(1e-5),
            "s": np.float32([1, 2, 3, 4]),
            "b": np.float32([0.1, 0.2, 0.3, 0.4]),
        },
        18,
    )
    m, _ = fuse(proto, x_feed(dtype=np.float16), NORM)
    assert ops(m) == ["Cast", "LayerNormalization", "Cast"]


def _pow_model(exponent: float) -> onnx.ModelProto:
    return parse(f"""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[2, 3, 4] x) => (float[2, 3, 4] y)
        <float[4] s = {{1.0, 2.0, 3.0, 4.0}}, float eps = {{1e-5}}, float p = {{{exponent}}}, int64[1] ax = {{-1}}> {{
            m = ReduceMean (x, ax)
            d = Sub (x, m)
            dd = Pow (d, p)
            v = ReduceMean (dd, ax)
            ve = Add (v, eps)
            sd = Sqrt (ve)
            n = Div (d, sd)
            y = Mul (n, s)
        }}""")


@pytest.mark.parametrize(
    ("why", "model"),
    [
        ("the two ReduceMeans reduce different axes", ln_model(axes2="1")),
        ("epsilon is not a constant", ln_model(eps="e", extra_inputs=", float e")),
        (
            "the deviation has another consumer",
            ln_model(extra="z = Relu (d)", extra_outputs=", float[2, 3, 4] z"),
        ),
        ("the variance is a graph output", ln_model(extra_outputs=", float[2, 3, 1] v")),
        (
            "scale broadcasts over a non-normalized axis",
            ln_model(inits="float[3, 1] s = {1.0, 2.0, 3.0}, float[4] b = {0.1, 0.2, 0.3, 0.4}", bias=None),
        ),
        ("not the trailing axis", ln_model(axes1="1", axes2="1", bias=None)),
        ("Pow exponent is not exactly 2", _pow_model(2.0001)),
        ("opset 16 has no LayerNormalization", ln_model(opset=16)),
    ],
)
def test_layer_norm_refuses(why: str, model: onnx.ModelProto) -> None:
    feeds = x_feed()
    if any(i.name == "e" for i in model.graph.input):
        feeds["e"] = np.array(1e-5, np.float32)
    m, stats = fuse(model, feeds, NORM)
    assert "layer-norm" not in stats, why
    assert "LayerNormalization" not in ops(m), why


def test_layer_norm_residual_add_is_not_taken_as_bias() -> None:
    # onnxscript's LayerNormBiasFusion alone would make the [2, 3, 4] residual the op's bias.
    m, stats = fuse(
        ln_model(bias="Add (ns, res)", extra_inputs=", float[2, 3, 4] res"),
        {**x_feed(), "res": x_feed()["x"]},
        NORM,
    )
    assert stats == {"layer-norm": 1}
    assert ops(m) == ["LayerNormalization", "Add"] and len(m.graph.node(0).inputs) == 2


def test_layer_norm_fp16_without_casts_is_refused() -> None:
    f16 = TensorProto.FLOAT16
    n = helper.make_node
    proto = make(
        [
            n("ReduceMean", ["x", "ax"], ["m"]),
            n("Sub", ["x", "m"], ["d"]),
            n("Mul", ["d", "d"], ["dd"]),
            n("ReduceMean", ["dd", "ax"], ["v"]),
            n("Add", ["v", "eps"], ["ve"]),
            n("Sqrt", ["ve"], ["sd"]),
            n("Div", ["d", "sd"], ["nrm"]),
            n("Mul", ["nrm", "s"], ["y"]),
        ],
        [("x", f16, [2, 3, 4])],
        [("y", f16, [2, 3, 4])],
        {"ax": np.array([-1]), "eps": np.float16(1e-5), "s": np.float16([1, 2, 3, 4])},
        18,
    )
    _, stats = fuse(proto, x_feed(dtype=np.float16), NORM)
    assert stats == {}


# =============================================================================================
# fuse-normalization: RMSNormalization


def rms_model(
    *,
    opset: int = 23,
    squared: str = "Pow (x, two)",
    normalize: str = "Mul (x, r)",
    scale: str = "Mul (n, s)",
    s: str = "float[4] s = {1.0, 2.0, 3.0, 4.0}",
    eps: str = "eps",
    extra_inputs: str = "",
    axes: str = "-1",
    extra: str = "",
    extra_outputs: str = "",
) -> onnx.ModelProto:
    recip = "r = Reciprocal (sd)" if "r" in normalize.split("(")[1] or "(r)" in extra else ""
    return parse(f"""
        <ir_version: 10, opset_import: ["" : {opset}]>
        g (float[2, 3, 4] x{extra_inputs}) => (float[2, 3, 4] y{extra_outputs})
        <{s}, float eps = {{1e-6}}, float two = {{2.0}}, int64[1] ax = {{{axes}}}> {{
            p = {squared}
            v = ReduceMean <keepdims = 1> (p, ax)
            ve = Add (v, {eps})
            sd = Sqrt (ve)
            {recip}
            n = {normalize}
            y = {scale}
            {extra}
        }}""")


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(squared="Mul (x, x)", normalize="Div (x, sd)"),
        dict(normalize="Mul (r, x)", scale="Mul (s, n)"),
        dict(axes="2"),
    ],
)
def test_rms_norm_decomposition_fuses(variant: dict[str, Any]) -> None:
    m, stats = fuse(rms_model(**variant), x_feed(), NORM)
    assert ops(m) == ["RMSNormalization"] and stats == {"rms-norm": 1}
    assert m.graph.node(0).attributes["axis"].as_int() == -1


def _llama_rms_fp16(cast_back: bool = True) -> onnx.ModelProto:
    """Llama's RMSNorm: fp16 → Cast(float32) → … → Cast(fp16) → weight · normalized."""
    f16, f32 = TensorProto.FLOAT16, TensorProto.FLOAT
    n = helper.make_node
    nodes = [
        n("Cast", ["x"], ["xf"], to=f32),
        n("Pow", ["xf", "two"], ["p"]),
        n("ReduceMean", ["p", "ax"], ["v"]),
        n("Add", ["v", "eps"], ["ve"]),
        n("Sqrt", ["ve"], ["sd"]),
        n("Reciprocal", ["sd"], ["r"]),
        n("Mul", ["xf", "r"], ["nf"]),
    ]
    if cast_back:
        nodes += [n("Cast", ["nf"], ["nh"], to=f16), n("Mul", ["s", "nh"], ["y"])]
        s, out = np.float16([1, 2, 3, 4]), f16
    else:
        nodes += [n("Mul", ["s", "nf"], ["y"])]
        s, out = np.float32([1, 2, 3, 4]), f32
    return make(
        nodes,
        [("x", f16, [2, 3, 4])],
        [("y", out, [2, 3, 4])],
        {"two": np.float32(2), "ax": np.array([-1]), "eps": np.float32(1e-6), "s": s},
        23,
    )


def test_rms_norm_llama_fp16_form_with_both_casts_fuses() -> None:
    m, _ = fuse(_llama_rms_fp16(), x_feed(dtype=np.float16), NORM)
    assert ops(m) == ["RMSNormalization"]
    assert m.graph.node(0).attributes["stash_type"].as_int() == TensorProto.FLOAT


@pytest.mark.parametrize(
    ("why", "model"),
    [
        # onnxscript's RmsNormFusion fuses this into RMSNormalization(fp16 x, float scale), which
        # ONNX Runtime rejects ("Type parameter (T) of Optype (Mul) bound to different types").
        ("up-cast without the cast back", _llama_rms_fp16(cast_back=False)),
        ("scale of another shape than the normalized one", rms_model(s="float[3, 1] s = {1.0, 2.0, 3.0}")),
        ("epsilon is not a constant", rms_model(eps="e", extra_inputs=", float e")),
        (
            "reciprocal has another consumer",
            rms_model(extra="z = Relu (r)", extra_outputs=", float[2, 3, 1] z"),
        ),
        ("reduction over a non-trailing axis", rms_model(axes="1", s="float[4] s = {1.0, 2.0, 3.0, 4.0}")),
        ("opset 22 has no RMSNormalization", rms_model(opset=22)),
    ],
)
def test_rms_norm_refuses(why: str, model: onnx.ModelProto) -> None:
    is16 = model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    feeds = x_feed(dtype=np.float16 if is16 else np.float32)
    if any(i.name == "e" for i in model.graph.input):
        feeds["e"] = np.array(1e-6, np.float32)
    m, stats = fuse(model, feeds, NORM)
    assert stats == {}, why
    assert "RMSNormalization" not in ops(m), why


# =============================================================================================
# fuse-activations: GELU


ACT = "fuse-activations"
SQRT2 = math.sqrt(2.0)


def erf_model(
    arg: str = "Div (x, k)",
    k: float = SQRT2,
    tail: str = "h = Mul (x, c)\n y = Mul (h, a)",
    opset: int = 20,
    add: str = "Add (e, one)",
    extra: str = "",
    extra_outputs: str = "",
    x_type: str = "float[2, 3, 4]",
    c: str = "float c = {0.5}",
) -> onnx.ModelProto:
    return parse(f"""
        <ir_version: 9, opset_import: ["" : {opset}]>
        g ({x_type} x) => ({x_type} y{extra_outputs}) <float k = {{{k!r}}}, float one = {{1.0}}, {c}, float two = {{2.0}}> {{
            t = {arg}
            e = Erf (t)
            a = {add}
            {tail}
            {extra}
        }}""")


@pytest.mark.parametrize(
    "variant",
    [
        dict(),  # (x·½)·(1+erf(x/√2))
        dict(tail="h = Mul (x, a)\n y = Mul (h, c)"),  # (x·(1+erf))·½
        dict(tail="h = Mul (c, a)\n y = Mul (x, h)"),  # x·(½·(1+erf))
        dict(tail="h = Mul (a, x)\n y = Div (h, two)"),  # x·(1+erf)/2
        dict(arg="Mul (x, k)", k=1 / SQRT2, add="Add (one, e)"),  # x·0.7071…, 1 first
        dict(arg="Mul (k, x)", k=0.7071067811865476, tail="h = Mul (x, a)\n y = Mul (c, h)"),
    ],
)
def test_gelu_erf_forms_fuse(variant: dict[str, Any]) -> None:
    m, stats = fuse(erf_model(**variant), x_feed(), ACT)
    assert ops(m) == ["Gelu"] and stats == {"gelu-erf": 1}
    assert m.graph.node(0).attributes["approximate"].as_string() == "none"


def tanh_model(
    cube: str = "Pow (x, three)",
    tail: str = "h = Mul (x, half)\n y = Mul (h, a)",
    c3: float = 0.044715,
    opset: int = 20,
) -> onnx.ModelProto:
    return parse(f"""
        <ir_version: 9, opset_import: ["" : {opset}]>
        g (float[2, 3, 4] x) => (float[2, 3, 4] y)
        <float three = {{3.0}}, float c3 = {{{c3!r}}}, float k = {{{math.sqrt(2 / math.pi)!r}}}, float one = {{1.0}},
         float half = {{0.5}}> {{
            {"xx = Mul (x, x)" if "xx" in cube else ""}
            p = {cube}
            q = Mul (p, c3)
            i = Add (x, q)
            s = Mul (i, k)
            t = Tanh (s)
            a = Add (t, one)
            {tail}
        }}""")


@pytest.mark.parametrize(
    "variant",
    [
        dict(),  # GPT-2's association: (0.5·x)·(1 + tanh(…))
        dict(cube="Mul (xx, x)"),
        dict(cube="Mul (x, xx)", tail="h = Mul (a, x)\n y = Mul (half, h)"),
    ],
)
def test_gelu_tanh_forms_fuse(variant: dict[str, Any]) -> None:
    m, stats = fuse(tanh_model(**variant), x_feed(), ACT)
    assert ops(m) == ["Gelu"] and stats == {"gelu-tanh": 1}
    assert m.graph.node(0).attributes["approximate"].as_string() == "tanh"


#: tanh arguments other exporters write (the body computes ``s``, the argument of Tanh)
TANH_ARGUMENTS = {
    # jax2tf / tf2onnx (magika): h + h·(h·(0.044715·h)), the constant innermost
    "jax x·(x·(c·x))": "g0 = Mul (c3, x)\n g1 = Mul (x, g0)\n g2 = Mul (x, g1)\n i = Add (x, g2)\n s = Mul (k, i)",
    # the factors spread over the sum, no outer scale: k·x + (k·c3)·x³
    "spread k·x + kc·x³": "a1 = Mul (x, k)\n p = Pow (x, three)\n a3 = Mul (kc3, p)\n s = Add (a1, a3)",
    # the scale on x³ split in two: (c3·x²)·x with x² = x·x
    "c3·(x·x)·x": "xx = Mul (x, x)\n q0 = Mul (c3, xx)\n q = Mul (q0, x)\n i = Add (q, x)\n s = Mul (i, k)",
}


def tanh_argument_model(
    arg: str, opset: int = 20, kc3: float = math.sqrt(2 / math.pi) * 0.044715
) -> onnx.ModelProto:
    return parse(f"""
        <ir_version: 9, opset_import: ["" : {opset}]>
        g (float[2, 3, 4] x) => (float[2, 3, 4] y)
        <float three = {{3.0}}, float c3 = {{0.044715}}, float k = {{{math.sqrt(2 / math.pi)!r}}},
         float kc3 = {{{kc3!r}}}, float one = {{1.0}}, float half = {{0.5}}> {{
            {arg}
            t = Tanh (s)
            a = Add (one, t)
            h = Mul (half, a)
            y = Mul (x, h)
        }}""")


@pytest.mark.parametrize("form", list(TANH_ARGUMENTS))
def test_gelu_tanh_arguments_of_other_exporters_fuse(form: str) -> None:
    m, stats = fuse(tanh_argument_model(TANH_ARGUMENTS[form]), x_feed(), ACT)
    assert ops(m) == ["Gelu"] and stats == {"gelu-tanh": 1}, form


def test_gelu_tanh_spread_factors_must_multiply_to_the_constants() -> None:
    model = tanh_argument_model(TANH_ARGUMENTS["spread k·x + kc·x³"], kc3=0.04)
    m, stats = fuse(model, x_feed(), ACT)
    assert stats == {} and "Gelu" not in ops(m)


@pytest.mark.parametrize(
    ("why", "model"),
    [
        ("1/√2 off by more than 1e-5 relative", erf_model(arg="Mul (x, k)", k=0.707)),
        ("0.044715 off by more than 1e-5 relative", tanh_model(c3=0.0447)),
        ("Pow exponent not exactly 3", tanh_model(cube="Pow (x, c3)")),
        (
            "erf output has another consumer",
            erf_model(extra="z = Relu (e)", extra_outputs=", float[2, 3, 4] z"),
        ),
        (
            "½ as a rank-2 constant broadcasts a rank-1 x",
            erf_model(x_type="float[4]", c="float[1, 1] c = {0.5}"),
        ),
        ("opset 19 has no Gelu", erf_model(opset=19)),
    ],
)
def test_gelu_refuses(why: str, model: onnx.ModelProto) -> None:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    if why.startswith("½ as a rank-2"):
        model.graph.output[0].type.tensor_type.ClearField("shape")
    m, stats = fuse(model, x_feed(tuple(shape)), ACT)
    assert stats == {}, why
    assert "Gelu" not in ops(m), why


# =============================================================================================
# fuse-activations: HardSwish, Relu/Clip chains, SiLU


@pytest.mark.parametrize(
    ("opset", "fused", "stats"),
    [
        (14, ["HardSigmoid", "HardSwish"], {"hard-swish": 2}),
        # Below 14 (PP-OCR's classifier: paddle2onnx opset 11, upgraded to 13 for static int8)
        # x·Clip(x+3, 0, 6)/6 becomes x·HardSigmoid(x): HardSigmoid exists from opset 6, and it is
        # what ORT's CPU provider runs for a HardSwish anyway.
        (13, ["HardSigmoid", "HardSigmoid", "Mul"], {"hard-sigmoid": 2}),
    ],
)
def test_hard_swish_and_hard_sigmoid_fuse(opset: int, fused: list[str], stats: dict[str, int]) -> None:
    m, got = fuse(
        parse(f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[2, 3, 4] x) => (float[2, 3, 4] y, float[2, 3, 4] z)
        <float three = {{3.0}}, float zero = {{0.0}}, float six = {{6.0}}> {{
            a = Add (x, three)
            c = Clip (a, zero, six)
            m = Mul (c, x)
            y = Div (m, six)
            a2 = Add (three, x)
            c2 = Clip (a2, zero, six)
            z = Div (c2, six)
        }}"""),
        x_feed(low=-5, high=5),
        ACT,
    )
    assert sorted(ops(m)) == fused and got == stats


@pytest.mark.parametrize(
    ("why", "x_type", "three"),
    [
        ("no double HardSwish kernel in ONNX Runtime", "double[2, 3, 4]", "double three = {3.0}"),
        ("constant broadcasts x to a larger rank", "float[4]", "float[1, 1] three = {3.0}"),
    ],
)
def test_hard_swish_refuses(why: str, x_type: str, three: str) -> None:
    dt = x_type.split("[")[0]
    proto = parse(f"""
        <ir_version: 8, opset_import: ["" : 14]>
        g ({x_type} x) => ({dt} y) <{three}, {dt} zero = {{0.0}}, {dt} six = {{6.0}}> {{
            a = Add (x, three)
            c = Clip (a, zero, six)
            m = Mul (c, x)
            y = Div (m, six)
        }}""")
    shape = (2, 3, 4) if dt == "double" else (4,)
    feeds = x_feed(shape, np.float64 if dt == "double" else np.float32)
    _, stats = fuse(proto, feeds, ACT)
    assert stats == {}, why


def test_relu_and_clip_chains_merge_with_their_ranges_intersected() -> None:
    m, stats = fuse(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3, 4] x) => (float[2, 3, 4] y1, float[2, 3, 4] y2, float[2, 3, 4] y3, float[2, 3, 4] y4)
        <float lo = {-1.0}, float hi = {6.0}, float lo2 = {0.5}, float hi2 = {4.0}> {
            r = Relu (x)
            y1 = Relu (r)
            c = Clip (x, lo, hi)
            y2 = Relu (c)
            r2 = Relu (x)
            y3 = Clip (r2, lo, hi)
            c3 = Clip (x, lo, hi)
            y4 = Clip (c3, lo2, hi2)
        }"""),
        x_feed(low=-8, high=8),
        ACT,
    )
    assert sorted(ops(m)).count("Clip") == 3 and ops(m).count("Relu") == 1
    assert stats == {"relu-relu": 1, "clip-chains": 3}


def test_two_clip_chains_on_the_same_input_stay_valid() -> None:
    # onnxscript names the merged bounds "{x}_min"/"{x}_max": the second chain collides (invalid model).
    m, stats = fuse(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3, 4] x) => (float[2, 3, 4] y1, float[2, 3, 4] y2)
        <float a0 = {0.0}, float a6 = {6.0}, float b1 = {1.0}, float b5 = {5.0}> {
            c1 = Clip (x, a0, a6)
            y1 = Relu (c1)
            c2 = Clip (x, b1, b5)
            y2 = Relu (c2)
        }"""),
        x_feed(low=-8, high=8),
        ACT,
    )
    assert stats == {"clip-chains": 2}


@pytest.mark.parametrize(
    ("why", "text"),
    [
        # Relu(Clip(x, -5, -1)) is 0; a merged Clip(x, 0, -1) would return -1 (ONNX Clip gives max if min > max).
        (
            "ranges do not intersect",
            """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3, 4] x) => (float[2, 3, 4] y) <float lo = {-5.0}, float hi = {-1.0}> {
            c = Clip (x, lo, hi)
            y = Relu (c)
        }""",
        ),
        (
            "opset 10 Clip keeps its bounds in attributes",
            """<ir_version: 8, opset_import: ["" : 10]>
        g (float[2, 3, 4] x) => (float[2, 3, 4] y) {
            c = Clip <min = -1.0, max = 2.0> (x)
            y = Relu (c)
        }""",
        ),
        (
            "bounds not constant",
            """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3, 4] x, float hi) => (float[2, 3, 4] y) <float lo = {-1.0}> {
            c = Clip (x, lo, hi)
            y = Relu (c)
        }""",
        ),
    ],
)
def test_clip_chain_refuses(why: str, text: str) -> None:
    proto = parse(text)
    feeds = {
        **x_feed(low=-8, high=8),
        **({"hi": np.array(2.0, np.float32)} if len(proto.graph.input) > 1 else {}),
    }
    _, stats = fuse(proto, feeds, ACT)
    assert stats == {}, why


@pytest.mark.parametrize("opset", [23, 24])
def test_silu_becomes_swish_only_where_the_opset_has_it(opset: int) -> None:
    m, stats = fuse(
        parse(f"""
        <ir_version: 10, opset_import: ["" : {opset}]>
        g (float[2, 3, 4] x) => (float[2, 3, 4] y) {{
            s = Sigmoid (x)
            y = Mul (s, x)
        }}"""),
        x_feed(),
        ACT,
    )
    assert ops(m) == (["Swish"] if opset >= 24 else ["Sigmoid", "Mul"])


# =============================================================================================
# Real exported models


def _token_feeds() -> dict[str, np.ndarray]:
    mask = np.ones((2, 16), np.int64)
    mask[1, 13:] = 0
    return {"input_ids": np.random.default_rng(0).integers(0, 100, (2, 16)), "attention_mask": mask}


@pytest.fixture(scope="module")
def cleaned() -> dict[str, onnx.ModelProto]:
    from models import build

    out = {}
    for kind in ("gpt2", "llama"):
        m = graphopt.optimize(build(kind, "tiny").export(), pipeline="cleanup").model
        out[kind] = ir.to_proto(m)
    return out


def test_gpt2_tanh_gelu_fuses_once_per_layer(cleaned: dict[str, onnx.ModelProto]) -> None:
    m, stats = fuse(
        cleaned["gpt2"], _token_feeds(), "fuse-constant-chains,fuse-normalization,fuse-activations"
    )
    assert stats == {"gelu-tanh": 2}
    assert ops(m).count("Gelu") == 2 and "Tanh" not in ops(m)


def test_llama_rms_norm_and_silu_fuse_once_lifted_to_opset_24(cleaned: dict[str, onnx.ModelProto]) -> None:
    from onnx import version_converter

    proto = cleaned["llama"]
    _, stats = fuse(proto, None, "fuse-normalization,fuse-activations")  # opset 20: neither op exists
    assert stats == {}
    lifted = version_converter.convert_version(proto, 24)
    m, _ = fuse(lifted, _token_feeds(), "fuse-normalization")
    assert ops(m).count("RMSNormalization") == 5 and "ReduceMean" not in ops(m)
    m, stats = fuse(lifted, _token_feeds(), "fuse-activations")
    assert stats == {"silu": 2}

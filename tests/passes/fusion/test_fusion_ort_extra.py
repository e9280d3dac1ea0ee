"""Contrib fusions of ``passes/fusion/ort_gelu.py`` / ``ort_conv.py`` / ``ort_rotary.py`` inside ``fuse-ort``:
FastGelu (tanh GELU in GPT-2's association, MatMul bias folded), QuickGelu (x·Sigmoid(αx)),
FusedConv (Conv [+ residual Add] + activation) and RotaryEmbedding with a cos/sin cache for the
transformers-5 angle form.

Each rule fires where it should (ONNX Runtime outputs unchanged within 1e-5 relative / 1e-4
absolute, graph outputs keep their names, ``com.microsoft`` imported) and stays away from
look-alikes. The tiny GPT-2 and Llama exports are checked end to end with padded inputs.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from corpus import assert_same, run

import graphopt

RTOL, ATOL = 1e-5, 1e-4
RNG = np.random.default_rng(0)
MS = "com.microsoft"


def parse(text: str, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(text)
    for k, v in (metadata or {}).items():
        proto.graph.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    return proto


def fuse(
    proto: onnx.ModelProto,
    feeds: dict[str, Any],
    rules: str | None = None,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> tuple[ir.Model, dict[str, int]]:
    """Run ``fuse-ort`` (only ``rules`` when given); compare ORT outputs with the original's."""
    pipeline = f"fuse-ort(rules=[{rules}])" if rules else "fuse-ort"
    result = graphopt.optimize(graphopt.load(proto), pipeline=pipeline, verify_each=True)
    expected = run(proto.SerializeToString(), feeds)
    got = run(graphopt.to_bytes(result.model), feeds)
    assert_same(expected, got, rtol, atol, where=pipeline)
    assert [o.name for o in result.model.graph.outputs] == [o.name for o in proto.graph.output]
    if any(n.domain == MS for n in result.model.graph):
        assert result.model.opset_imports.get(MS) == 1
    return result.model, dict(result.report.passes[-1].stats)


def ops(model: ir.Model) -> Counter[str]:
    return Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph))


def node(model: ir.Model, op_type: str) -> ir.Node:
    (found,) = [n for n in model.graph if n.op_type == op_type]
    return found


def feed(
    shape: tuple[int, ...], name: str = "x", dtype: Any = np.float32, scale: float = 3.0
) -> dict[str, Any]:
    return {name: (RNG.standard_normal(shape) * scale).astype(dtype)}


# =============================================================================================
# FastGelu


TANH_ARG = """
    c3 = Constant <value = float {0.044715}> ()
    k = Constant <value = float {0.7978845608}> ()
    one = Constant <value = float {1.0}> ()
    half = Constant <value = float {0.5}> ()
    two = Constant <value = float {2.0}> ()
    three = Constant <value = float {3.0}> ()
    p = Pow (x, three)
    t1 = Mul (p, c3)
    t2 = Add (x, t1)
    t3 = Mul (t2, k)
    t = Tanh (t3)
    a = Add (t, one)
"""

GELU_FORMS = {
    "gpt2 (0.5x)(1+t)": "h = Mul (x, half)\n y = Mul (h, a)",
    "(1+t)(x*0.5)": "h = Mul (half, x)\n y = Mul (a, h)",
    "x(0.5(1+t))": "h = Mul (half, a)\n y = Mul (x, h)",
    "(x(1+t))0.5": "h = Mul (x, a)\n y = Mul (h, half)",
    "(x(1+t))/2": "h = Mul (a, x)\n y = Div (h, two)",
}


def gelu_model(
    body: str, tanh_arg: str = TANH_ARG, dtype: str = "float", extra_out: str = "", opset: int = 18
) -> onnx.ModelProto:
    outs = f"{dtype}[2, 8, 16] y" + (f", {dtype}[2, 8, 16] {extra_out}" if extra_out else "")
    return parse(f"""
        <ir_version: 10, opset_import: ["" : {opset}]>
        g ({dtype}[2, 8, 16] x) => ({outs}) {{ {tanh_arg} {body} }}""")


@pytest.mark.parametrize("form", list(GELU_FORMS))
def test_fast_gelu_fires_on_every_association(form: str) -> None:
    m, stats = fuse(gelu_model(GELU_FORMS[form]), feed((2, 8, 16)), "fast-gelu-tanh")
    assert stats.get("fast-gelu-tanh") == 1
    assert ops(m) == Counter({"FastGelu": 1}), ops(m)
    assert len(node(m, "FastGelu").inputs) == 1


def test_fast_gelu_accepts_x_times_x_times_x() -> None:
    arg = TANH_ARG.replace("p = Pow (x, three)", "sq = Mul (x, x)\n p = Mul (sq, x)")
    m, _ = fuse(gelu_model(GELU_FORMS["gpt2 (0.5x)(1+t)"], arg), feed((2, 8, 16)), "fast-gelu-tanh")
    assert ops(m) == Counter({"FastGelu": 1})


def test_fast_gelu_accepts_the_jax_argument_at_opset_15() -> None:
    """jax2tf/tf2onnx write x³ as x·(x·(0.044715·x)) (the pretrained magika classifier)."""
    arg = TANH_ARG.replace(
        "p = Pow (x, three)\n    t1 = Mul (p, c3)",
        "g0 = Mul (c3, x)\n    g1 = Mul (x, g0)\n    t1 = Mul (x, g1)",
    )
    assert "g1 = Mul (x, g0)" in arg
    m, _ = fuse(gelu_model(GELU_FORMS["x(0.5(1+t))"], arg, opset=15), feed((2, 8, 16)), "fast-gelu-tanh")
    assert ops(m) == Counter({"FastGelu": 1})


def test_full_fuse_ort_fuses_gpt2_association() -> None:
    """onnxscript's own GELU rule misses GPT-2's association; ours catches it in the full pass."""
    m, stats = fuse(gelu_model(GELU_FORMS["gpt2 (0.5x)(1+t)"]), feed((2, 8, 16)))
    assert stats.get("fast-gelu-tanh") == 1 and ops(m) == Counter({"FastGelu": 1})


BIAS_MODEL = """
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[2, 8, 12] inp) => (float[2, 8, 16] y) <float[12, 16] w, float[{bshape}] b> {{
        mm = MatMul (inp, w)
        x = Add ({order})
        {tanh_arg}
        h = Mul (x, half)
        y = Mul (h, a)
    }}"""


def bias_model(bias: np.ndarray, order: str = "mm, b") -> onnx.ModelProto:
    text = BIAS_MODEL.format(bshape=", ".join(map(str, bias.shape)), order=order, tanh_arg=TANH_ARG)
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(RNG.standard_normal((12, 16)).astype(np.float32), "w"),
            onnx.numpy_helper.from_array(bias, "b"),
        ]
    )
    del proto.graph.value_info[:]
    onnx.checker.check_model(proto)
    return proto


@pytest.mark.parametrize("order", ["mm, b", "b, mm"])
def test_fast_gelu_folds_the_matmul_bias(order: str) -> None:
    m, _ = fuse(
        bias_model(RNG.standard_normal(16).astype(np.float32), order),
        feed((2, 8, 12), "inp"),
        "fast-gelu-tanh",
    )
    assert ops(m) == Counter({"MatMul": 1, "FastGelu": 1}), ops(m)
    assert [v.name for v in node(m, "FastGelu").inputs] == ["mm", "b"]


def test_fast_gelu_keeps_a_bias_that_is_not_1d() -> None:
    m, _ = fuse(
        bias_model(RNG.standard_normal((1, 16)).astype(np.float32)), feed((2, 8, 12), "inp"), "fast-gelu-tanh"
    )
    assert ops(m) == Counter({"MatMul": 1, "Add": 1, "FastGelu": 1})
    assert len(node(m, "FastGelu").inputs) == 1


@pytest.mark.parametrize(
    "case",
    [
        "wrong 0.044715",
        "wrong sqrt(2/pi)",
        "half of another value",
        "tanh output also used",
        "pow 2",
        "float64",
    ],
)
def test_fast_gelu_look_alikes_are_not_fused(case: str) -> None:
    body, arg, extra, dtype = GELU_FORMS["gpt2 (0.5x)(1+t)"], TANH_ARG, "", "float"
    if case == "wrong 0.044715":
        arg = arg.replace("0.044715", "0.045")
    elif case == "wrong sqrt(2/pi)":
        arg = arg.replace("0.7978845608", "0.8")
    elif case == "half of another value":
        body = "z = Neg (x)\n h = Mul (z, half)\n y = Mul (h, a)"
    elif case == "tanh output also used":
        extra = "t"
    elif case == "pow 2":
        arg = arg.replace("three = Constant <value = float {3.0}>", "three = Constant <value = float {2.0}>")
    else:
        dtype = "double"
        arg = arg.replace("float {", "double {")
    m, stats = fuse(
        gelu_model(body, arg, dtype, extra),
        feed((2, 8, 16), dtype=np.float64 if dtype == "double" else np.float32),
        "fast-gelu-tanh",
    )
    assert "FastGelu" not in ops(m) and "fast-gelu-tanh" not in stats


# =============================================================================================
# QuickGelu


@pytest.mark.parametrize(
    ("body", "alpha"),
    [
        ("s = Sigmoid (x)\n y = Mul (x, s)", 1.0),
        ("s = Sigmoid (x)\n y = Mul (s, x)", 1.0),
        (
            "c = Constant <value = float {1.702}> ()\n xs = Mul (x, c)\n s = Sigmoid (xs)\n y = Mul (s, x)",
            1.702,
        ),
        (
            "c = Constant <value = float {1.702}> ()\n xs = Mul (c, x)\n s = Sigmoid (xs)\n y = Mul (x, s)",
            1.702,
        ),
    ],
)
def test_quick_gelu_fires_in_any_operand_order(body: str, alpha: float) -> None:
    proto = parse(f"""<ir_version: 10, opset_import: ["" : 18]>
        g (float[2, 8, 16] x) => (float[2, 8, 16] y) {{ {body} }}""")
    m, stats = fuse(proto, feed((2, 8, 16)), "quick-gelu")
    assert stats == {"quick-gelu": 1} and ops(m) == Counter({"QuickGelu": 1})
    assert node(m, "QuickGelu").attributes.get_float("alpha") == pytest.approx(alpha, rel=1e-6)


@pytest.mark.parametrize(
    "case", ["sigmoid(x)*y", "alpha not constant", "alpha not scalar", "sigmoid used twice", "float64"]
)
def test_quick_gelu_look_alikes_are_not_fused(case: str) -> None:
    dtype, inputs, outs = "float", "float[2, 8, 16] x, float[2, 8, 16] z", "float[2, 8, 16] y"
    body = {
        "sigmoid(x)*y": "s = Sigmoid (x)\n y = Mul (s, z)",
        "alpha not constant": "xs = Mul (x, z)\n s = Sigmoid (xs)\n y = Mul (s, x)",
        "alpha not scalar": "c = Constant <value = float[2] {1.0, 2.0}> ()\n r = Reshape (x, sh)\n"
        "xs = Mul (r, c)\n s = Sigmoid (xs)\n y0 = Mul (s, r)\n y = Reshape (y0, back)",
        "sigmoid used twice": "s = Sigmoid (x)\n y = Mul (s, x)\n w = Identity (s)",
        "float64": "s = Sigmoid (x)\n y = Mul (x, s)",
    }[case]
    if case == "alpha not scalar":
        body = (
            "sh = Constant <value = int64[4] {2, 8, 8, 2}> ()\n back = Constant <value = int64[3] {2, 8, 16}> ()\n"
            + body
        )
    if case == "sigmoid used twice":
        outs += ", float[2, 8, 16] w"
    if case == "float64":
        dtype, inputs, outs = "double", "double[2, 8, 16] x, double[2, 8, 16] z", "double[2, 8, 16] y"
    proto = parse(f"""<ir_version: 10, opset_import: ["" : 18]>
        g ({inputs}) => ({outs}) {{ {body} }}""")
    np_dtype = np.float64 if dtype == "double" else np.float32
    m, stats = fuse(
        proto, {**feed((2, 8, 16), dtype=np_dtype), **feed((2, 8, 16), "z", np_dtype)}, "quick-gelu"
    )
    assert "QuickGelu" not in ops(m) and not stats


# =============================================================================================
# FusedConv


def conv_model(
    tail: str,
    extra_inputs: str = "",
    bias: bool = True,
    opset: int = 18,
    outputs: str = "float[2, 4, 8, 8] y",
) -> onnx.ModelProto:
    b = ", b" if bias else ""
    proto = onnx.parser.parse_model(f"""
        <ir_version: 10, opset_import: ["" : {opset}]>
        g (float[2, 3, 8, 8] x{extra_inputs}) => ({outputs}) <float[4, 3, 3, 3] w{", float[4] b" if bias else ""}> {{
            c = Conv <pads = [1, 1, 1, 1]> (x, w{b})
            {tail}
        }}""")
    inits = [onnx.numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")]
    if bias:
        inits.append(onnx.numpy_helper.from_array(RNG.standard_normal(4).astype(np.float32), "b"))
    proto.graph.initializer.extend(inits)
    del proto.graph.value_info[:]
    onnx.checker.check_model(proto)
    return proto


X_CONV = {"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)}
Z_CONV = {"z": RNG.standard_normal((2, 4, 8, 8)).astype(np.float32)}


@pytest.mark.parametrize(
    ("tail", "activation", "params"),
    [
        ("y = Relu (c)", "Relu", None),
        ("y = Sigmoid (c)", "Sigmoid", None),
        ("y = Tanh (c)", "Tanh", None),
        ("y = LeakyRelu <alpha = 0.2> (c)", "LeakyRelu", [0.2]),
        ("y = LeakyRelu (c)", "LeakyRelu", [0.01]),
        ("y = HardSigmoid <alpha = 0.3, beta = 0.4> (c)", "HardSigmoid", [0.3, 0.4]),
        (
            "lo = Constant <value = float {0.0}> ()\n hi = Constant <value = float {6.0}> ()\n y = Clip (c, lo, hi)",
            "Clip",
            [0.0, 6.0],
        ),
        (
            "lo = Constant <value = float {-0.5}> ()\n y = Clip (c, lo)",
            "Clip",
            [-0.5, float(np.finfo(np.float32).max)],
        ),
    ],
)
def test_fused_conv_fires_for_each_cpu_activation(
    tail: str, activation: str, params: list[float] | None
) -> None:
    m, stats = fuse(conv_model(tail), X_CONV, "fused-conv")
    assert stats == {"fused-conv": 1} and ops(m) == Counter({"FusedConv": 1}), ops(m)
    fc = node(m, "FusedConv")
    assert fc.attributes.get_string("activation") == activation
    assert fc.attributes.get_ints("pads") == (1, 1, 1, 1)
    got = fc.attributes.get_floats("activation_params")
    assert (got is None) if params is None else got == pytest.approx(params, rel=1e-6)


def test_fused_conv_reads_clip_attributes_below_opset_11() -> None:
    m, _ = fuse(conv_model("y = Clip <min = 0.0, max = 6.0> (c)", opset=10), X_CONV, "fused-conv")
    assert node(m, "FusedConv").attributes.get_floats("activation_params") == pytest.approx([0.0, 6.0])


@pytest.mark.parametrize(
    ("tail", "bias"),
    [
        ("s = Add (c, z)\n y = Relu (s)", True),
        ("s = Add (z, c)\n y = Relu (s)", True),
        ("s = Add (c, z)\n y = Relu (s)", False),
        ("s = Add (c, z)\n y = Sigmoid (s)", True),
    ],
)
def test_fused_conv_takes_a_same_shape_residual_as_z(tail: str, bias: bool) -> None:
    m, _ = fuse(conv_model(tail, ", float[2, 4, 8, 8] z", bias), {**X_CONV, **Z_CONV}, "fused-conv")
    assert ops(m) == Counter({"FusedConv": 1}), ops(m)
    inputs = node(m, "FusedConv").inputs
    assert len(inputs) == 4 and inputs[3] is not None and inputs[3].name == "z"
    assert (inputs[2] is None) == (not bias)


@pytest.mark.parametrize(
    "case",
    ["conv used twice", "clip min not constant", "broadcast residual", "add without activation", "elu"],
)
def test_fused_conv_look_alikes_are_not_fused(case: str) -> None:
    extra, outputs, feeds = "", "float[2, 4, 8, 8] y", dict(X_CONV)
    if case == "conv used twice":
        tail, outputs = "y = Relu (c)\n y2 = Neg (c)", outputs + ", float[2, 4, 8, 8] y2"
    elif case == "clip min not constant":
        tail, extra, feeds["lo"] = "y = Clip (c, lo)", ", float lo", np.array(0.1, dtype=np.float32)
    elif case == "broadcast residual":
        tail, extra, feeds["z"] = (
            "s = Add (c, z)\n y = Relu (s)",
            ", float[1, 4, 1, 1] z",
            RNG.standard_normal((1, 4, 1, 1)).astype(np.float32),
        )
    elif case == "add without activation":
        tail, extra, feeds = "y = Add (c, z)", ", float[2, 4, 8, 8] z", {**feeds, **Z_CONV}
    else:
        tail = "y = Elu (c)"
    m, stats = fuse(conv_model(tail, extra, outputs=outputs), feeds, "fused-conv")
    assert "FusedConv" not in ops(m) and not stats


# =============================================================================================
# RotaryEmbedding (transformers-5 angles: positions[..., None].float() * inv_freq)

HEAD, E = 16, 8
INV_FREQ = (1.0 / (10000 ** (np.arange(0, HEAD, 2, dtype=np.float32) / HEAD))).astype(np.float32)
BOUND = {"pkg.torch.export.ExportedProgram.range_constraints": "{s0: VR[1, 64], s1: VR[0, 32]}"}


def rope_model(
    positions: str = "zero = Constant <value = int64 {0}> ()\n pos = Range (zero, s, one)",
    inputs: str = "",
    pos_type: str = "int64[s1] pos",
    freqs: str = "Mul (pf, inv_freq)",
    unsqueeze_axes: str = "0, 2",
    scale: str = "",
    split: int = E,
    cos_dtype: str = "",
    qtype: str = "float",
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """q [B, 4 heads, S, 16] rotated like transformers 5's apply_rotary_pos_emb."""
    cos, sin = "c0", "s0"
    extra = ""
    if scale:
        extra += f"sc = Constant <value = float {{{scale}}}> ()\n c1 = Mul (c0, sc)\n s1_ = Mul (s0, sc)\n"
        cos, sin = "c1", "s1_"
    if cos_dtype:
        extra += f"c2 = Cast <to = {cos_dtype}> ({cos})\n s2 = Cast <to = {cos_dtype}> ({sin})\n"
        cos, sin = "c2", "s2"
    n_axes = len(unsqueeze_axes.split(","))
    proto = onnx.parser.parse_model(f"""
        <ir_version: 10, opset_import: ["" : 18]>
        g ({qtype}[s0, 4, s1, 16] q{inputs}) => ({qtype}[s0, 4, s1, 16] y) <{pos_type}, float[8] inv_freq> {{
            shp = Shape <start = 2, end = 3> (q)
            s = Squeeze (shp)
            one = Constant <value = int64 {{1}}> ()
            {positions}
            ax = Constant <value = int64[{n_axes}] {{{unsqueeze_axes}}}> ()
            pu = Unsqueeze (pos, ax)
            pf = Cast <to = 1> (pu)
            freqs = {freqs}
            emb = Concat <axis = -1> (freqs, freqs)
            c0 = Cos (emb)
            s0 = Sin (emb)
            {extra}
            ax1 = Constant <value = int64[1] {{1}}> ()
            c4 = Unsqueeze ({cos}, ax1)
            s4 = Unsqueeze ({sin}, ax1)
            qc = Mul (q, c4)
            zero1 = Constant <value = int64[1] {{0}}> ()
            half = Constant <value = int64[1] {{{split}}}> ()
            end = Constant <value = int64[1] {{9223372036854775807}}> ()
            axis3 = Constant <value = int64[1] {{3}}> ()
            x1 = Slice (q, zero1, half, axis3)
            x2 = Slice (q, half, end, axis3)
            nx2 = Neg (x2)
            rot = Concat <axis = -1> (nx2, x1)
            rs = Mul (rot, s4)
            y = Add (qc, rs)
        }}""")
    proto.graph.initializer.append(onnx.numpy_helper.from_array(INV_FREQ, "inv_freq"))
    for k, v in (metadata if metadata is not None else BOUND).items():
        proto.graph.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    return proto


def q_feed(batch: int = 2, seq: int = 12) -> dict[str, np.ndarray]:
    return {"q": RNG.standard_normal((batch, 4, seq, HEAD)).astype(np.float32)}


@pytest.mark.parametrize("rules", ["rotary-embedding-mul", None])
def test_rotary_gets_a_constant_cache_of_the_sequence_bound(rules: str | None) -> None:
    """Alone it matches the decomposed form; in the full pass, onnxscript's intermediate op."""
    proto = rope_model()
    m, stats = fuse(proto, q_feed(), rules)
    assert stats.get("rotary-embedding-mul") == 1 and ops(m) == Counter({"RotaryEmbedding": 1}), ops(m)
    rope = node(m, "RotaryEmbedding")
    assert rope.attributes.get_int("num_heads") == 4 and rope.attributes.get_int("interleaved") == 0
    pos, cos, sin = rope.inputs[1:]
    assert pos.const_value.numpy().tolist() == [0]  # type: ignore[union-attr]
    assert cos.const_value.shape == (32, E) and sin.const_value.shape == (32, E)  # type: ignore[union-attr]
    for seq in (1, 32):  # the bound itself still runs
        feeds = q_feed(3, seq)
        assert_same(run(proto.SerializeToString(), feeds), run(graphopt.to_bytes(m), feeds), RTOL, ATOL)


def test_rotary_without_a_bound_computes_the_cache_from_the_angles() -> None:
    m, _ = fuse(rope_model(metadata={}), q_feed(), "rotary-embedding-mul")
    assert ops(m) - Counter({"Constant": 99}) == Counter(
        {
            "RotaryEmbedding": 1,
            "Shape": 1,
            "Squeeze": 1,
            "Range": 1,
            "Unsqueeze": 1,
            "Cast": 1,
            "Mul": 1,
            "Reshape": 1,
            "Cos": 1,
            "Sin": 1,
        }
    ), ops(m)


def test_rotary_with_an_offset_start_and_scaling() -> None:
    """Range(past, past + S): computed cache, right for any start; attention scaling kept."""
    proto = rope_model("pend = Add (past, s)\n pos = Range (past, pend, one)", ", int64 past", scale="0.75")
    for past in (0, 5):
        m, _ = fuse(proto, {**q_feed(), "past": np.array(past, dtype=np.int64)}, "rotary-embedding-mul")
        assert ops(m)["RotaryEmbedding"] == 1 and "Neg" not in ops(m)


def test_rotary_constant_cache_keeps_scaling_and_float16_cast() -> None:
    proto = rope_model(scale="0.75", cos_dtype="10", qtype="float16")
    m, _ = fuse(proto, {"q": q_feed()["q"].astype(np.float16)}, "rotary-embedding-mul", rtol=1e-3, atol=2e-3)
    cos = node(m, "RotaryEmbedding").inputs[2]
    assert cos.dtype == ir.DataType.FLOAT16 and cos.const_value.shape == (32, E)  # type: ignore[union-attr]
    expected = 0.75 * np.cos(3 * INV_FREQ[1])
    np.testing.assert_allclose(cos.const_value.numpy()[3, 1], expected, rtol=1e-3)  # type: ignore[union-attr]


def test_rotary_per_batch_positions_get_a_computed_cache() -> None:
    """Per-batch positions (a position_ids input, as KV-cache exports have) are unbounded: no
    constant cache, but one row per token computed at run time, read through
    ``Reshape(Range(0, B·S), [B, S])``. Rows hold different positions (a past of 5 on row 1)."""
    feeds = q_feed()
    proto = rope_model("pos = Identity (pid)", ", int64[s0, s1] pid", "int64[s0, s1] pos", unsqueeze_axes="2")
    feeds["pid"] = np.stack([np.arange(12), np.arange(5, 17)]).astype(np.int64)
    m, stats = fuse(proto, feeds, "rotary-embedding-mul")
    assert stats.get("rotary-embedding-mul") == 1, stats
    for rope in [n for n in m.graph if n.op_type == "RotaryEmbedding"]:
        pos = rope.inputs[1]
        assert pos is not None and pos.const_value is None and pos.producer().op_type == "Reshape"  # type: ignore[union-attr]
        assert rope.inputs[2].const_value is None  # type: ignore[union-attr]


@pytest.mark.parametrize("case", ["split not at half", "inv_freq not constant", "angles from a float input"])
def test_rotary_look_alikes_are_not_fused(case: str) -> None:
    feeds = q_feed()
    if case == "split not at half":
        proto = rope_model(split=4)
    elif case == "inv_freq not constant":
        proto = rope_model(freqs="Mul (pf, inv)", inputs=", float[8] inv")
        feeds["inv"] = INV_FREQ
    else:
        proto = rope_model("pos = Identity (pfl)", ", float[s1] pfl", "float[s1] pos")
        feeds["pfl"] = np.arange(12, dtype=np.float32)
    m, stats = fuse(proto, feeds, "rotary-embedding-mul")
    assert "RotaryEmbedding" not in ops(m) and not stats


# =============================================================================================
# Real exports: tiny GPT-2 and Llama, padded inputs


def _contrib(model: ir.Model) -> Counter[str]:
    return Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain == MS)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def fused_export(request: pytest.FixtureRequest) -> tuple[str, Any, ir.Model, ir.Model]:
    pytest.importorskip("transformers")
    from models import build

    built = build(request.param, "tiny")
    model = built.export()
    original = graphopt.to_bytes(model)
    result = graphopt.optimize(model, "ort-cpu", pipeline="cleanup,fuse-ort")
    return request.param, built, graphopt.load(original), result.model


def test_fuse_ort_on_tiny_exports_keeps_outputs_and_fuses_every_layer(fused_export: Any) -> None:
    kind, built, original, fused = fused_export
    feeds = built.feeds(batch=2, seq=16)
    assert feeds["attention_mask"].min() == 0  # padding is exercised
    assert_same(run(graphopt.to_bytes(original), feeds), run(graphopt.to_bytes(fused), feeds), RTOL, ATOL)
    contrib, std = _contrib(fused), ops(fused)
    if kind == "gpt2":
        assert contrib["FastGelu"] == 2 and std["Tanh"] == 0 and std["Pow"] == 0, contrib
    else:
        assert contrib["RotaryEmbedding"] == 4 and contrib["QuickGelu"] == 2, contrib
        assert std["Sigmoid"] == 0 and std["Cos"] == 0 and std["Sin"] == 0 and std["Neg"] == 0, std
        rope = next(n for n in fused.graph if n.op_type == "RotaryEmbedding")
        # max_position_embeddings rows (the export's sequence bound), head_size / 2 columns
        assert rope.inputs[2].const_value.shape == (built.config.max_position_embeddings, 8)  # type: ignore[union-attr]
        assert not any(n.domain.startswith("ai.onnxruntime") for n in fused.graph)

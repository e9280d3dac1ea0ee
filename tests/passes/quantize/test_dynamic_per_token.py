"""quantize-dynamic per-token activations, centering and GPTQ: ONNX Runtime's output equals a numpy
model of the scheme, zero rows stay exact, centering and GPTQ lower the error they target, and
the options that need calibration data or per-channel weights say so."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from scipy.special import erf

from graphopt.calibration import CalibrationData
from graphopt.errors import PipelineError
from graphopt.passes.quantize.dynamic import QuantizeDynamicPass, gptq_int8, quantize_weight
from graphopt.pipeline import Pipeline
from graphopt.verify import run_model

K, N = 64, 48


@pytest.fixture(scope="module")
def bert_tiny():
    from models import build

    built = build("bert", "tiny")
    model, _ = Pipeline.parse("cleanup,fuse,cleanup").run(built.export())
    return built, model


def _mlp(act: str | None, ln_shift: float | None = None) -> ir.Model:
    """[norm ->] [act ->] MatMul + Add(bias): one quantizable node whose input the test controls."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, N)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")]
    nodes, src = [], "x"
    if ln_shift is not None:
        beta = np.full(K, ln_shift, np.float32)
        beta[::2] = -ln_shift / 4  # channels sitting on different sides of zero
        inits += [numpy_helper.from_array(np.ones(K, np.float32), "g"), numpy_helper.from_array(beta, "beta")]
        nodes.append(helper.make_node("LayerNormalization", ["x", "g", "beta"], ["n"], axis=-1))
        src = "n"
    if act:
        nodes.append(helper.make_node(act, [src], ["a"], domain="com.microsoft" if act == "Gelu" else ""))
        src = "a"
    nodes += [
        helper.make_node("MatMul", [src, "W"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "b"], ["y"]),
    ]
    vi = [helper.make_tensor_value_info(v, TensorProto.FLOAT, [2, 5, K]) for v in ("n", "a") if v != "x"]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, N])],
        inits,
        value_info=vi,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 9
    return ir.serde.deserialize_model(model)


def _quantize(model: ir.Model, **options) -> tuple[ir.Model, dict]:
    m = model.clone()
    p = QuantizeDynamicPass(**options)
    p(m)
    return m, p.stats


def _out(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return dict(run_model(model, {"x": x}))["y"]


@pytest.mark.parametrize("act", [None, "symmetric", "Relu", "Gelu"])
def test_ort_output_is_the_per_token_scheme(act):
    """Two-sided inputs: q = round(255·x / (hi − lo)) + z over the row's range with zero in it
    (lo = min(row, 0), hi = max(row, 0), z = round(−255·lo / (hi − lo)), carried into the kernel by
    extra columns of z against rows of W summing to −ΣW), or with
    asymmetric=false q = round(127·x / max|x|) (+128); inputs bounded below by -c (ReLU: 0, GELU:
    0.1701): q = round(255·(x + c) / max(x + c)), the shift taken back out of the bias."""
    symmetric = act == "symmetric"
    act = None if symmetric else act
    model = _mlp(act)
    q, stats = _quantize(
        model, outlier_channels=0.0, smooth=0.0, activations="per-token", asymmetric=not symmetric
    )
    assert collections.Counter(n.op_type for n in q.graph)["MatMulIntegerToFloat"] == 1
    x = (np.random.default_rng(1).standard_normal((2, 5, K)) * 3).astype(np.float32)
    if act is None:  # rows on one side of zero
        x[0, 0] = np.abs(x[0, 0]) + 5
        x[1, 4] = -np.abs(x[1, 4]) - 5
    a = {None: x, "Relu": np.maximum(x, 0), "Gelu": x * 0.5 * (1 + erf(x / np.sqrt(2)))}[act].astype(
        np.float64
    )
    w = model.graph.initializers["W"].const_value.numpy()
    b = model.graph.initializers["b"].const_value.numpy()
    lv, scale, _ = quantize_weight(w)
    wd = lv.astype(np.float64) * scale
    if symmetric:
        r = np.abs(a).max(-1, keepdims=True)
        ad = np.clip(np.round(a / r * 127), -127, 127) / 127 * r
    elif act is None:  # zero a level: an integer zero point per row, in float32 as the graph computes it
        a32 = a.astype(np.float32)
        lo = np.minimum(a32.min(-1, keepdims=True), 0)
        hi = np.maximum(a32.max(-1, keepdims=True), 0)
        flip = hi + lo < 0  # reaching further below zero: mirrored levels, zero point <= 128
        r = np.where(flip, lo - hi, hi - lo)
        neg_inv = np.float32(-255.0) / r
        z = np.round(np.where(flip, hi, lo) * neg_inv)
        assert z.max() <= 128 and flip.any() and not flip.all()
        ad = (np.clip(np.round(z - a32 * neg_inv), 0, 255) - z).astype(np.float64) / 255 * r
    else:
        c = 0.0 if act == "Relu" else 0.1701
        r = (a + c).max(-1, keepdims=True)
        ad = np.clip(np.round((a + c) / r * 255), 0, 255) / 255 * r - c
    np.testing.assert_allclose(_out(q, x), ad @ wd + b, rtol=1e-4, atol=1e-4)


def test_the_row_zero_point_goes_into_the_kernel():
    """Asymmetric levels with symmetric int8 weights: the padding columns carry each row's zero
    point against int8 rows of W summing to −ΣW, so only the row scale runs over the output; the
    rows stay within ±127 and zero points ≤ 128 (u8·s8 pairs fit int16 without VNNI). Asymmetric weights keep the
    rowmin ⊗ ΣW term after the kernel, and both are close to float."""
    model = _mlp(None)
    x = np.random.default_rng(3).standard_normal((2, 5, K)).astype(np.float32) + 0.5
    ref = _out(model, x)
    q, _ = _quantize(model, outlier_channels=0.0, smooth=0.0, activations="per-token")
    ops = collections.Counter(n.op_type for n in q.graph)
    mm = next(n for n in q.graph if n.op_type == "MatMulIntegerToFloat")
    w = mm.inputs[1].const_value.numpy()
    rows = w.shape[0] - K
    assert rows >= 4 and rows % 4 == 0
    lv, _, _ = quantize_weight(model.graph.initializers["W"].const_value.numpy())
    np.testing.assert_array_equal(w[:K], lv)
    np.testing.assert_array_equal(w[K:].astype(np.int64).sum(axis=0), -lv.astype(np.int64).sum(axis=0))
    assert np.abs(w[K:].astype(np.int64)).max() <= 127
    assert ops["Pad"] == 1 and ops["Mul"] == 3  # x·step, zero point·step, and the row scale
    [user] = mm.outputs[0].uses()
    assert user.node.op_type == "Mul"
    err = np.abs(_out(q, x) - ref).max() / np.abs(ref).max()
    aw, _ = _quantize(model, outlier_channels=0.0, smooth=0.0, activations="per-token", symmetric=False)
    assert collections.Counter(n.op_type for n in aw.graph)["Pad"] == 0
    assert (
        next(n for n in aw.graph if n.op_type == "MatMulIntegerToFloat")
        .inputs[1]
        .const_value.numpy()
        .shape[0]
        == K
    )
    err_aw = np.abs(_out(aw, x) - ref).max() / np.abs(ref).max()
    assert err < 0.02 and err_aw < 0.02, (err, err_aw)


def test_auto_goes_per_token_where_a_few_tokens_set_the_range():
    """Two projections of the same kind of input, one with a massive first token (as trained
    transformers' [CLS]/[SEP] tokens): only that one is quantized per token."""
    rng = np.random.default_rng(6)
    gain = np.ones((1, 8, 1), np.float32)
    gain[0, 0] = 20.0
    inits = [numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), n) for n in ("w1", "w2")]
    inits.append(numpy_helper.from_array(gain, "gain"))
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "gain"], ["hot"]),
            helper.make_node("MatMul", ["hot", "w1"], ["y1"], name="hot_tokens"),
            helper.make_node("MatMul", ["x", "w2"], ["y2"], name="even_tokens"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, K])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 8, N]) for n in ("y1", "y2")],
        inits,
        value_info=[helper.make_tensor_value_info("hot", TensorProto.FLOAT, [2, 8, K])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 9
    m = ir.serde.deserialize_model(model)
    p = QuantizeDynamicPass(outlier_channels=0.0)
    p(m)
    kinds = {
        n.outputs[0].name: n.op_type
        for n in m.graph
        if n.op_type in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul")
    }
    assert sorted(kinds.values()) == ["DynamicQuantizeMatMul", "MatMulIntegerToFloat"]
    assert p.details["token_ratio"]["hot"] > 10 > 2 > p.details["token_ratio"]["x"]
    y = dict(run_model(m, {"x": rng.standard_normal((2, 8, K)).astype(np.float32)}))
    assert np.isfinite(y["y1"]).all() and np.isfinite(y["y2"]).all()


def test_zero_rows_come_out_exact():
    model = _mlp(None)
    q, _ = _quantize(model, outlier_channels=0.0, activations="per-token")
    x = np.random.default_rng(2).standard_normal((2, 5, K)).astype(np.float32)
    x[1, 3] = 0.0  # 0 / 0 in the row normalization: the row's levels are garbage, times a range of 0
    x[0, 2] = 3.0  # a constant row: zero is in its range too, so 3.0 is the top level, exact
    x[1, 1] = -2.0  # and a negative one: the bottom level
    y = _out(q, x)
    assert np.isfinite(y).all()
    b = model.graph.initializers["b"].const_value.numpy()
    np.testing.assert_allclose(y[1, 3], b, atol=1e-6)
    lv, scale, _ = quantize_weight(model.graph.initializers["W"].const_value.numpy())
    np.testing.assert_allclose(y[0, 2], 3.0 * (lv * scale).sum(axis=0) + b, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(y[1, 1], -2.0 * (lv * scale).sum(axis=0) + b, rtol=1e-5, atol=1e-4)


def test_centering_a_one_sided_norm_output_lowers_the_error():
    """A LayerNorm whose shift puts channels far from zero: per-token symmetric levels waste half
    their range unless each channel is first centered (and the shift returned through the bias)."""
    model = _mlp(None, ln_shift=6.0)
    x = np.random.default_rng(3).standard_normal((2, 5, K)).astype(np.float32)
    # The reference has the int8 weights already, so the error measured is the activations' alone.
    w = model.graph.initializers["W"]
    lv, scale, _ = quantize_weight(w.const_value.numpy())
    reference = model.clone()
    reference.graph.initializers["W"].const_value = ir.tensor((lv * scale).astype(np.float32), name="W")
    ref = _out(reference, x)

    def err(m: ir.Model) -> float:
        return float(np.linalg.norm(_out(m, x) - ref) / np.linalg.norm(ref))

    centered, stats = _quantize(model, smooth=0.0, activations="per-token", asymmetric=False)
    plain, _ = _quantize(model, smooth=0.0, center=False, activations="per-token", asymmetric=False)
    asym, _ = _quantize(model, smooth=0.0, activations="per-token")
    assert stats.get("center") == 1 and stats.get("center:folded") == 1  # into the norm's shift
    assert collections.Counter(n.op_type for n in centered.graph)["Add"] == 1  # only the bias add
    assert err(centered) < err(plain) / 2, (err(centered), err(plain))
    # Asymmetric levels (the default) fit each row's own range, less tightly than per-channel
    # centering does when the channels sit on both sides, but better than plain symmetric levels.
    assert err(asym) < err(plain), (err(asym), err(plain))


def test_gptq_int8_lowers_the_output_error_on_correlated_inputs():
    rng = np.random.default_rng(4)
    basis = rng.standard_normal((8, K))
    x = rng.standard_normal((512, 8)) @ basis + 0.05 * rng.standard_normal((512, K))  # low-rank inputs
    w = rng.standard_normal((K, N)).astype(np.float32)
    h = x.T @ x
    lv, scale, zp = gptq_int8(w, h)
    rlv, rscale, _ = quantize_weight(w)
    assert lv.dtype == np.int8 and np.abs(lv).max() <= 127 and not zp.any()
    np.testing.assert_array_equal(scale, rscale)  # same per-channel grid as round-to-nearest
    e_gptq = np.linalg.norm(x @ (lv * scale - w))
    e_rtn = np.linalg.norm(x @ (rlv * rscale - w))
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)


def test_calibration_data_switches_weights_to_gptq(bert_tiny):
    built, fused = bert_tiny
    feeds = [built.feeds(2, 12, seed=s) for s in range(3)]
    ctx = {"calibration": CalibrationData.from_any(feeds)}
    m, report = Pipeline.parse("quantize-dynamic").run(fused.clone(), context=ctx)
    row = report.passes[0]
    assert row.details["weights"] == "gptq" and row.stats["gptq"] == row.stats["quantized"]
    m_rtn, report = Pipeline.parse("quantize-dynamic(method=rtn)").run(fused.clone(), context=ctx)
    assert report.passes[0].details["weights"] == "rtn"
    test = built.feeds(3, 16, seed=9)

    def cos(a: ir.Model) -> float:
        r, c = dict(run_model(fused, test)), dict(run_model(a, test))
        return min(
            float(np.dot(r[k].ravel(), c[k].ravel()) / np.linalg.norm(r[k]) / np.linalg.norm(c[k])) for k in r
        )

    assert cos(m) >= 0.99 and cos(m_rtn) >= 0.99


def test_gptq_needs_calibration_and_per_channel_symmetric_weights(bert_tiny):
    _, fused = bert_tiny
    with pytest.raises(PipelineError, match="needs calibration data"):
        Pipeline.parse("quantize-dynamic(method=gptq)").run(fused.clone())
    with pytest.raises(PipelineError, match="per_channel"):
        QuantizeDynamicPass(method="gptq", per_channel=False)


def test_output_projection_bias_goes_into_the_skip_norm(bert_tiny):
    _, fused = bert_tiny
    q, stats = _quantize(fused, activations="per-token")
    assert stats.get("bias:absorbed", 0) >= 2
    for node in q.graph:
        if node.op_type == "SkipLayerNormalization":
            assert (
                node.inputs[0].producer().op_type != "Add"
                or node.inputs[0].producer().inputs[1].const_value is None
            )


def test_attention_with_mask_index_stays_per_tensor():
    rng = np.random.default_rng(5)
    d, heads = 16, 2
    w = rng.standard_normal((d, 3 * d)).astype(np.float32)
    b = rng.standard_normal(3 * d).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node(
                "Attention",
                ["x", "w", "b", "mask"],
                ["y"],
                domain="com.microsoft",
                num_heads=heads,
                name="att",
            )
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, d]),
            helper.make_tensor_value_info("mask", TensorProto.INT32, [2, 6]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, d])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 9
    q, stats = _quantize(ir.serde.deserialize_model(model), min_size=0)
    assert collections.Counter(n.op_type for n in q.graph)["QAttention"] == 1
    assert stats.get("per-tensor:attention mask_index") == 1


def test_a_massive_norm_channel_is_split_into_copies_with_calibration_data():
    """A LayerNorm output whose channel 3 is massive at some tokens (a [CLS]/[SEP]-like row: one
    huge input channel, normalized): with calibration data the channel is divided by c and
    appended c−1 times (its weight row repeated), which lowers the error of those rows; the
    integer product stays exact (the copies' rows and the zero-point rows are in the weight)."""
    model = _mlp(None, ln_shift=0.0)

    def feeds(seed: int) -> dict[str, np.ndarray]:
        x = np.random.default_rng(seed).standard_normal((2, 5, K)).astype(np.float32)
        x[:, 0, 3] = 60.0  # LayerNorm turns it into ~sqrt(K) on channel 3, the rest of the row small
        return {"x": x}

    data = [feeds(s) for s in range(4)]
    x = feeds(9)["x"]
    ref = _out(model, x)

    def run(copies: int) -> tuple[ir.Model, dict]:
        m = model.clone()
        p = QuantizeDynamicPass(
            outlier_channels=0.0, activations="per-token", method="rtn", channel_copies=copies
        )
        p.context = {"calibration": CalibrationData.from_any(data)}
        p(m)
        return m, p.stats

    split, stats = run(16)
    plain, plain_stats = run(0)
    assert stats["channel_copies"] > 0 and "channel_copies" not in plain_stats
    w = next(n for n in split.graph if n.op_type == "MatMulIntegerToFloat").inputs[1].const_value.numpy()
    w0 = next(n for n in plain.graph if n.op_type == "MatMulIntegerToFloat").inputs[1].const_value.numpy()
    assert w.shape[0] > w0.shape[0]
    np.testing.assert_array_equal(
        w[K : K + stats["channel_copies"]], np.repeat(w[3:4], stats["channel_copies"], axis=0)
    )
    err = np.abs(_out(split, x) - ref)[:, 0].max()
    err0 = np.abs(_out(plain, x) - ref)[:, 0].max()
    assert err < 0.7 * err0, (err, err0)
    # generated inputs (no calibration data) do not split
    _, free = _quantize(model, outlier_channels=0.0, activations="per-token")
    assert "channel_copies" not in free


def _symbolic(name: str, dims: list[str | int], op: str = "Identity") -> ir.Model:
    """x [dims] → Identity, or Add of a (1, 8, K) constant (then it runs only with 8 rows, as a
    model that cannot take longer inputs) → MatMul."""
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros((1, 8, K), np.float32), "eight_rows"),
    ]
    nodes = [
        helper.make_node("Add", [name, "eight_rows"], ["r"])
        if op == "Add"
        else helper.make_node("Identity", [name], ["r"]),
        helper.make_node("MatMul", ["r", "w"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
        value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, dims)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 9
    return ir.serde.deserialize_model(model)


def test_the_generated_probe_runs_long_sequences_and_falls_back_to_default_sizes(caplog):
    """Without calibration data the probe's generated inputs get ``probe_length`` tokens (a first or
    batch-named axis gets 1): 16 tokens in all left all-MiniLM-L6-v2's worst sentence at 0.9969, 32
    inputs of 64 at 0.998. A model that cannot run those sizes is probed at the default ones
    instead of not at all, without a warning."""
    from graphopt.passes.quantize.dynamic import _probe_dims

    assert _probe_dims(_symbolic("x", ["s0", "s1", K]), 64) == {"s0": 1, "s1": 64}
    assert _probe_dims(_symbolic("x", [2, "batch", "seq", K]), 32) == {"batch": 1, "seq": 32}
    for op in ("Identity", "Add"):
        m = _symbolic("x", ["b", "seq", K], op)
        p = QuantizeDynamicPass(activations="per-token")
        with caplog.at_level("WARNING"):
            p(m)
        assert "probe:failed" not in p.stats and p.stats["quantized"] == 1, op
        assert not [r for r in caplog.records if "probe" in r.getMessage()], op
        dims = {"b": 1, "seq": 64} if op == "Identity" else "default"
        assert p.details["probe"] == {"data": "generated", "inputs": 32, "dims": dims}, op
    p = QuantizeDynamicPass(activations="per-token", probe_length=8)
    p(_symbolic("x", ["batch", 3, K], "Add"))  # 3 rows where 8 are needed at every size: no probe
    assert p.stats["probe:failed"] == 1

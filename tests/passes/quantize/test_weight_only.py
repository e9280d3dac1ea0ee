"""quantize-weight-only: MatMulNBits / GatherBlockQuantized structure, packed weights against a numpy
RTN reference, model outputs against float on ONNX Runtime, GPTQ against RTN, options and skips."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import graphopt
from graphopt.errors import PipelineError
from graphopt.passes.quantize.weight_only import QuantizeWeightOnlyPass, unpack_blocks
from graphopt.pipeline import Pipeline
from graphopt.verify import run_model

MS = "com.microsoft"


# --- helpers ---------------------------------------------------------------------------------
def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def ms_nodes(model: ir.Model, op: str) -> list[ir.Node]:
    return [n for n in model.graph if n.domain == MS and n.op_type == op]


def quantize(model: ir.Model, spec: str = "quantize-weight-only", **context) -> tuple[ir.Model, dict]:
    model, report = Pipeline.parse(spec).run(model, context=context)
    row = [p for p in report.passes if p.name == "quantize-weight-only"][-1]
    return model, row


def decisions(row) -> dict[str, tuple[bool, str]]:
    return {d["node"]: (d["quantized"], d["reason"]) for d in row.details.get("nodes", [])}


def reference_rtn(w_kn: np.ndarray, bits: int, block: int, symmetric: bool) -> np.ndarray:
    """Dequantized ``W [K, N]`` by plain round-to-nearest, written independently of the pass:
    symmetric: the block's largest-magnitude value maps to level -2^(bits-1) (ORT's convention);
    asymmetric: [min(x, 0), max(x, 0)] onto 0..2^bits-1 with a rounded zero point."""
    k, n = w_kn.shape
    kp = -(-k // block) * block
    w = np.zeros((kp, n), np.float32)
    w[:k] = w_kn
    out = np.zeros_like(w)
    maxq = 2**bits - 1
    half = 2 ** (bits - 1)
    for j in range(n):
        for b0 in range(0, kp, block):
            x = w[b0 : b0 + block, j]
            if symmetric:
                peak = x[np.argmax(np.abs(x))]
                s = np.float32(peak / -half) or np.float32(1)
                q = np.clip(np.round(x / s), -half, half - 1)
                out[b0 : b0 + block, j] = q * s
            else:
                lo, hi = min(x.min(), 0), max(x.max(), 0)
                s = np.float32((hi - lo) / maxq) or np.float32(1)
                z = np.clip(np.round(-lo / s), 0, maxq)
                q = np.clip(np.round(x / s) + z, 0, maxq)
                out[b0 : b0 + block, j] = (q - z) * s
    return out[:k]


def dequantize_node(node: ir.Node) -> np.ndarray:
    """``W [K, N]`` from a MatMulNBits node's packed initializers, as its schema defines them."""
    k, n = node.attributes.get_int("K"), node.attributes.get_int("N")
    bits, bs = node.attributes.get_int("bits"), node.attributes.get_int("block_size")
    packed = node.inputs[1].const_value.numpy()
    nb = -(-k // bs)
    assert packed.shape == (n, nb, bs * bits // 8)
    q = unpack_blocks(packed, bits).reshape(n, nb, bs).astype(np.float32)
    scales = node.inputs[2].const_value.numpy().reshape(n, nb)
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        zp = unpack_blocks(node.inputs[3].const_value.numpy(), bits, nb).astype(np.float32)
        assert zp.shape == (n, nb)
    else:
        zp = np.full((n, nb), 2 ** (bits - 1), np.float32)
    w = (q - zp[..., None]) * scales[..., None]
    return w.reshape(n, nb * bs)[:, :k].T


def matmul_model(
    w: np.ndarray, *, gemm: dict | None = None, bias: np.ndarray | None = None, shared: bool = False
) -> ir.Model:
    """x[B, S, K] @ w (MatMul) or Gemm(x[M, K], w, bias, **gemm); ``shared``: two MatMuls read w."""
    k = w.shape[1] if gemm and gemm.get("transB") else w.shape[0]
    x = ir.Value(
        name="x",
        type=ir.TensorType(ir.DataType.FLOAT),
        shape=ir.Shape(["M", k] if gemm is not None else ["B", "S", k]),
    )
    wv = ir.Value(
        name="w",
        type=ir.TensorType(ir.DataType.FLOAT),
        shape=ir.Shape(w.shape),
        const_value=ir.tensor(w, name="w"),
    )
    inits = [wv]
    if gemm is not None:
        inputs = [x, wv]
        if bias is not None:
            bv = ir.Value(
                name="c",
                type=ir.TensorType(ir.DataType.FLOAT),
                shape=ir.Shape(bias.shape),
                const_value=ir.tensor(bias, name="c"),
            )
            inits.append(bv)
            inputs.append(bv)
        nodes = [ir.node("Gemm", inputs, attributes=gemm, name="gemm")]
    else:
        nodes = [ir.node("MatMul", [x, wv], name="mm")]
        if shared:
            nodes.append(ir.node("MatMul", [nodes[0].outputs[0], wv], name="mm2"))
    out = nodes[-1].outputs[0]
    out.name = "y"
    out.dtype = ir.DataType.FLOAT
    graph = ir.Graph([x], [out], nodes=nodes, initializers=inits, opset_imports={"": 21})
    from graphopt.passes.cleanup import ShapeInferencePass

    model = ir.Model(graph, ir_version=10)
    ShapeInferencePass()(model)
    return model


# --- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    from models import build_llama

    built = build_llama("tiny")
    fused = graphopt.optimize(built.export(), pipeline="cleanup,fuse").model
    return built, fused


@pytest.fixture(scope="module")
def gpt2_lm():
    from models import build_gpt2

    built = build_gpt2("tiny", lm_head=True)
    return built, built.export()


# --- structure -------------------------------------------------------------------------------
def test_llama_after_fuse_matmuls_become_matmulnbits_with_schema_shapes(llama):
    built, fused = llama
    shapes = {
        n.name: n.inputs[1].const_value.numpy().shape
        for n in fused.graph
        if n.op_type == "MatMul" and n.inputs[1].const_value is not None
    }
    q, row = quantize(fused.clone(), "quantize-weight-only(min_size=0)")
    nbits = ms_nodes(q, "MatMulNBits")
    assert len(nbits) == len(shapes) == 14
    assert not [n for n in q.graph if n.op_type == "MatMul" and n.name in shapes]
    for n in nbits:
        k, nn = shapes[n.name]
        a = n.attributes
        assert (a.get_int("K"), a.get_int("N"), a.get_int("bits"), a.get_int("block_size")) == (k, nn, 4, 32)
        assert a.get_int("accuracy_level") == 4
        assert n.inputs[1].const_value.numpy().shape == (nn, k // 32, 16)
        assert n.inputs[1].dtype == ir.DataType.UINT8
        assert n.inputs[2].const_value.numpy().shape == (nn, k // 32)
        assert len(n.inputs) == 3  # symmetric: no zero points
    (emb,) = ms_nodes(q, "GatherBlockQuantized")
    assert emb.inputs[0].const_value.numpy().shape == (100, 32)
    assert emb.inputs[2].const_value.numpy().shape == (100, 2)
    assert q.opset_imports[MS] == 1
    assert row.stats["quantized"] == 15
    # the float weights are gone: the file is smaller
    assert "embed_tokens.weight" not in q.graph.initializers
    assert (
        graphopt.pipeline.model_stats(q).initializer_bytes
        < 0.3 * graphopt.pipeline.model_stats(fused).initializer_bytes
    )


def test_min_size_skips_small_weights_with_reason(llama):
    _, fused = llama
    q, row = quantize(fused.clone())
    d = decisions(row)
    small = [name for name, (ok, reason) in d.items() if not ok]
    assert len(small) == 4 and all(d[s][1].startswith("too small (64x32") for s in small)
    assert len(ms_nodes(q, "MatMulNBits")) == 10


# --- numerics --------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,block,k", [(4, 32, 96), (4, 16, 80), (8, 32, 64), (4, 64, 200)])
def test_packed_weights_dequantize_to_numpy_rtn_reference(bits, block, k, symmetric):
    rng = np.random.default_rng(k + bits)
    w = (rng.standard_normal((k, 48)) * rng.uniform(0.1, 2, (1, 48))).astype(np.float32)
    w[:, 3] = 0.0  # all-zero blocks
    model = matmul_model(w)
    q, _ = quantize(
        model,
        f"quantize-weight-only(bits={bits},block_size={block},symmetric={str(symmetric).lower()},"
        "min_size=0,accuracy_level=0)",
    )
    (node,) = ms_nodes(q, "MatMulNBits")
    assert node.attributes.get_int("K") == k
    assert (len(node.inputs) > 3) == (not symmetric)
    if not symmetric:
        nb = -(-k // block)
        assert node.inputs[3].const_value.numpy().shape == (48, -(-nb * bits // 8))
    deq = dequantize_node(node)
    ref = reference_rtn(w, bits, block, symmetric)
    np.testing.assert_allclose(deq, ref, rtol=1e-6, atol=1e-7)
    # and ONNX Runtime computes x @ deq
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    y = run_model(q, {"x": x})[0][1]
    np.testing.assert_allclose(y, x @ ref, rtol=1e-4, atol=1e-4)


def test_llama_output_close_to_float(llama):
    built, fused = llama
    feeds = built.feeds(2, 16, seed=3)
    ref = run_model(fused, feeds)[0][1]
    for spec, bound in [
        ("quantize-weight-only", 0.99),
        ("quantize-weight-only(bits=8)", 0.9995),
        ("quantize-weight-only(symmetric=false,accuracy_level=0)", 0.99),
    ]:
        q, _ = quantize(fused.clone(), spec)
        assert cosine(run_model(q, feeds)[0][1], ref) > bound, spec


def test_gpt2_lm_logits_on_a_cleaned_model_gemm_path(gpt2_lm):
    built, model = gpt2_lm
    cleaned = graphopt.optimize(model, pipeline="cleanup").model
    gemms = [n for n in cleaned.graph if n.op_type == "Gemm"]
    assert gemms, "GPT-2's exported Linear layers are Gemm"
    q, row = quantize(cleaned.clone(), "quantize-weight-only(min_size=0)")
    d = decisions(row)
    assert all(d[g.name][0] for g in gemms)
    biased = [n for n in ms_nodes(q, "MatMulNBits") if n.name in {g.name for g in gemms}]
    assert biased and all(len(n.inputs) == 6 and n.inputs[5] is not None for n in biased)
    feeds = built.feeds(2, 16, seed=1)
    assert cosine(run_model(q, feeds)[0][1], run_model(cleaned, feeds)[0][1]) > 0.99


def test_lm_head_option_keeps_output_projection_float(gpt2_lm):
    _, model = gpt2_lm
    fused = graphopt.optimize(model, pipeline="cleanup,fuse").model
    (head,) = [n for n in fused.graph if n.op_type == "MatMul" and n.outputs[0] in fused.graph.outputs]
    q, row = quantize(fused.clone(), "quantize-weight-only(lm_head=false)")
    assert decisions(row)[head.name] == (False, "lm_head kept float")
    assert any(n.name == head.name and n.op_type == "MatMul" for n in q.graph)
    q2, row2 = quantize(fused.clone(), "quantize-weight-only")
    assert decisions(row2)[head.name][0]


def test_gemm_trans_b_with_bias_and_rejected_gemms():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 64)).astype(np.float32)  # [N, K] with transB=1
    c = rng.standard_normal(40).astype(np.float32)
    model = matmul_model(w, gemm={"transB": 1}, bias=c)
    q, row = quantize(model, "quantize-weight-only(min_size=0,accuracy_level=0)")
    (node,) = ms_nodes(q, "MatMulNBits")
    assert (node.attributes.get_int("K"), node.attributes.get_int("N")) == (64, 40)
    np.testing.assert_array_equal(node.inputs[5].const_value.numpy(), c)
    ref = reference_rtn(w.T, 4, 32, True)
    np.testing.assert_allclose(dequantize_node(node), ref, rtol=1e-6, atol=1e-7)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(run_model(q, {"x": x})[0][1], x @ ref + c, rtol=1e-4, atol=1e-4)
    for attrs, reason in [
        ({"alpha": 2.0}, "Gemm alpha != 1"),
        ({"transA": 1}, "Gemm transA=1"),
        ({"beta": 0.5}, "Gemm beta != 1"),
    ]:
        k = 64
        m = matmul_model(rng.standard_normal((k, 40)).astype(np.float32), gemm=attrs, bias=c)
        if attrs.get("transA"):
            m.graph.inputs[0].shape = ir.Shape([k, "M"])
        q, row = quantize(m, "quantize-weight-only(min_size=0)")
        assert decisions(row) == {"gemm": (False, reason)}
        assert not ms_nodes(q, "MatMulNBits")


def test_shared_weight_quantized_once():
    w = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    q, row = quantize(matmul_model(w, shared=True), "quantize-weight-only(min_size=0)")
    a, b = ms_nodes(q, "MatMulNBits")
    assert a.inputs[1] is b.inputs[1] and a.inputs[2] is b.inputs[2]
    assert row.stats["quantized"] == 2
    assert "w" not in q.graph.initializers


def test_gptq_beats_rtn_on_layer_output_error():
    rng = np.random.default_rng(0)
    k, n = 128, 64
    w = rng.standard_normal((k, n)).astype(np.float32)
    mix = rng.standard_normal((k, k)) * np.exp(rng.uniform(-2, 1, k))  # correlated, uneven channels
    calib = [{"x": (rng.standard_normal((4, 32, k)) @ mix).astype(np.float32)} for _ in range(4)]
    test = (rng.standard_normal((2, 64, k)) @ mix).astype(np.float32)

    def error(spec: str, **ctx) -> float:
        q, row = quantize(matmul_model(w), spec, **ctx)
        assert row.details.get("method") == spec.split("method=")[1].split(",")[0].rstrip(")")
        y = run_model(q, {"x": test})[0][1]
        return float(np.mean((y - test @ w) ** 2))

    base = "quantize-weight-only(min_size=0,accuracy_level=0,method="
    rtn = error(base + "rtn)")
    gptq = error(base + "gptq)", calibration=calib)
    gptq_act = error(base + "gptq,act_order=true)", calibration=calib)
    assert gptq < 0.7 * rtn
    assert gptq_act < 0.7 * rtn
    # deterministic
    assert error(base + "gptq)", calibration=calib) == gptq


def test_gptq_on_llama_improves_hidden_state_and_is_default_with_data(llama):
    built, fused = llama
    calib = [built.feeds(2, 32, seed=s) for s in range(1, 4)]
    feeds = built.feeds(2, 16, seed=100)
    ref = run_model(fused, feeds)[0][1]
    spec = "quantize-weight-only(quantize_embeddings=false,accuracy_level=0)"
    rtn, _ = quantize(fused.clone(), spec)
    gptq, row = quantize(fused.clone(), spec, calibration=calib)
    # sequential: one run per distinct input activation (attention in, o_proj in, MLP in, down in) x 2 layers
    assert row.details["method"] == "gptq" and row.details["calibration_runs"] == 8
    once, row1 = quantize(fused.clone(), spec[:-1] + ",sequential=false)", calibration=calib)
    assert row1.details["calibration_runs"] == 1
    e_rtn = np.mean((run_model(rtn, feeds)[0][1] - ref) ** 2)
    e_gptq = np.mean((run_model(gptq, feeds)[0][1] - ref) ** 2)
    e_once = np.mean((run_model(once, feeds)[0][1] - ref) ** 2)
    assert e_gptq < 0.8 * e_rtn and e_once < 0.9 * e_rtn


# --- options and skips -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [
        "quantize-weight-only(bits=3)",
        "quantize-weight-only(block_size=24)",
        "quantize-weight-only(block_size=8)",
        "quantize-weight-only(accuracy_level=7)",
        "quantize-weight-only(method=awq2)",
        "quantize-weight-only(damp=2)",
    ],
)
def test_bad_options_raise_pipeline_error(spec):
    with pytest.raises(PipelineError):
        Pipeline.parse(spec)


def test_gptq_without_calibration_data_is_a_clear_error():
    w = np.ones((64, 64), np.float32)
    with pytest.raises(PipelineError, match="calibration"):
        quantize(matmul_model(w), "quantize-weight-only(method=gptq,min_size=0)")


def test_exclude_and_include_are_honoured(llama):
    _, fused = llama
    q, row = quantize(fused.clone(), "quantize-weight-only(exclude=[node_linear_4,node_embedding])")
    d = decisions(row)
    assert d["node_linear_4"] == (False, "excluded") and d["node_embedding"] == (False, "excluded")
    assert any(n.name == "node_linear_4" and n.op_type == "MatMul" for n in q.graph)
    assert not ms_nodes(q, "GatherBlockQuantized")
    q, row = quantize(fused.clone(), "quantize-weight-only(include=[node_linear_6])")
    assert [n.name for n in ms_nodes(q, "MatMulNBits")] == ["node_linear_6"]
    q, row = quantize(fused.clone(), "quantize-weight-only(quantize_embeddings=false)")
    assert not ms_nodes(q, "GatherBlockQuantized")


def test_fused_bert_attention_weights_stay_float_and_are_recorded():
    from models import build_bert

    built = build_bert("tiny")
    fused = graphopt.optimize(built.export(), pipeline="cleanup,fuse").model
    attention = [n for n in fused.graph if n.domain == MS and n.op_type == "Attention"]
    q, row = quantize(fused.clone())
    d = decisions(row)
    for n in attention:
        assert d[n.name] == (False, "packed QKV weight inside fused Attention")
    feeds = built.feeds(2, 16, seed=0)
    assert cosine(run_model(q, feeds)[0][1], run_model(fused, feeds)[0][1]) > 0.99


def test_input_model_without_candidates_is_unchanged():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 64]))
    node = ir.node("Relu", [x], name="relu")
    node.outputs[0].name = "y"
    model = ir.Model(ir.Graph([x], [node.outputs[0]], nodes=[node], opset_imports={"": 21}), ir_version=10)
    result = QuantizeWeightOnlyPass()(model)
    assert not result.modified
    assert MS not in model.opset_imports


def norm_matmul_model(gamma: np.ndarray, w: np.ndarray, w2: np.ndarray) -> ir.Model:
    """x -> LayerNormalization(gamma, beta) -> two MatMuls (q/k-like) -> Add."""
    k = gamma.shape[0]
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", "S", k]))

    def init(name: str, a: np.ndarray) -> ir.Value:
        return ir.Value(
            name=name,
            type=ir.TensorType(ir.DataType.FLOAT),
            shape=ir.Shape(a.shape),
            const_value=ir.tensor(a, name=name),
        )

    g, b = init("gamma", gamma), init("beta", np.full(k, 0.1, np.float32))
    wa, wb = init("wa", w), init("wb", w2)
    ln = ir.node("LayerNormalization", [x, g, b], attributes={"axis": -1}, name="ln")
    m1 = ir.node("MatMul", [ln.outputs[0], wa], name="m1")
    m2 = ir.node("MatMul", [ln.outputs[0], wb], name="m2")
    add = ir.node("Add", [m1.outputs[0], m2.outputs[0]], name="add")
    add.outputs[0].name = "y"
    graph = ir.Graph(
        [x], [add.outputs[0]], nodes=[ln, m1, m2, add], initializers=[g, b, wa, wb], opset_imports={"": 21}
    )
    from graphopt.passes.cleanup import ShapeInferencePass

    model = ir.Model(graph, ir_version=10)
    ShapeInferencePass()(model)
    return model


def test_awq_folds_channel_scales_into_the_norm_and_beats_rtn_on_salient_channels():
    rng = np.random.default_rng(0)
    k, n = 128, 64
    gamma = np.ones(k, np.float32)
    gamma[rng.choice(k, 6, replace=False)] = 25.0  # a few salient input channels, as in real LLMs
    w, w2 = (rng.standard_normal((2, k, n)) * 0.05).astype(np.float32)
    calib = [{"x": rng.standard_normal((2, 32, k)).astype(np.float32)} for _ in range(4)]
    test = {"x": rng.standard_normal((2, 32, k)).astype(np.float32)}
    ref = run_model(norm_matmul_model(gamma, w, w2), test)[0][1]

    def error(method: str) -> tuple[float, dict, ir.Model]:
        q, row = quantize(
            norm_matmul_model(gamma, w, w2),
            f"quantize-weight-only(min_size=0,accuracy_level=0,method={method})",
            calibration=calib,
        )
        return float(np.mean((run_model(q, test)[0][1] - ref) ** 2)), row.details, q

    e_rtn, _, _ = error("rtn")
    e_awq, details, q = error("awq")
    assert details["awq_folded"] == 1 and details["awq_alphas"][0] > 0
    (ln,) = [nd for nd in q.graph if nd.op_type == "LayerNormalization"]
    assert ln.inputs[1].name != "gamma" and ln.inputs[2].name != "beta"  # new, scaled copies
    assert e_awq < 0.8 * e_rtn
    e_both, details, _ = error("awq-gptq")
    assert e_both < e_rtn


def test_awq_skips_sites_it_cannot_fold_exactly():
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((1, 8, 64)).astype(np.float32)}]
    q, row = quantize(
        matmul_model(rng.standard_normal((64, 32)).astype(np.float32)),
        "quantize-weight-only(min_size=0,method=awq)",
        calibration=calib,
    )
    assert row.details["awq_skipped"] == {"input not from a norm or a Mul by a constant": 1}
    assert row.details["awq_folded"] == 0
    assert len(ms_nodes(q, "MatMulNBits")) == 1


def test_float16_weights_and_embedding_get_float16_scales_and_run():
    rng = np.random.default_rng(0)
    f16 = ir.DataType.FLOAT16
    w = rng.standard_normal((64, 48)).astype(np.float16)
    e = rng.standard_normal((100, 64)).astype(np.float16)
    x = ir.Value(name="x", type=ir.TensorType(f16), shape=ir.Shape(["B", 64]))
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["B"]))
    wv = ir.Value(
        name="w", type=ir.TensorType(f16), shape=ir.Shape(w.shape), const_value=ir.tensor(w, name="w")
    )
    ev = ir.Value(
        name="e", type=ir.TensorType(f16), shape=ir.Shape(e.shape), const_value=ir.tensor(e, name="e")
    )
    gather = ir.node("Gather", [ev, ids], name="embed")
    add = ir.node("Add", [x, gather.outputs[0]], name="add")
    mm = ir.node("MatMul", [add.outputs[0], wv], name="mm")
    mm.outputs[0].name = "y"
    model = ir.Model(
        ir.Graph(
            [x, ids], [mm.outputs[0]], nodes=[gather, add, mm], initializers=[wv, ev], opset_imports={"": 21}
        ),
        ir_version=10,
    )
    from graphopt.passes.cleanup import ShapeInferencePass

    ShapeInferencePass()(model)
    q, row = quantize(model, "quantize-weight-only(min_size=0,accuracy_level=0)")
    assert row.stats["quantized"] == 2
    (node,) = ms_nodes(q, "MatMulNBits")
    (emb,) = ms_nodes(q, "GatherBlockQuantized")
    assert node.inputs[2].dtype == f16 and emb.inputs[2].dtype == f16
    w_ref = reference_rtn(w.astype(np.float32), 4, 32, True)
    e_ref = reference_rtn(e.astype(np.float32).T, 4, 32, True).T
    np.testing.assert_allclose(dequantize_node(node), w_ref, rtol=2e-3, atol=2e-3)
    feeds = {"x": rng.standard_normal((3, 64)).astype(np.float16), "ids": np.array([1, 5, 99])}
    expect = (feeds["x"].astype(np.float32) + e_ref[feeds["ids"]]) @ w_ref
    y = run_model(q, feeds)[0][1]
    assert y.dtype == np.float16
    assert cosine(y, expect) > 0.999


def test_gptq_with_fewer_tokens_than_k_falls_back_to_rtn_and_says_so():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 32)).astype(np.float32)
    calib = [{"x": rng.standard_normal((1, 16, 128)).astype(np.float32)}]  # 16 tokens < K=128
    q, row = quantize(matmul_model(w), "quantize-weight-only(min_size=0,method=gptq)", calibration=calib)
    assert row.stats["gptq_fallback_rtn"] == 1
    assert decisions(row)["mm"] == (True, "rtn (gptq: 16 calibration tokens < 1*K=128) 4-bit")
    (node,) = ms_nodes(q, "MatMulNBits")
    np.testing.assert_allclose(dequantize_node(node), reference_rtn(w, 4, 32, True), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("pipeline", ["cleanup", "cleanup,fuse"])
def test_awq_folds_into_decomposed_rmsnorm_mul_or_fused_norm_exactly_on_llama(llama, pipeline):
    built = llama[0]
    model = graphopt.optimize(built.export(), pipeline=pipeline).model
    calib = [built.feeds(2, 64, seed=s) for s in range(2)]
    q, row = quantize(
        model.clone(), "quantize-weight-only(method=awq,min_size=0,awq_grid=3)", calibration=calib
    )
    assert row.details["awq_folded"] + list(row.details["awq_alphas"]).count(0.0) == 4  # q/k/v, gate/up x 2
    feeds = built.feeds(2, 16, seed=5)
    assert cosine(run_model(q, feeds)[0][1], run_model(model, feeds)[0][1]) > 0.985


def test_awq_scaling_is_exact_before_rounding_through_a_reshape():
    """GPT-2 style: LayerNorm -> Reshape (K stays last) -> Gemm. With 8 bits and block 16 the fold must
    leave the output where RTN leaves it: an inexact fold would show as a large error."""
    from models import build_gpt2

    built = build_gpt2("tiny")
    model = graphopt.optimize(built.export(), pipeline="cleanup").model
    calib = [built.feeds(2, 32, seed=s) for s in range(2)]
    q, row = quantize(
        model.clone(), "quantize-weight-only(method=awq,bits=8,block_size=16,min_size=0)", calibration=calib
    )
    assert row.details["awq_folded"] >= 1
    feeds = built.feeds(2, 16, seed=5)
    assert cosine(run_model(q, feeds)[0][1], run_model(model, feeds)[0][1]) > 0.9995

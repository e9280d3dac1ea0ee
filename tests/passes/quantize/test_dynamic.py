"""quantize-dynamic: lowering to per-token MatMulIntegerToFloat / MultiHeadAttention (default) and
per-tensor DynamicQuantizeMatMul / QAttention, int8 per-channel weights (RTN and GPTQ), per-token
numerics against numpy, centering, no activation x activation quantization, accuracy vs float on
tiny BERT/GPT-2 with padded masks, outlier handling, options and errors; and the real
all-MiniLM-L6-v2 on real sentences (slow)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import GraphoptError, PipelineError
from graphopt.passes.quantize.dynamic import QuantizeDynamicPass, quantize_weight
from graphopt.pipeline import Pipeline
from graphopt.verify import run_model

FUSED = "cleanup,fuse,cleanup"


def _fused(kind: str):
    from models import build

    built = build(kind, "tiny")
    model, _ = Pipeline.parse(FUSED).run(built.export())
    return built, model


@pytest.fixture(scope="module")
def bert():
    return _fused("bert")


@pytest.fixture(scope="module")
def gpt2():
    return _fused("gpt2")


def quantize(model: ir.Model, options: str = "", context: dict | None = None):
    m = model.clone()
    m, report = Pipeline.parse(f"quantize-dynamic({options})").run(m, context=context or {})
    return m, report.passes[0]


def ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def outputs_cosine(ref: ir.Model, cand: ir.Model, feeds: dict) -> float:
    r, c = run_model(ref, feeds), run_model(cand, feeds)
    return min(cosine(x[1], y[1]) for x, y in zip(r, c, strict=True))


# --- weight quantization ----------------------------------------------------------------------


def test_quantize_weight_per_channel_symmetric():
    w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    w[:, 3] *= 50  # one wide column must not coarsen the others (per-channel)
    q, scale, zp = quantize_weight(w)
    assert q.dtype == np.int8 and scale.shape == (8,) and zp.shape == (8,) and not zp.any()
    assert np.abs(q).max() <= 127
    err = np.abs(q.astype(np.float32) * scale - w)
    assert (err <= scale / 2 + 1e-6).all()
    assert scale[0] < scale[3] / 10


def test_quantize_weight_reduce_range_and_asymmetric():
    w = np.random.default_rng(1).uniform(-1, 3, (32, 4)).astype(np.float32)
    q, _, _ = quantize_weight(w, reduce_range=True)
    assert np.abs(q).max() <= 63
    q, scale, zp = quantize_weight(w, symmetric=False)
    assert zp.dtype == np.int8 and zp.any()
    assert np.abs((q.astype(np.float32) - zp) * scale - w).max() <= scale.max() / 2 + 1e-6
    q, scale, _ = quantize_weight(w, per_channel=False)
    assert scale.shape == ()


# --- structure --------------------------------------------------------------------------------


def test_bert_lowering_per_token(bert):
    """Per token: attention → int8 QKV + MultiHeadAttention; MatMuls → MatMulIntegerToFloat."""
    built, fused = bert
    q, rec = quantize(fused, "activations=per-token")
    c = ops(q)
    assert c["MultiHeadAttention"] == 2 and c["Attention"] == 0 and c["QAttention"] == 0
    assert c["MatMulIntegerToFloat"] >= 8 and c["DynamicQuantizeMatMul"] == 0
    assert rec.stats["quantized"] == c["MatMulIntegerToFloat"]  # the QKV projections are among them
    assert rec.details["activations"] == "per-token" and rec.details["weights"] == "rtn"
    assert c["ReduceMin"] >= 4  # asymmetric levels for two-sided inputs (GELU outputs: shifted)
    _, rec = quantize(fused, "activations=per-token,asymmetric=false")
    assert rec.stats.get("center", 0) >= 6  # symmetric: norm and attention outputs centered
    for node in q.graph:
        if node.op_type == "MatMulIntegerToFloat":
            w = node.inputs[1].const_value.numpy()
            assert w.dtype == np.int8 and node.inputs[3].const_value.numpy().shape == (w.shape[1],)
            assert node.inputs[0].producer().op_type == "QuantizeLinear"
    onnx.checker.check_model(ir.serde.serialize_model(q))
    assert outputs_cosine(fused, q, built.feeds(3, 16, seed=1)) >= 0.99


def test_bert_lowering(bert):
    _, fused = bert
    assert ops(fused)["Attention"] == 2
    q, rec = quantize(fused, "activations=per-tensor")
    c = ops(q)
    assert c["QAttention"] == 2 and c["Attention"] == 0
    assert c["DynamicQuantizeMatMul"] >= 6
    assert rec.stats["quantized"] == c["QAttention"] + c["DynamicQuantizeMatMul"]
    for node in q.graph:
        if node.op_type in ("DynamicQuantizeMatMul", "QAttention"):
            w = node.inputs[1].const_value.numpy()
            scale = node.inputs[2 if node.op_type == "DynamicQuantizeMatMul" else 4].const_value.numpy()
            assert w.dtype == np.int8 and scale.shape == (w.shape[1],)  # per output channel
        if node.op_type == "QAttention":
            assert node.inputs[0].producer().op_type == "DynamicQuantizeLinear"
            assert node.inputs[5] is not None and node.inputs[5].dtype == ir.DataType.INT32  # raw mask
    # Activation x activation MatMuls (attention scores in un-fused graphs) never become int8;
    # every float MatMul left has a non-constant second operand or was outside the candidates.
    decisions = rec.details["nodes"]
    assert all(d["quantized"] for d in decisions if d["op_type"] == "Attention")
    onnx.checker.check_model(ir.serde.serialize_model(q))


def test_activation_times_activation_not_quantized():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
            helper.make_node("MatMul", ["h", "y"], ["z"], name="act_act"),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 8]),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 8])],
        [w],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    q, rec = quantize(model, "activations=per-tensor")
    by_name = {d["node"]: d for d in rec.details["nodes"]}
    assert by_name["proj"]["quantized"]
    assert not by_name["act_act"]["quantized"] and "activation" in by_name["act_act"]["reason"]
    assert ops(q) == collections.Counter({"DynamicQuantizeMatMul": 1, "MatMul": 1})
    assert ops(quantize(model)[0])["MatMul"] == 1
    feeds = {
        "x": rng.standard_normal((4, 32)).astype(np.float32),
        "y": rng.standard_normal((32, 8)).astype(np.float32),
    }
    assert outputs_cosine(model, q, feeds) > 0.999


def test_gemm_and_bias_fusion():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 48)).astype(np.float32)  # transB: (N, K)
    b = rng.standard_normal(16).astype(np.float32)
    w2 = rng.standard_normal((16, 40)).astype(np.float32)
    b2 = rng.standard_normal(40).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1, alpha=0.5, name="gemm"),
            helper.make_node("MatMul", ["h", "w2"], ["m"], name="mm"),
            helper.make_node("Add", ["m", "b2"], ["y"], name="bias"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 48])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 40])],
        [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (w2, "w2"), (b2, "b2"))],
        value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", 16])],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    q, _ = quantize(model, "min_size=0,activations=per-tensor")
    assert ops(q) == collections.Counter({"DynamicQuantizeMatMul": 2})  # the Add went into the kernel
    assert [o.name for o in q.graph.outputs] == ["y"]
    feeds = {"x": rng.standard_normal((5, 48)).astype(np.float32)}
    assert outputs_cosine(model, q, feeds) > 0.999
    q, _ = quantize(model, "min_size=0,activations=per-token")
    assert ops(q)["MatMulIntegerToFloat"] == 2 and [o.name for o in q.graph.outputs] == ["y"]
    assert outputs_cosine(model, q, feeds) > 0.999


# --- accuracy vs float (padded masks) ---------------------------------------------------------


def test_bert_tiny_accuracy(bert):
    built, fused = bert
    q, _ = quantize(fused)
    assert outputs_cosine(fused, q, built.feeds(3, 16, seed=1)) >= 0.99


def test_gpt2_tiny_accuracy(gpt2):
    built, fused = gpt2
    q, rec = quantize(fused, "activations=per-token,asymmetric=false")
    assert ops(q)["MatMulIntegerToFloat"] >= 6
    assert rec.stats.get("smooth:folded", 0) >= 2  # pre-LN: smoothing folded into the norms
    assert rec.stats.get("center:folded", 0) >= 2  # and the centering into their shift
    assert outputs_cosine(fused, q, built.feeds(3, 16, seed=1)) >= 0.99


def test_optimize_pipeline_order(bert):
    """The wiring the coordinator uses: quantize after the contrib fusions, then cleanup."""
    built, _ = bert
    raw = built.export()
    r = graphopt.optimize(raw, pipeline="cleanup,fuse,quantize-dynamic,cleanup")
    c = ops(r.model)
    assert c["MultiHeadAttention"] + c["QAttention"] == 2 and c["MatMul"] <= 2
    assert outputs_cosine(raw, r.model, built.feeds(2, 12)) >= 0.99


# --- outlier handling ---------------------------------------------------------------------------


def _outlier_mlp():
    """x -> LayerNorm (one channel's scale 40x) -> MatMul -> Relu (a few hot neurons) -> MatMul."""
    rng = np.random.default_rng(3)
    gamma = np.ones(64, np.float32)
    gamma[7] = 40.0
    w1 = rng.standard_normal((64, 256)).astype(np.float32) * 0.1
    w1[:, 5] *= 60  # neuron 5 fires far above the others
    w2 = rng.standard_normal((256, 64)).astype(np.float32) * 0.1
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in ((gamma, "g"), (np.zeros(64, np.float32), "beta"), (w1, "w1"), (w2, "w2"))
    ]
    graph = helper.make_graph(
        [
            helper.make_node("LayerNormalization", ["x", "g", "beta"], ["n"], axis=-1, name="ln"),
            helper.make_node("MatMul", ["n", "w1"], ["h"], name="up"),
            helper.make_node("Relu", ["h"], ["r"], name="act"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="down"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16, 64])],
        inits,
        value_info=[
            helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", 16, k])
            for n, k in (("n", 64), ("h", 256), ("r", 256))
        ],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_outliers_smoothed_and_split():
    model = _outlier_mlp()
    feeds = {"x": np.random.default_rng(4).standard_normal((2, 16, 64)).astype(np.float32)}
    plain, _ = quantize(model, "smooth=0,outlier_channels=0,activations=per-tensor")
    q, rec = quantize(model, "activations=per-tensor")
    assert rec.stats.get("smooth") == 1 and rec.stats.get("outlier_split") == 1
    # The LayerNorm output feeds only "up": 1/s went into its scale and shift, no Mul was added.
    assert rec.stats.get("smooth:folded") == 1
    ln = next(n for n in q.graph if n.op_type == "LayerNormalization")
    assert ln.inputs[1].const_value.numpy()[7] < 40.0
    assert 5 in rec.details["outlier_channels"]["r"]
    c = ops(q)
    assert c["DynamicQuantizeMatMul"] == 2 and c["Gather"] == 1 and c["MatMul"] == 1  # the float side path
    err = {name: 1 - outputs_cosine(model, m, feeds) for name, m in (("plain", plain), ("handled", q))}
    assert err["handled"] < err["plain"] / 3, err
    # Per token (the default) the same outliers cost less to begin with, and the handling still helps.
    tok_plain, _ = quantize(model, "smooth=0,outlier_channels=0,center=false")
    tok, rec = quantize(model)
    assert ops(tok)["MatMulIntegerToFloat"] == 2 and rec.stats.get("outlier_split") == 1
    err_tok = {
        name: 1 - outputs_cosine(model, m, feeds) for name, m in (("plain", tok_plain), ("handled", tok))
    }
    assert err_tok["handled"] < err_tok["plain"] and err_tok["plain"] < err["plain"], (err, err_tok)


def test_outlier_ratio_keeps_node_float():
    model = _outlier_mlp()
    q, rec = quantize(model, "outlier_ratio=5,outlier_channels=0,smooth=0")
    reasons = {d["node"]: d["reason"] for d in rec.details["nodes"]}
    assert "outliers" in reasons["down"] and ops(q)["MatMul"] >= 1


# --- options, exclusions, errors --------------------------------------------------------------


def test_exclude_include_and_op_types(bert):
    _, fused = bert
    q, rec = quantize(fused, "exclude=[Attention]")
    assert ops(q)["MultiHeadAttention"] + ops(q)["QAttention"] == 0 and ops(q)["Attention"] == 2
    assert {d["reason"] for d in rec.details["nodes"] if d["op_type"] == "Attention"} == {"excluded"}
    name = next(n.name for n in fused.graph if n.op_type == "MatMul")
    q, rec = quantize(fused, f"include=[{name}]")
    assert rec.stats["quantized"] == 1
    q, _ = quantize(fused, "op_types=[Attention],activations=per-token")
    assert ops(q)["DynamicQuantizeMatMul"] == 0 and ops(q)["MatMulIntegerToFloat"] == 2
    assert ops(q)["MultiHeadAttention"] == 2
    _, rec = quantize(fused, "min_size=100000000")
    assert "quantized" not in rec.stats


def test_reduce_range_and_per_tensor(bert):
    _, fused = bert
    q, _ = quantize(fused, "reduce_range=true,per_channel=false")
    for node in q.graph:
        if node.op_type == "DynamicQuantizeMatMul":
            assert np.abs(node.inputs[1].const_value.numpy()).max() <= 63
            assert node.inputs[2].const_value.numpy().shape == ()


@pytest.mark.parametrize(
    "options",
    [
        "op_types=[Conv]",
        "smooth=1.5",
        "min_size=-1",
        "probe_batches=0",
        "probe_length=0",
        "outlier_channels=-1",
    ],
)
def test_bad_options(options):
    with pytest.raises(PipelineError):
        Pipeline.parse(f"quantize-dynamic({options})")


def test_bad_option_is_graphopt_error():
    with pytest.raises(GraphoptError):
        QuantizeDynamicPass(per_channel="maybe")


def test_input_model_untouched_and_deterministic(bert):
    _, fused = bert
    before = graphopt.to_bytes(fused)
    a, _ = quantize(fused)
    b, _ = quantize(fused)
    assert graphopt.to_bytes(fused) == before
    assert graphopt.to_bytes(a) == graphopt.to_bytes(b)


# --- real pretrained model ----------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_min_cosine():
    """The default target pipeline, data-free and with calibration text that shares no sentence
    with the ones measured (GPTQ weights, probe from real text)."""
    import pretrained as P

    built = P.build_minilm()
    raw = built.export()
    feeds = P.minilm_feeds(P.SENTENCES)
    ref = P.mean_pool(dict(run_model(raw, feeds))["last_hidden_state"], feeds["attention_mask"])
    tok = P.load_tokenizer()
    calibration = [P.minilm_feeds([s], tok) for s in P.CALIBRATION_SENTENCES]
    for kw, floor in (({}, MINILM_MIN_COSINE), ({"calibration": calibration}, MINILM_MIN_COSINE_CALIBRATED)):
        r = graphopt.optimize(raw, "ort-cpu", quantize="dynamic", **kw)
        got = P.mean_pool(dict(run_model(r.model, feeds))["last_hidden_state"], feeds["attention_mask"])
        assert P.min_cosine(ref, got) >= floor, kw.keys()


#: What the default reaches on SENTENCES, with a little room for other CPUs' integer kernels (see
#: benchmarks/results/quantize_dynamic.md: 0.998 data-free, 0.9985 with the calibration text; other
#: seeds of the data-free probe's generated inputs give 0.9975-0.9982);
#: ORT's quantize_dynamic reaches 0.97 at its best setting on the same export.
MINILM_MIN_COSINE = 0.9975
MINILM_MIN_COSINE_CALIBRATED = 0.998


def test_gather_embedding_opt_in(bert):
    built, fused = bert
    q, _ = quantize(fused)
    assert all(
        n.inputs[0].const_value is None or n.inputs[0].dtype != ir.DataType.INT8
        for n in q.graph
        if n.op_type == "Gather"
    )
    q, rec = quantize(fused, "op_types=[MatMul,Gemm,Attention,Gather]")
    tables = [
        n.inputs[0].const_value.numpy()
        for n in q.graph
        if n.op_type == "Gather"
        and n.inputs[0].const_value is not None
        and n.inputs[0].dtype == ir.DataType.INT8
    ]
    assert rec.stats.get("Gather", 0) >= 1 and len(tables) == rec.stats["Gather"]
    assert outputs_cosine(fused, q, built.feeds(3, 16, seed=2)) >= 0.99

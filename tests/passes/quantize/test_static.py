"""quantize-static: QDQ structure, ONNX Runtime's fusion of the groups, accuracy on real labels
(scikit-learn digits), BERT tiny vs float, options, calibration cache and errors."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.calibration import CalibrationData
from graphopt.errors import GraphoptError, PipelineError
from graphopt.pipeline import Pipeline

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from digits import accuracy, train_digits_cnn, train_digits_mlp  # noqa: E402

PRE = "cleanup,fuse(domains=[standard]),cleanup"


def _trained(train, **kw):
    """Train with one torch thread (faster than two contended ones on the shared test machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d = train(**kw)
    finally:
        torch.set_num_threads(threads)
    return d, graphopt.optimize(d.export(), pipeline=PRE).model


@pytest.fixture(scope="module")
def cnn():
    return _trained(train_digits_cnn, epochs=4)


@pytest.fixture(scope="module")
def mlp():
    return _trained(train_digits_mlp, epochs=10)


def quantize(model: ir.Model, calibration, options: str = "", context: dict | None = None):
    ctx = dict(context or {})
    ctx.setdefault("calibration", calibration)
    m = model.clone()
    m, report = Pipeline.parse(f"quantize-static({options}),cleanup").run(m, context=ctx)
    return m, report.passes[0]


def session(model: ir.Model, optimized_path: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(graphopt.to_bytes(model), so, providers=["CPUExecutionProvider"])


def producer_op(v: ir.Value | None) -> str | None:
    p = v.producer() if v is not None else None
    return p.op_type if p is not None else None


def const(v: ir.Value) -> np.ndarray:
    assert v.const_value is not None, v
    return v.const_value.numpy()


# --- structure ----------------------------------------------------------------------------------


def test_cnn_structure(cnn) -> None:
    d, model = cnn
    q, row = quantize(model, d.calibration(128))
    g = q.graph
    convs = [n for n in g if n.op_type == "Conv"]
    gemms = [n for n in g if n.op_type == "Gemm"]
    assert len(convs) == 3 and len(gemms) == 2
    assert not [n for n in g if n.op_type == "Relu"], "Relu is absorbed by the Q after it"
    for n in convs + gemms:
        x, w, b = n.inputs[:3]
        assert producer_op(x) == "DequantizeLinear", n.name
        wdq = w.producer()
        assert wdq.op_type == "DequantizeLinear"
        wq, ws = const(wdq.inputs[0]), const(wdq.inputs[1])
        assert wq.dtype == np.int8 and np.abs(wq.astype(int)).max() <= 127
        axis = wdq.attributes.get_int("axis", 1)
        channels = wq.shape[0] if n.op_type == "Conv" or n.attributes.get_int("transB", 0) else wq.shape[1]
        expected_axis = 0 if n.op_type == "Conv" or n.attributes.get_int("transB", 0) else 1
        assert axis == expected_axis and ws.shape == (channels,)
        # int32 bias at input_scale * weight_scale, zero point 0
        bdq = b.producer()
        assert bdq.op_type == "DequantizeLinear"
        bq, bs = const(bdq.inputs[0]), const(bdq.inputs[1])
        assert bq.dtype == np.int32 and not const(bdq.inputs[2]).any()
        xs = const(x.producer().inputs[1])
        np.testing.assert_allclose(bs, (xs * ws).astype(np.float32), rtol=1e-6)
    # one Q per tensor, shared by every reader: the first block's output feeds conv2 and the Add
    q_inputs = [n.inputs[0] for n in g if n.op_type == "QuantizeLinear"]
    assert len(q_inputs) == len(set(q_inputs))
    add = next(n for n in g if n.op_type == "Add")
    assert add.inputs[1] is convs[1].inputs[0]
    # uint8 asymmetric activations; a Relu-absorbing Q has its zero point at 0
    zps = [const(n.inputs[2]) for n in g if n.op_type == "QuantizeLinear"]
    assert all(z.dtype == np.uint8 for z in zps)
    conv1_q = next(iter(convs[0].outputs[0].consumers()))
    assert conv1_q.op_type == "QuantizeLinear" and const(conv1_q.inputs[2]) == 0
    # the MaxPool and Reshape reuse their input's parameters (ORT then runs them on uint8)
    pool = next(n for n in g if n.op_type == "MaxPool")
    pool_q = next(iter(pool.outputs[0].consumers()))
    assert pool_q.inputs[1] is pool.inputs[0].producer().inputs[1]
    assert row.stats["quantized"] >= 11 and row.details["nodes"]
    assert onnx.checker.check_model(ir.serde.serialize_model(q)) is None


def test_ort_fuses_every_group(cnn, mlp, tmp_path) -> None:
    """ONNX Runtime's QDQ transformer turns every group into an integer kernel: no float Conv/Gemm."""
    for name, (d, model) in {"cnn": cnn, "mlp": mlp}.items():
        q, _ = quantize(model, d.calibration(64))
        path = str(tmp_path / f"{name}_ort.onnx")
        session(q, path)
        ops = [n.op_type for n in onnx.load(path).graph.node]
        assert "Conv" not in ops and "Gemm" not in ops and "DequantizeLinear" not in ops, ops
        if name == "cnn":
            assert ops.count("QLinearConv") == 3 and ops.count("QLinearAdd") == 1 and ops.count("QGemm") == 2
        else:
            assert ops.count("QGemm") == 3


# --- accuracy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("calibrator", ["minmax", "percentile", "entropy", "mse"])
def test_cnn_accuracy_within_half_a_point(cnn, calibrator: str) -> None:
    d, model = cnn
    ref = accuracy(session(model).run(None, {"x": d.x_test})[0], d.y_test)
    q, _ = quantize(model, d.calibration(256), f"calibrator={calibrator}")
    got = accuracy(session(q).run(None, {"x": d.x_test})[0], d.y_test)
    assert got >= ref - 0.005, (calibrator, ref, got)


def test_mlp_accuracy(mlp) -> None:
    d, model = mlp
    ref = accuracy(session(model).run(None, {"x": d.x_test})[0], d.y_test)
    q, _ = quantize(model, d.calibration(256))
    got = accuracy(session(q).run(None, {"x": d.x_test})[0], d.y_test)
    assert got >= ref - 0.005


def test_bert_tiny_close_to_float() -> None:
    from models import build_bert

    b = build_bert("tiny")
    model = graphopt.optimize(b.export(), pipeline=PRE).model
    calib = [b.feeds(2, 16, seed=s) for s in range(6)]
    q, row = quantize(model, calib, "calibrator=mse")
    assert row.stats["weights_int8"] >= 12 and row.stats["qdq_pairs"] >= 20
    result = graphopt.verify(model, q, inputs=b.feeds(2, 16, seed=99))
    for out in result.outputs:
        assert out.cosine > 0.99, result
    # The residual stream and the scores+mask stay float on ort-cpu, each with its reason; the
    # residual Adds of a CNN (into Relu) are still quantized (test_cnn_* above).
    reasons = {n["node"]: n["reason"] for n in row.details["nodes"] if n["op_type"] == "Add"}
    into_norm = [
        n.name
        for n in model.graph
        if n.op_type == "Add" and any(c.op_type == "LayerNormalization" for c in n.outputs[0].consumers())
    ]
    into_softmax = [
        n.name
        for n in model.graph
        if n.op_type == "Add" and any(c.op_type == "Softmax" for c in n.outputs[0].consumers())
    ]
    assert len(into_norm) >= 4 and len(into_softmax) == 2
    assert all(reasons[n].startswith("residual Add into a normalization") for n in into_norm)
    assert all(reasons[n].startswith("attention-mask Add into Softmax") for n in into_softmax)
    q_trt, row_trt = quantize(model, calib, "placement=tensorrt")
    trt = {n["node"]: n["quantized"] for n in row_trt.details["nodes"] if n["op_type"] == "Add"}
    assert all(trt[n] for n in into_norm)  # TensorRT's rules put Q/DQ on residual-Add inputs


@pytest.mark.slow
def test_pretrained_minilm_static_keeps_sentence_embeddings() -> None:
    """Quantizing the residual stream or the masked scores destroyed this model (worst sentence
    cosine 0.16; ONNX Runtime's quantize_static 0.18); leaving those Adds float keeps it > 0.95."""
    from pretrained import SENTENCES, build_minilm, mean_pool, min_cosine, minilm_feeds

    from graphopt.verify import run_model

    model = build_minilm().export()
    calib = [minilm_feeds(SENTENCES[i : i + 8]) for i in range(0, 36, 8)]
    test = minilm_feeds(SENTENCES[36:])
    r = graphopt.optimize(model, quantize="static", calibration=calib)
    ref = run_model(model, test)[0][1]
    got = run_model(r.model, test)[0][1]
    assert min_cosine(mean_pool(ref, test["attention_mask"]), mean_pool(got, test["attention_mask"])) > 0.95


# --- options ------------------------------------------------------------------------------------


def test_activations16_gives_16bit_qdq(mlp) -> None:
    d, model = mlp
    q, _ = quantize(model, d.calibration(64), "activations16=[node_linear_1]")
    g = q.graph
    gemm = next(n for n in g if n.name == "node_linear_1")
    dq = gemm.inputs[0].producer()
    assert dq.op_type == "DequantizeLinear" and const(dq.inputs[2]).dtype == np.uint16
    assert dq.domain == "com.microsoft"  # opset < 21: ONNX Runtime's 16-bit Q/DQ
    other = next(n for n in g if n.name == "node_linear")
    assert const(other.inputs[0].producer().inputs[2]).dtype == np.uint8
    ref = accuracy(session(model).run(None, {"x": d.x_test})[0], d.y_test)
    assert accuracy(session(q).run(None, {"x": d.x_test})[0], d.y_test) >= ref - 0.005


def test_include_exclude_and_int8_symmetric(cnn) -> None:
    d, model = cnn
    q, row = quantize(model, d.calibration(64), "exclude=[node_Conv_4]")
    conv2 = next(n for n in q.graph if n.name == "node_Conv_4")
    assert conv2.inputs[1].const_value is not None and conv2.inputs[1].dtype == ir.DataType.FLOAT
    decisions = {n["node"]: n for n in row.details["nodes"]}
    assert decisions["node_Conv_4"]["quantized"] is False and decisions["node_Conv_4"]["reason"] == "excluded"

    q, row = quantize(
        model, d.calibration(64), "include=[Gemm],activation_type=int8,activation_symmetric=true"
    )
    assert all(producer_op(n.inputs[1]) != "DequantizeLinear" for n in q.graph if n.op_type == "Conv")
    gemms = [n for n in q.graph if n.op_type == "Gemm"]
    assert all(producer_op(n.inputs[1]) == "DequantizeLinear" for n in gemms)
    for n in q.graph:
        if n.op_type == "QuantizeLinear":
            z = const(n.inputs[2])
            assert z.dtype == np.int8 and z == 0
    reasons = {n["reason"] for n in row.details["nodes"] if not n["quantized"]}
    assert "not in include" in reasons


def test_tensorrt_placement(cnn) -> None:
    d, model = cnn
    q, _ = quantize(model, d.calibration(64), "placement=tensorrt")
    g = q.graph
    assert sum(n.op_type == "Relu" for n in g) == 4  # TensorRT fuses activations itself
    for n in g:
        if n.op_type in ("Conv", "Gemm"):
            assert (
                producer_op(n.inputs[1]) == "DequantizeLinear" and n.inputs[2].const_value is not None
            )  # float bias
    add = next(n for n in g if n.op_type == "Add")
    assert all(producer_op(v) == "DequantizeLinear" for v in add.inputs)  # both residual inputs
    for n in g:
        if n.op_type == "QuantizeLinear":
            assert const(n.inputs[2]).dtype == np.int8 and const(n.inputs[2]) == 0
    # outputs are not quantized, except the Conv output that is a residual Add input
    assert sum(n.op_type == "QuantizeLinear" and producer_op(n.inputs[0]) == "Conv" for n in g) == 1


def test_calibration_is_cached_across_runs(cnn) -> None:
    """The accuracy-control loop re-runs the pass on copies with include=[one node]: one calibration."""
    d, model = cnn
    # Pipeline.run copies the context dict: the cache lives on the shared CalibrationData object
    shared: dict = {"calibration": CalibrationData.from_any(d.calibration(64))}
    _, r1 = Pipeline.parse("quantize-static(calibrator=entropy)").run(model.clone(), context=shared)
    _, r2 = Pipeline.parse("quantize-static(calibrator=entropy,include=[node_Conv_4])").run(
        model.clone(), context=shared
    )
    _, r3 = Pipeline.parse("quantize-static(calibrator=mse)").run(model.clone(), context=shared)
    assert r1.passes[0].details["calibration"]["cached"] is False
    assert r2.passes[0].details["calibration"]["cached"] is True
    assert r3.passes[0].details["calibration"]["cached"] is True  # same histograms, other calibrator
    # an explicit cache dict in the caller's context works too
    explicit: dict = {"calibration": d.calibration(64), "_static_ranges": {}}
    Pipeline.parse("quantize-static").run(model.clone(), context=explicit)
    _, r4 = Pipeline.parse("quantize-static").run(model.clone(), context=explicit)
    assert explicit["_static_ranges"] and r4.passes[0].details["calibration"]["cached"] is True


def test_no_calibration_data_is_a_clear_error(cnn) -> None:
    d, model = cnn
    with pytest.raises(GraphoptError, match="calibration"):
        Pipeline.parse("quantize-static").run(model.clone())
    with pytest.raises(GraphoptError, match="calibration batch 1"):  # wrong shape in the second batch
        quantize(model, [{"x": d.x_train[:4]}, {"x": d.x_train[:4, :, :4]}])


@pytest.mark.parametrize(
    "opt",
    ["calibrator=kmeans", "placement=gpu", "activation_type=float8", "op_types=[Softmax2]", "percentile=10"],
)
def test_bad_options(cnn, opt: str) -> None:
    d, model = cnn
    with pytest.raises(PipelineError):
        quantize(model, d.calibration(32), opt)


def test_unknown_dtype_input_is_skipped_with_reason() -> None:
    """A MatMul fed by an op of unknown output type stays float (and nothing is calibrated)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.ones(12, np.float32))
    nodes = [
        helper.make_node("Mystery", ["x"], ["h"], domain="example.custom"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[w])
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)]
    )
    model = ir.serde.deserialize_model(proto)
    m, report = Pipeline.parse("quantize-static").run(
        model, context={"calibration": [{"x": np.ones((2, 4), np.float32)}]}
    )
    decisions = report.passes[0].details["nodes"]
    assert decisions == [
        {
            "node": "mm",
            "op_type": "MatMul",
            "quantized": False,
            "reason": "input dtype unknown is not float32",
        }
    ]
    assert not any(n.op_type == "QuantizeLinear" for n in m.graph)


def test_smooth_quant_folds_into_layernorm() -> None:
    """LayerNorm → two MatMuls with outlier channels: the scales move into LN and the weights, and
    the quantized model is closer to float than without smoothing."""
    rng = np.random.default_rng(0)
    c = 64
    scale = np.ones(c, np.float32)
    scale[[3, 17]] = 40.0  # activation outlier channels, as in large transformers
    w1 = rng.standard_normal((c, 32)).astype(np.float32)
    w2 = rng.standard_normal((c, 32)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 5, c])
    y1 = helper.make_tensor_value_info("y1", TensorProto.FLOAT, [None, 5, 32])
    y2 = helper.make_tensor_value_info("y2", TensorProto.FLOAT, [None, 5, 32])
    inits = [
        onnx.numpy_helper.from_array(a, n)
        for a, n in [(scale, "g"), (np.zeros(c, np.float32), "b"), (w1, "w1"), (w2, "w2")]
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="ln", axis=-1),
        helper.make_node("MatMul", ["h", "w1"], ["y1"], name="mm1"),
        helper.make_node("MatMul", ["h", "w2"], ["y2"], name="mm2"),
    ]
    proto = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y1, y2], initializer=inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model = ir.serde.deserialize_model(proto)
    calib = [{"x": rng.standard_normal((2, 5, c)).astype(np.float32)} for _ in range(4)]
    test = {"x": rng.standard_normal((4, 5, c)).astype(np.float32)}
    plain, _ = quantize(model, calib)
    q, row = quantize(model, calib, "smooth_quant=0.5")
    assert row.details["smooth_quant"]["applied"] == ["ln"]
    ln = next(n for n in q.graph if n.op_type == "LayerNormalization")
    assert const(ln.inputs[1])[3] < 40.0
    smoothed = graphopt.verify(model, q, inputs=test)
    unsmoothed = graphopt.verify(model, plain, inputs=test)
    for a, b in zip(smoothed.outputs, unsmoothed.outputs):
        assert a.sqnr_db > b.sqnr_db + 0.5, (smoothed, unsmoothed)
    # a LayerNorm whose output also feeds a non-MatMul (post-LN residual) is skipped with the reason
    proto.graph.node.append(helper.make_node("Add", ["h", "x"], ["r"], name="residual"))
    proto.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [None, 5, c]))
    _, row = quantize(ir.serde.deserialize_model(proto), calib, "smooth_quant=0.5")
    assert row.details["smooth_quant"]["applied"] == []
    assert any("also read by Add" in s["reason"] for s in row.details["smooth_quant"]["skipped"])


def test_relu6_clip_is_absorbed_and_runs_as_qlinearconv(tmp_path) -> None:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    inits = [
        onnx.numpy_helper.from_array(a, n)
        for a, n in [
            (w1, "w1"),
            (np.zeros(8, np.float32), "b1"),
            (w2, "w2"),
            (np.array(0.0, np.float32), "lo"),
            (np.array(6.0, np.float32), "hi"),
        ]
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r"], name="relu6"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 8, 8])
    proto = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], initializer=inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model = ir.serde.deserialize_model(proto)
    calib = [{"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    q, row = quantize(model, calib)
    assert not any(n.op_type == "Clip" for n in q.graph)
    assert {d["node"]: d["quantized"] for d in row.details["nodes"]} == {
        "conv1": True,
        "relu6": True,
        "conv2": True,
    }
    conv1 = next(n for n in q.graph if n.name == "conv1")
    q1 = next(iter(conv1.outputs[0].consumers()))
    assert const(q1.inputs[2]) == 0
    path = str(tmp_path / "opt.onnx")
    session(q, path)
    assert [n.op_type for n in onnx.load(path).graph.node].count("QLinearConv") == 2
    result = graphopt.verify(model, q, inputs={"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)})
    assert result.outputs[0].cosine > 0.999, result


def test_deterministic_and_input_untouched(mlp) -> None:
    d, model = mlp
    before = graphopt.to_bytes(model)
    a, _ = quantize(model, d.calibration(64), "calibrator=entropy,per_channel=false")
    b, _ = quantize(model, d.calibration(64), "calibrator=entropy,per_channel=false")
    assert graphopt.to_bytes(a) == graphopt.to_bytes(b)
    assert graphopt.to_bytes(model) == before
    gemm = next(n for n in a.graph if n.op_type == "Gemm")
    assert const(gemm.inputs[1].producer().inputs[1]).shape == ()  # per-tensor weight scale


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "vit", "llama"])
def test_other_transformers_close_to_float(kind: str) -> None:
    import models

    b = getattr(models, f"build_{kind}")("tiny")
    model = graphopt.optimize(b.export(), pipeline=PRE).model

    def feeds(seed: int) -> dict:
        return b.feeds(2, seed=seed) if kind == "vit" else b.feeds(2, 16, seed=seed)

    calib = [feeds(s) for s in range(6)]
    q, row = quantize(model, calib)
    assert row.stats["weights_int8"] >= 4
    result = graphopt.verify(model, q, inputs=feeds(99))
    for out in result.outputs:
        assert out.cosine > 0.99, result


def test_embeddings_option_stores_int8_tables() -> None:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((10, 8)).astype(np.float32)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(table, "table"), onnx.numpy_helper.from_array(w, "w")]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "w"], ["y"], name="mm"),
    ]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3, 4])
    proto = helper.make_model(
        helper.make_graph(nodes, "g", [ids], [y], initializer=inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model = ir.serde.deserialize_model(proto)
    calib = [{"ids": rng.integers(0, 10, (2, 3))} for _ in range(3)]
    plain, row = quantize(model, calib)
    assert "embed" not in {d["node"] for d in row.details["nodes"]}  # off by default
    q, row = quantize(model, calib, "embeddings=true")
    gather = next(n for n in q.graph if n.op_type == "Gather")
    tdq = gather.inputs[0].producer()
    assert tdq.op_type == "DequantizeLinear" and const(tdq.inputs[0]).dtype == np.int8
    out_q = next(iter(gather.outputs[0].consumers()))
    assert out_q.op_type == "QuantizeLinear"
    assert const(out_q.inputs[1]) == const(tdq.inputs[1]) and const(out_q.inputs[2]).dtype == np.int8
    result = graphopt.verify(model, q, inputs={"ids": rng.integers(0, 10, (2, 3))})
    assert result.outputs[0].cosine > 0.999, result


def test_max_batches_limits_calibration(mlp) -> None:
    d, model = mlp
    _, row = quantize(model, d.calibration(256, batch=32), "max_batches=2,progress=false")
    assert row.details["calibration"]["batches"] == 2
    assert all(a["bits"] == 8 for a in row.details["activations"].values())


def test_smooth_quant_folds_into_rmsnorm_mul() -> None:
    """A decomposed RMSNorm ends in Mul(x, gamma): gamma absorbs the division; outputs stay close."""
    rng = np.random.default_rng(1)
    c = 32
    gamma = np.ones(c, np.float32)
    gamma[5] = 25.0
    w = rng.standard_normal((c, 16)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, c])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 16])
    inits = [onnx.numpy_helper.from_array(gamma, "gamma"), onnx.numpy_helper.from_array(w, "w")]
    nodes = [
        helper.make_node("Mul", ["x", "gamma"], ["h"], name="rms_scale"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="mm"),
    ]
    proto = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], initializer=inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model = ir.serde.deserialize_model(proto)
    calib = [{"x": rng.standard_normal((2, 4, c)).astype(np.float32)} for _ in range(4)]
    q, row = quantize(model, calib, "smooth_quant=0.5")
    assert row.details["smooth_quant"]["applied"] == ["rms_scale"]
    mul = next(n for n in q.graph if n.op_type == "Mul")
    assert const(mul.inputs[1])[5] < 25.0
    result = graphopt.verify(model, q, inputs={"x": rng.standard_normal((2, 4, c)).astype(np.float32)})
    assert result.outputs[0].cosine > 0.999, result

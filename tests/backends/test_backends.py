"""Targets ort-cpu, ort-cuda and tensorrt: lowering, checks, settings files, and the fp16 pass.

No GPU here: every target's output runs on ONNX Runtime's CPU provider (fp16 and Q/DQ graphs
have CPU kernels), which checks the graphs are valid and numerically close to the original; the
CUDA/TensorRT speed is measured by benchmarks/gpu/bench_gpu.py on a GPU machine.
"""

from __future__ import annotations

import collections
import json
import logging
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from models import build_bert, build_cnn, build_llama

import graphopt
from graphopt.backends.base import LoweringError, load_session, settings_path
from graphopt.backends.ort_cuda import OrtCudaBackend
from graphopt.backends.tensorrt import TensorRTBackend, sparse_24_weights
from graphopt.errors import GraphoptError, OutputError, PipelineError
from graphopt.ir import to_proto
from graphopt.passes.precision import ConvertFloat16Pass
from graphopt.registry import default_registry

TARGETS = ("ort-cpu", "ort-cuda", "tensorrt")
#: fp32 targets must match the float model closely; fp16 compute (ort-cuda) within fp16 rounding.
MIN_COSINE = {"ort-cpu": 0.99999, "ort-cuda": 0.9999, "tensorrt": 0.99999}
#: max |difference| relative to the reference output's max |value|.
MAX_REL = {"ort-cpu": 1e-4, "ort-cuda": 1e-2, "tensorrt": 1e-4}
#: ONNX Runtime registers SimplifiedLayerNormalization in the ONNX domain (fuse-ort emits it there
#: as ORT's own optimizer does); onnx's checker does not know it.
ORT_ONNX_DOMAIN_OPS = {"SimplifiedLayerNormalization"}


@pytest.fixture(scope="module")
def exported() -> dict[str, tuple[ir.Model, object]]:
    out = {}
    for name, build in (
        ("bert", lambda: build_bert("tiny")),
        ("llama", lambda: build_llama("tiny")),
        ("cnn", build_cnn),
    ):
        ex = build()
        out[name] = (ex.export(), ex)
    return out


def parse(text: str) -> ir.Model:
    """A model from ONNX text, with inferred types (as graphopt's cleanup leaves them)."""
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text)))


def feeds_for(name: str, ex, seed: int = 0) -> dict[str, np.ndarray]:
    return ex.feeds(2, seed=seed) if name == "cnn" else ex.feeds(2, 8, seed)


def check(model: ir.Model) -> None:
    proto = to_proto(model)
    for node in proto.graph.node:
        if node.domain == "" and node.op_type in ORT_ONNX_DOMAIN_OPS:
            node.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(proto)


def domains(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(n.domain or "" for n in ir.traversal.RecursiveGraphIterator(model.graph))


def outputs(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    from graphopt.verify import run_model

    return [np.asarray(v) for _, v in run_model(model, feeds)]


# ---------------------------------------------------------------------------------------------
# every target, every model


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", ["bert", "llama", "cnn"])
def test_target_output_is_valid_and_close_to_the_original(exported, kind: str, target: str) -> None:
    model, ex = exported[kind]
    result = graphopt.optimize(model, target=target)
    check(result.model)
    feeds = feeds_for(kind, ex, seed=1)
    ref, got = outputs(model, feeds), outputs(result.model, feeds)
    for r, g in zip(ref, got):
        assert g.dtype == r.dtype and g.shape == r.shape
        scale = float(np.abs(r).max()) or 1.0
        assert float(np.abs(g.astype(np.float64) - r).max()) <= MAX_REL[target] * scale, (kind, target)
        cos = float(np.dot(g.ravel(), r.ravel()) / (np.linalg.norm(g) * np.linalg.norm(r) + 1e-30))
        assert cos >= MIN_COSINE[target], (kind, target, cos)
    d = domains(result.model)
    if target == "tensorrt":
        assert set(d) <= {""}, f"tensorrt output has non-standard ops: {dict(d)}"
        assert TensorRTBackend().check(result.model) == []
    elif kind != "cnn":
        assert d["com.microsoft"] > 0, "contrib fusions expected for ONNX Runtime targets"


@pytest.mark.parametrize("kind", ["bert", "llama", "cnn"])
def test_ort_cuda_keeps_fp32_io_and_stores_fp16_weights(exported, kind: str) -> None:
    model, _ = exported[kind]
    out = graphopt.optimize(model, target="ort-cuda").model
    assert [v.dtype for v in out.graph.inputs] == [v.dtype for v in model.graph.inputs]
    assert [v.dtype for v in out.graph.outputs] == [v.dtype for v in model.graph.outputs]
    fp16 = sum(
        v.const_value.nbytes for v in out.graph.initializers.values() if v.dtype == ir.DataType.FLOAT16
    )
    fp32 = sum(v.const_value.nbytes for v in out.graph.initializers.values() if v.dtype == ir.DataType.FLOAT)
    assert fp16 > 10 * fp32, (fp16, fp32)
    # Every heavy op computes in fp16.
    for node in out.graph:
        if node.op_type in (
            "MatMul",
            "Conv",
            "Gemm",
            "Attention",
            "MultiHeadAttention",
            "SkipLayerNormalization",
        ):
            assert node.outputs[0].dtype == ir.DataType.FLOAT16, node.name
    assert not any(n.op_type == "FusedConv" for n in out.graph)  # float32-only kernel on CUDA


def test_ort_cuda_int4_runs_matmulnbits_on_fp16_activations(exported) -> None:
    model, ex = exported["llama"]
    result = graphopt.optimize(model, target="ort-cuda", quantize="int4")
    assert result.report.pipeline.index("quantize(mode=int4)") < result.report.pipeline.index(
        "convert-float16"
    )
    nbits = [n for n in result.model.graph if n.op_type == "MatMulNBits"]
    assert nbits and all(n.outputs[0].dtype == ir.DataType.FLOAT16 for n in nbits)
    assert all(n.inputs[2].dtype == ir.DataType.FLOAT16 for n in nbits)  # scales follow T
    feeds = feeds_for("llama", ex, seed=2)
    r, g = outputs(model, feeds)[0], outputs(result.model, feeds)[0]
    assert g.dtype == np.float32
    assert float(np.dot(r.ravel(), g.ravel()) / (np.linalg.norm(r) * np.linalg.norm(g))) > 0.98


def test_default_pipelines_share_passes_and_differ_in_lowering() -> None:
    reg = default_registry()
    cpu, cuda, trt = (reg.backend(t).default_pipeline(2) for t in TARGETS)
    assert "fuse-ort" in cpu and "fuse-ort(exclude=[fused-conv])" in cuda and "fuse-ort" not in trt
    assert cuda.endswith("convert-float16,cleanup") and "convert-float16" not in cpu + trt
    assert "fuse-gemm" in trt  # standard rule sets only
    assert reg.backend("ort-cuda").default_pipeline(1) == "cleanup"
    assert (
        OrtCudaBackend(precision="bfloat16")
        .default_pipeline(2)
        .endswith("convert-float16(dtype=bfloat16),cleanup")
    )
    assert "convert-float16" not in OrtCudaBackend(precision="float32").default_pipeline(2)


# ---------------------------------------------------------------------------------------------
# lowering checks and options


def test_tensorrt_refuses_contrib_ops_from_a_user_pipeline(exported, tmp_path) -> None:
    model, _ = exported["bert"]
    with pytest.raises(LoweringError, match="cannot run on tensorrt: com.microsoft::"):
        graphopt.optimize(model, target="tensorrt", pipeline="cleanup,fuse")  # fuse adds contrib ops
    # A model made for another target and stamped tensorrt is refused by save as well.
    result = graphopt.optimize(model, target="ort-cpu", pipeline="cleanup,fuse")
    problems = TensorRTBackend().check(result.model)
    assert problems and "com.microsoft::" in problems[0]
    result.model.metadata_props["graphopt.target"] = "tensorrt"
    out = tmp_path / "m.onnx"
    with pytest.raises(LoweringError, match="cannot run on tensorrt: com.microsoft::"):
        graphopt.save(result.model, out)
    assert os.listdir(tmp_path) == [], "nothing may be written for a model its target cannot run"


def test_tensorrt_flags_asymmetric_and_int32_qdq() -> None:
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 4] y) {
            zp = Constant <value = uint8[1] {3}> ()
            s = Constant <value = float[1] {0.1}> ()
            q = QuantizeLinear (x, s, zp)
            d = DequantizeLinear (q, s, zp)
            bq = Constant <value = int32[4] {1, 2, 3, 4}> ()
            bz = Constant <value = int32[1] {0}> ()
            b = DequantizeLinear (bq, s, bz)
            y = Add (d, b)
        }
    """
    model = parse(text)
    problems = TensorRTBackend().check(model)
    assert any("int32 DequantizeLinear" in p for p in problems)
    assert any("not symmetric int8" in p for p in problems)
    symmetric = text.replace("uint8[1] {3}", "int8[1] {0}").replace(
        "b = DequantizeLinear (bq, s, bz)", "b = Identity (x)"
    )
    assert TensorRTBackend().check(parse(symmetric)) == []


@pytest.mark.parametrize(
    "target,mode", [("tensorrt", "dynamic"), ("tensorrt", "int4"), ("ort-cuda", "dynamic")]
)
def test_quantization_modes_a_target_cannot_run_are_clear_errors(exported, target: str, mode: str) -> None:
    with pytest.raises(PipelineError, match=f"{target}: .*quantize|{target}: dynamic"):
        graphopt.optimize(exported["cnn"][0], target=target, quantize=mode)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"bogus": 1}, "has no option 'bogus'"),
        ({"batch": [4, 2, 8]}, "1 <= min <= opt <= max"),
        ({"dims": {"seq": [1, 2]}}, r"seq must be \[min, opt, max\]"),
        ({"fp8": True}, "fp8=true needs FP8 Q/DQ"),
        ({"builder_optimization_level": 9}, "0-5"),
    ],
)
def test_tensorrt_bad_options_are_clear_errors(options: dict, match: str) -> None:
    with pytest.raises(PipelineError, match=match):
        TensorRTBackend(**options)


def test_tensorrt_graph_fp16_option_adds_the_conversion() -> None:
    assert TensorRTBackend(fp16_graph=True).default_pipeline(2).endswith("cleanup,convert-float16,cleanup")
    with pytest.raises(PipelineError, match="dims must map"):
        TensorRTBackend(dims=[1, 2, 3])


def test_ort_cuda_notes_ops_that_fall_back_to_the_cpu(caplog) -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (uint8[2, 4] y, float s, uint8 z) {
            y, s, z = DynamicQuantizeLinear (x)
        }
    """)
    with caplog.at_level(logging.WARNING, logger="graphopt.backends"):
        doc = OrtCudaBackend().settings(model)
    assert doc["notes"] == [
        "DynamicQuantizeLinear ×1 runs on the CPU: no CUDA kernel (dynamic int8 quantization is a CPU format)"
    ]
    assert any("runs on the CPU" in r.getMessage() for r in caplog.records)
    assert OrtCudaBackend().check(model) == []  # it runs (slowly): a note, not an error


def test_ort_cuda_bad_option_is_a_clear_error() -> None:
    with pytest.raises(PipelineError, match="precision.*must be one of"):
        OrtCudaBackend(precision="int3")


def test_tensorrt_static_quantization_is_symmetric_int8(exported) -> None:
    model, ex = exported["cnn"]
    calib = [feeds_for("cnn", ex, seed=s) for s in range(4)]
    result = graphopt.optimize(model, target="tensorrt", quantize="static", calibration=calib)
    assert "placement=tensorrt" in result.report.pipeline
    qdq = [n for n in result.model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and set(domains(result.model)) <= {""}
    for n in qdq:
        zp = n.inputs[2]
        assert zp is not None and zp.dtype == ir.DataType.INT8, n.name
        assert not np.asarray(zp.const_value.numpy()).any(), n.name
    feeds = feeds_for("cnn", ex, seed=9)
    r, g = outputs(model, feeds)[0], outputs(result.model, feeds)[0]
    assert float(np.dot(r.ravel(), g.ravel()) / (np.linalg.norm(r) * np.linalg.norm(g))) > 0.99
    settings = TensorRTBackend().provider_options(result.model)[0]
    assert settings["trt_int8_enable"] is True


@pytest.mark.parametrize("kind", ["cnn", "bert"])
def test_tensorrt_static_output_passes_the_tensorrt_check_and_saves(exported, kind: str, tmp_path) -> None:
    model, ex = exported[kind]
    calib = [feeds_for(kind, ex, seed=s) for s in range(4)]
    result = graphopt.optimize(model, target="tensorrt", quantize="static", calibration=calib)
    assert TensorRTBackend().check(result.model) == []  # symmetric int8, float biases, standard ops
    assert not any(
        n.op_type == "DequantizeLinear" and n.inputs[0].dtype == ir.DataType.INT32 for n in result.model.graph
    )
    graphopt.save(result.model, tmp_path / "q.onnx")
    doc = json.loads((tmp_path / "q.settings.json").read_text())
    assert doc["providers"][0][1]["trt_int8_enable"] is True and doc["tensorrt"]["explicit_quantization"]


# ---------------------------------------------------------------------------------------------
# settings files and sessions


@pytest.mark.parametrize("target", TARGETS)
def test_save_writes_settings_that_load_into_a_session_with_cpu_fallback(
    exported, tmp_path, caplog, target
) -> None:
    model, ex = exported["bert"]
    result = graphopt.optimize(model, target=target)
    path = tmp_path / "model.onnx"
    graphopt.save(result.model, path)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.settings.json"]
    doc = json.loads((tmp_path / "model.settings.json").read_text())
    assert doc["target"] == target and doc["model"] == "model.onnx"
    assert [p for p, _ in doc["providers"]][-1] == "CPUExecutionProvider"
    assert [i["name"] for i in doc["io"]["inputs"]] == ["input_ids", "attention_mask"]
    with caplog.at_level(logging.WARNING, logger="graphopt.backends"):
        session = load_session(path)
    warned = [r.getMessage() for r in caplog.records if r.name == "graphopt.backends"]
    if target == "ort-cpu":
        assert not warned
    else:
        assert warned and "not available" in warned[0] and "running on CPUExecutionProvider" in warned[0]
    assert session.get_providers() == ["CPUExecutionProvider"]
    feeds = feeds_for("bert", ex)
    got = session.run(None, feeds)
    for r, g in zip(outputs(result.model, feeds), got):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    # Saving again is byte-identical (deterministic settings).
    first = (tmp_path / "model.settings.json").read_bytes()
    graphopt.save(result.model, path)
    assert (tmp_path / "model.settings.json").read_bytes() == first


def test_tensorrt_settings_profile_and_caches(exported, tmp_path) -> None:
    model, _ = exported["bert"]
    result = graphopt.optimize(model, target="tensorrt")
    result.model.metadata_props["graphopt.target_options"] = json.dumps(
        {"dims": {result.model.graph.inputs[0].shape[1].value: [1, 64, 256]}, "fp16": False}
    )
    graphopt.save(result.model, tmp_path / "bert.onnx")
    doc = json.loads((tmp_path / "bert.settings.json").read_text())
    trt = dict(doc["providers"][0][1])
    assert doc["providers"][0][0] == "TensorrtExecutionProvider"
    assert trt["trt_fp16_enable"] is False and trt["trt_int8_enable"] is False
    assert trt["trt_engine_cache_enable"] and trt["trt_engine_cache_path"] == "bert.trt_cache"
    assert trt["trt_timing_cache_enable"]
    # Both inputs share their symbolic dims, so their profiles agree.
    assert trt["trt_profile_min_shapes"] == "input_ids:1x1,attention_mask:1x1"
    assert trt["trt_profile_opt_shapes"] == "input_ids:1x64,attention_mask:1x64"
    assert trt["trt_profile_max_shapes"] == "input_ids:8x256,attention_mask:8x256"
    assert doc["tensorrt"]["profile"]["input_ids"]["max"] == [8, 256]


def test_settings_are_not_written_when_asked_not_to_or_without_a_target(exported, tmp_path) -> None:
    model, _ = exported["cnn"]
    result = graphopt.optimize(model, target="ort-cuda")
    graphopt.save(result.model, tmp_path / "a.onnx", settings=False)
    graphopt.save(model, tmp_path / "b.onnx")  # not optimized: no target named
    assert sorted(os.listdir(tmp_path)) == ["a.onnx", "b.onnx"]
    with pytest.raises(OutputError, match="names no target"):
        graphopt.save(model, tmp_path / "c.onnx", settings=True)


def test_load_session_errors_are_clear(tmp_path, exported) -> None:
    with pytest.raises(GraphoptError, match="no such model file"):
        load_session(tmp_path / "missing.onnx")
    model, _ = exported["cnn"]
    graphopt.save(graphopt.optimize(model, target="ort-cpu").model, tmp_path / "m.onnx")
    os.unlink(settings_path(tmp_path / "m.onnx"))
    with pytest.raises(GraphoptError, match="settings file not found"):
        load_session(tmp_path / "m.onnx")
    (tmp_path / "m.settings.json").write_text(
        '{"format": "graphopt.settings/1", "providers": '
        '[["CPUExecutionProvider", {}]], "session_options": {"bogus": 1}}'
    )
    with pytest.raises(GraphoptError, match="unknown session option 'bogus'"):
        load_session(tmp_path / "m.onnx")


def test_sparsity_flag_follows_2to4_weights() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)  # MatMul B: [K, N], groups of 4 along K
    sparse = w.copy().reshape(4, 4, 8)
    sparse[:, :2, :] = 0  # two zeros in every group of four consecutive K
    sparse = sparse.reshape(16, 8)

    def model_with(weight: np.ndarray) -> ir.Model:
        x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 16]))
        wv = ir.Value(
            name="w",
            const_value=ir.Tensor(weight, name="w"),
            type=ir.TensorType(ir.DataType.FLOAT),
            shape=ir.Shape(weight.shape),
        )
        node = ir.node("MatMul", [x, wv])
        node.outputs[0].name = "y"
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        g = ir.Graph([x], node.outputs, nodes=[node], initializers=[wv], opset_imports={"": 17})
        return ir.Model(g, ir_version=8)

    assert sparse_24_weights(model_with(sparse)) == ["w"]
    assert sparse_24_weights(model_with(w)) == []
    assert TensorRTBackend().provider_options(model_with(sparse))[0]["trt_sparsity_enable"] is True
    assert TensorRTBackend().provider_options(model_with(w))[0]["trt_sparsity_enable"] is False


def test_tensorrt_sparsity_from_the_prune_pass(exported) -> None:
    pytest.importorskip("graphopt.passes.prune")
    model, _ = exported["bert"]
    result = graphopt.optimize(model, target="tensorrt", prune={"sparsity": 0.5, "mode": "2:4"})
    assert sparse_24_weights(result.model), "2:4 pruning should leave 2:4 sparse MatMul weights"
    assert TensorRTBackend().provider_options(result.model)[0]["trt_sparsity_enable"] is True


# ---------------------------------------------------------------------------------------------
# convert-float16 on hand-made graphs


def run_fp16(text: str, context: dict | None = None, **options) -> tuple[ir.Model, ConvertFloat16Pass]:
    model = parse(text)
    p = ConvertFloat16Pass(**options)
    p.context = dict(context or {})
    p(model)
    check(model)
    return model, p


def dtype_of(model: ir.Model, op_type: str) -> ir.DataType | None:
    return next(n.outputs[0].dtype for n in model.graph if n.op_type == op_type)


def run_np(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    return outputs(model, feeds)


def test_fp16_keeps_pow_and_position_chains_in_fp32_and_runs() -> None:
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 8] x, int64[8] pos) => (float[2, 8] y) {
            w = Constant <value = float[8, 8] {0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8, 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,
                0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8, 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8, 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,
                0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8, 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8, 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8}> ()
            h = MatMul (x, w)
            two = Constant <value = float {2.0}> ()
            sq = Pow (h, two)
            var = ReduceMean <keepdims = 1> (sq)
            eps = Constant <value = float {1e-12}> ()
            ve = Add (var, eps)
            rs = Sqrt (ve)
            n = Div (h, rs)
            pf = Cast <to = 1> (pos)
            freq = Constant <value = float {0.37}> ()
            ang = Mul (pf, freq)
            c = Cos (ang)
            y = Mul (n, c)
        }
    """
    model, p = run_fp16(text)
    assert dtype_of(model, "MatMul") == ir.DataType.FLOAT16
    for op in ("Pow", "ReduceMean", "Add", "Sqrt", "Cos"):
        assert dtype_of(model, op) == ir.DataType.FLOAT, op  # statistics and angles stay fp32
    assert (
        next(n for n in model.graph if n.op_type == "Mul" and n.inputs[0].name == "pf").outputs[0].dtype
        == ir.DataType.FLOAT
    )  # position × frequency
    assert dtype_of(model, "Div") == ir.DataType.FLOAT16
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT and model.graph.outputs[0].name == "y"
    assert {d["op_type"] for d in p.details["kept_fp32"]} == {"Pow", "Cos"}
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 8)).astype(np.float32), "pos": np.arange(8, dtype=np.int64) * 500}
    ref = parse(text)
    r, g = run_np(ref, feeds)[0], run_np(model, feeds)[0]
    np.testing.assert_allclose(g, r, rtol=5e-3, atol=5e-3)


def test_fp16_constants_out_of_range_keep_fp32_and_sentinels_are_clamped() -> None:
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 4] y, float[2, 4] z) {
            big = Constant <value = float[1] {100000.0}> ()
            y = Mul (x, big)
            neg = Constant <value = float[1] {-3.4028234e38}> ()
            m = Max (x, neg)
            z = Relu (m)
        }
    """
    model, p = run_fp16(text)
    assert dtype_of(model, "Mul") == ir.DataType.FLOAT
    assert any("beyond fp16" in d["reason"] for d in p.details["kept_fp32"])
    assert dtype_of(model, "Max") == ir.DataType.FLOAT16 and p.stats.get("sentinels_clamped") == 1
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    y, z = run_np(model, {"x": x})
    np.testing.assert_allclose(y, x * 1e5, rtol=1e-6)
    np.testing.assert_allclose(z, np.maximum(x, 0), rtol=1e-3, atol=1e-3)


def test_fp16_calibration_keeps_overflowing_activations_in_fp32() -> None:
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 4] y) {
            k = Constant <value = float[1] {100.0}> ()
            a = Mul (x, k)
            b = Mul (a, k)
            c = Div (b, k)
            y = Relu (c)
        }
    """
    calib = [{"x": np.full((2, 4), 60.0, np.float32)}]  # a = 6000, b = 6e5 > fp16 max
    model, p = run_fp16(text, context={"calibration": calib})
    by_out = {n.outputs[0].name: n.outputs[0].dtype for n in model.graph if n.op_type != "Cast"}
    assert by_out["b"] == ir.DataType.FLOAT and by_out["c"] == ir.DataType.FLOAT  # read or write b
    assert by_out["a"] == ir.DataType.FLOAT16
    assert p.stats["values_measured"] >= 4
    y = run_np(model, calib[0])[0]
    np.testing.assert_allclose(y, np.full((2, 4), 6000.0), rtol=1e-3)
    # Without calibration b would be fp16 (and overflow on a GPU; ONNX Runtime's CPU provider
    # computes fp16 Mul in float32 internally, so the CPU run cannot show it).
    blind, _ = run_fp16(text)
    assert {n.outputs[0].name: n.outputs[0].dtype for n in blind.graph}["b"] == ir.DataType.FLOAT16
    with pytest.raises(PipelineError, match="needs calibration data"):
        run_fp16(text, ranges="calibration")


def test_fp16_calibrated_mask_sentinels_saturate_instead_of_blocking() -> None:
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x, int64[2, 4] mask) => (float[2, 4] y) {
            w = Constant <value = float[4, 4] {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}> ()
            h = MatMul (x, w)
            mf = Cast <to = 1> (mask)
            one = Constant <value = float {1.0}> ()
            inv = Sub (one, mf)
            lowest = Constant <value = float {-3.4028234e38}> ()
            bias = Mul (inv, lowest)
            s = Add (h, bias)
            y = Softmax <axis = 1> (s)
        }
    """
    rng = np.random.default_rng(3)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int64)
    calib = [{"x": rng.standard_normal((2, 4)).astype(np.float32), "mask": mask}]
    model, p = run_fp16(text, context={"calibration": calib})
    # The Add writes sentinels (h - 3.4e38): float32; Softmax reads them through a saturating cast.
    assert dtype_of(model, "Add") == ir.DataType.FLOAT and dtype_of(model, "Softmax") == ir.DataType.FLOAT16
    assert dtype_of(model, "MatMul") == ir.DataType.FLOAT16
    assert dtype_of(model, "Mul") == ir.DataType.FLOAT  # the mask chain starts at Cast(int → float)
    assert p.stats["sentinel_values_saturated"] == 1 and any(n.op_type == "Clip" for n in model.graph)
    feeds = {"x": rng.standard_normal((2, 4)).astype(np.float32), "mask": mask}
    np.testing.assert_allclose(run_np(model, feeds)[0], run_np(parse(text), feeds)[0], atol=2e-3)


def test_fp16_io_types_option_and_bfloat16() -> None:
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 3] y) {
            w = Constant <value = float[4, 3] {1,2,3,4,5,6,7,8,9,10,11,12}> ()
            y = MatMul (x, w)
        }
    """
    model, _ = run_fp16(text, keep_io_types=False)
    assert (
        model.graph.inputs[0].dtype == ir.DataType.FLOAT16
        and model.graph.outputs[0].dtype == ir.DataType.FLOAT16
    )
    assert not any(n.op_type == "Cast" for n in model.graph)
    bf, p = run_fp16(text, dtype="bfloat16")
    assert [v.dtype for v in bf.graph.initializers.values()] == [ir.DataType.BFLOAT16]
    assert bf.graph.inputs[0].dtype == ir.DataType.FLOAT and bf.graph.outputs[0].dtype == ir.DataType.FLOAT
    assert p.details["dtype"] == "bfloat16"


def test_fp16_skips_unknown_types_and_unknown_ops() -> None:
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 4] y) {
            t = Erf (x)
            k = TopK <axis = 1> (t, kk)
            y = Abs (t)
        }
    """.replace("k = TopK <axis = 1> (t, kk)", "k = Exp (t)")
    model, p = run_fp16(text)
    assert dtype_of(model, "Exp") == ir.DataType.FLOAT
    assert dtype_of(model, "Erf") == ir.DataType.FLOAT16
    # A value without a type: the node reading it is left alone.
    m2 = parse(text)
    erf = next(n for n in m2.graph if n.op_type == "Erf")
    erf.outputs[0].type = None
    p2 = ConvertFloat16Pass()
    p2(m2)
    assert dtype_of(m2, "Abs") is None or dtype_of(m2, "Abs") == ir.DataType.FLOAT
    assert any(d["reason"] == "an input's type is unknown" for d in p2.details["kept_fp32"])


def test_fp16_leaves_values_read_inside_subgraphs_in_fp32() -> None:
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x, bool c) => (float[2, 4] y) {
            h = Relu (x)
            k = Sigmoid (x)
            y = If (c) <then_branch = t () => (float[2, 4] a) { a = Identity (h) },
                        else_branch = e () => (float[2, 4] b) { b = Neg (k) }>
        }
    """
    model, p = run_fp16(text)
    assert dtype_of(model, "Relu") == ir.DataType.FLOAT and dtype_of(model, "Sigmoid") == ir.DataType.FLOAT
    assert {d["reason"] for d in p.details["kept_fp32"]} >= {"an output is read inside a subgraph"}
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(run_np(model, {"x": x, "c": np.array(True)})[0], np.maximum(x, 0), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_pretrained_minilm_embeddings_survive_every_target(target: str) -> None:
    """Real weights and sentences (activation outliers random weights lack): the embeddings of each
    target's file stay within cosine 0.999 of the float model's (fp16 on ort-cuda included), and
    with calibration data the fp16 range check keeps them there."""
    from pretrained import SENTENCES, build_minilm, mean_pool, min_cosine, minilm_feeds

    ex = build_minilm()
    model = ex.export()
    feeds = minilm_feeds(SENTENCES)
    ref = mean_pool(outputs(model, feeds)[0], feeds["attention_mask"])
    result = graphopt.optimize(model, target=target)
    got = mean_pool(outputs(result.model, feeds)[0], feeds["attention_mask"])
    assert min_cosine(ref, got) >= (0.999 if target == "ort-cuda" else 0.99999)
    if target == "ort-cuda":
        calib = [minilm_feeds(SENTENCES[i : i + 8]) for i in range(0, 32, 8)]
        text = OrtCudaBackend().default_pipeline(2)
        checked = graphopt.optimize(model, pipeline=text, calibration=calib)
        row = next(p for p in checked.report.passes if p.name == "convert-float16")
        assert row.stats.get("values_measured", 0) > 50
        assert not any(d["op_type"] == "Attention" for d in row.details["kept_fp32"])
        got = mean_pool(outputs(checked.model, feeds)[0], feeds["attention_mask"])
        assert min_cosine(ref, got) >= 0.999


@pytest.mark.parametrize("target", ["ort-cpu", "ort-cuda"])
def test_padding_mask_target_option_reaches_fuse_ort(target: str) -> None:
    """``padding_mask`` (what the LLM build declares for genai's attention_mask) is fuse-ort's option."""
    import graphopt

    cls = type(graphopt.default_registry().backend(target))
    assert "padding_mask" not in cls().default_pipeline()
    text = cls(padding_mask=["attention_mask"]).default_pipeline()
    assert text.count("padding_mask=[attention_mask]") == 1 and "fuse-ort(" in text, text

"""TensorRT (through ONNX Runtime's TensorRT execution provider) target."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from graphopt.backends.base import Backend
from graphopt.errors import PipelineError
from graphopt.passes.ir_helpers import all_nodes
from graphopt.spec import PassSpec, Step

__all__ = ["TensorRTBackend", "sparse_24_weights", "optimization_profile"]

_INTEGER_OPS = "integer-op quantization: TensorRT runs explicit Q/DQ (quantize=static) only"


@dataclasses.dataclass
class TensorRTOptions:
    device_id: int = dataclasses.field(default=0, metadata={"doc": "CUDA device ordinal"})
    fp16: bool = dataclasses.field(
        default=True,
        metadata={"doc": "let TensorRT choose fp16 kernels (trt_fp16_enable); the graph stays fp32"},
    )
    int8: bool | None = dataclasses.field(
        default=None, metadata={"doc": "trt_int8_enable; default: on when the model has Q/DQ nodes"}
    )
    fp16_graph: bool = dataclasses.field(
        default=False,
        metadata={
            "doc": "also convert the graph to fp16 (convert-float16, fp32 I/O), e.g. for "
            "strongly typed TensorRT networks; default: builder flag only"
        },
    )
    fp8: bool = dataclasses.field(
        default=False, metadata={"doc": "FP8 Q/DQ (not available: graphopt's quantize-static emits int8)"}
    )
    sparsity: bool | None = dataclasses.field(
        default=None, metadata={"doc": "trt_sparsity_enable; default: on when weights are 2:4 sparse"}
    )
    batch: list[int] = dataclasses.field(
        default_factory=lambda: [1, 1, 8], metadata={"doc": "min, opt, max of dynamic batch (first) dims"}
    )
    sequence: list[int] = dataclasses.field(
        default_factory=lambda: [1, 128, 512], metadata={"doc": "min, opt, max of other dynamic dims"}
    )
    dims: dict[str, list[int]] = dataclasses.field(
        default_factory=dict,
        metadata={"doc": "min, opt, max per symbolic dim name (wins over batch/sequence)"},
    )
    engine_cache: bool = dataclasses.field(default=True, metadata={"doc": "cache built engines on disk"})
    timing_cache: bool = dataclasses.field(default=True, metadata={"doc": "cache kernel timings on disk"})
    cache_dir: str = dataclasses.field(
        default="", metadata={"doc": "cache folder, relative to the settings file (default: NAME.trt_cache)"}
    )
    builder_optimization_level: int = dataclasses.field(
        default=3,
        metadata={"doc": "TensorRT builder optimization level 0-5 (5: slowest build, best kernels)"},
    )
    max_workspace_size: int = dataclasses.field(
        default=0, metadata={"doc": "builder workspace bytes (0: TensorRT's default)"}
    )


class TensorRTBackend(Backend):
    """TensorRT via ONNX Runtime's TensorRT provider: standard ONNX ops only (no com.microsoft op:
    checked), symmetric int8 Q/DQ for explicit quantization, fp16 through the builder flag,
    optimization profiles for dynamic inputs, engine and timing caches.

    The graph is cleaned and fused with the standard rule sets only (TensorRT fuses
    Conv/MatMul+activation, LayerNorm and attention patterns itself); nodes TensorRT rejects would
    run on the CUDA provider, and integer-op formats (MatMulInteger, ConvInteger, QLinear*) are
    refused because TensorRT only understands Q/DQ.
    """

    name = "tensorrt"
    providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    allows_contrib_ops = False
    Options: ClassVar[type] = TensorRTOptions
    unsupported_ops: ClassVar[dict[tuple[str, str], str]] = {
        ("", op): _INTEGER_OPS
        for op in ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLinear")
    }

    def validate_options(self) -> None:
        o = self.options
        if o.fp8:
            raise PipelineError(
                "tensorrt: fp8=true needs FP8 Q/DQ nodes, which graphopt's quantize-static does not emit; "
                "use fp16 (default) or quantize=static (int8)"
            )
        if not isinstance(o.dims, dict):
            raise PipelineError(
                f"tensorrt: dims must map symbolic dim names to [min, opt, max], got {o.dims!r}"
            )
        for name, triple in [("batch", o.batch), ("sequence", o.sequence), *sorted(o.dims.items())]:
            _check_triple(name, triple)
        if not 0 <= o.builder_optimization_level <= 5:
            raise PipelineError(
                f"tensorrt: builder_optimization_level must be 0-5, got {o.builder_optimization_level}"
            )
        if o.max_workspace_size < 0:
            raise PipelineError("tensorrt: max_workspace_size must be >= 0 bytes")

    #: Explicit Q/DQ only; symmetric int8 (zero points 0) on the inputs of the ops TensorRT runs in int8.
    supported_quantize: ClassVar[tuple[str, ...] | None] = ("static",)
    unsupported_quantize: ClassVar[dict[str, str]] = {
        mode: f"tensorrt: quantize={mode} is not a TensorRT format ({why}); use quantize=static with calibration data"
        for mode, why in [
            ("int4", "MatMulNBits is a com.microsoft op"),
            ("int8-weight", "MatMulNBits is a com.microsoft op"),
            ("dynamic", "integer ops are not explicit Q/DQ"),
        ]
    }
    qdq_placement: ClassVar[str | None] = "tensorrt"

    def finalize_passes(self, level: int) -> list[Step]:
        if self.options.fp16_graph and level >= 2:
            return [PassSpec("cleanup"), PassSpec("convert-float16"), PassSpec("cleanup")]
        return super().finalize_passes(level)

    # --- checks --------------------------------------------------------------------------------
    def check(self, model: ir.Model) -> list[str]:
        problems = super().check(model)
        int32: list[str] = []
        asym: list[str] = []
        for n in all_nodes(model):
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or n.domain not in ("", "ai.onnx"):
                continue
            x = n.inputs[0] if n.inputs else None
            if n.op_type == "DequantizeLinear" and x is not None and x.dtype == ir.DataType.INT32:
                int32.append(n.name or n.op_type)
            elif not _symmetric_int8(n):
                asym.append(n.name or n.op_type)
        if int32:
            problems.append(
                f"{len(int32)} int32 DequantizeLinear (quantized biases, e.g. {int32[0]}): TensorRT's Q/DQ layers "
                "take int8/fp8/int4 only; keep biases float (TensorRT fuses them)"
            )
        if asym:
            problems.append(
                f"{len(asym)} Q/DQ node(s) not symmetric int8 (e.g. {asym[0]}): TensorRT needs int8 with zero point 0"
            )
        return problems

    # --- settings -----------------------------------------------------------------------------
    def provider_options(
        self, model: ir.Model | None = None, model_path: str | os.PathLike | None = None
    ) -> list[dict[str, Any]]:
        o = self.options
        has_qdq = model is not None and any(
            n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph
        )
        sparse = model is not None and bool(sparse_24_weights(model))
        trt: dict[str, Any] = {
            "device_id": o.device_id,
            "trt_fp16_enable": o.fp16,
            "trt_int8_enable": has_qdq if o.int8 is None else o.int8,
            "trt_sparsity_enable": sparse if o.sparsity is None else o.sparsity,
            "trt_builder_optimization_level": o.builder_optimization_level,
        }
        if o.max_workspace_size:
            trt["trt_max_workspace_size"] = o.max_workspace_size
        cache = o.cache_dir or (
            os.path.splitext(os.path.basename(os.fspath(model_path)))[0] + ".trt_cache"
            if model_path
            else "trt_cache"
        )
        if o.engine_cache:
            trt["trt_engine_cache_enable"] = True
            trt["trt_engine_cache_path"] = cache
        if o.timing_cache:
            trt["trt_timing_cache_enable"] = True
            trt["trt_timing_cache_path"] = cache
        if model is not None:
            profile = optimization_profile(model, batch=o.batch, sequence=o.sequence, dims=o.dims)
            if profile:
                for which in ("min", "opt", "max"):
                    trt[f"trt_profile_{which}_shapes"] = ",".join(
                        f"{name}:{'x'.join(str(d) for d in shapes[which])}"
                        for name, shapes in profile.items()
                    )
        cuda = {"device_id": o.device_id, "do_copy_in_default_stream": True}
        return [trt, cuda, {}]

    def session_options(self, model: ir.Model | None = None) -> dict[str, Any]:
        # ONNX Runtime runs its extended (contrib) fusions after partitioning and only on nodes
        # assigned to the CUDA/CPU providers, so level ALL never hides ops from TensorRT and still
        # speeds up whatever falls back.
        return {"graph_optimization_level": "ORT_ENABLE_ALL"}

    def extra_settings(self, model: ir.Model, model_path: str | os.PathLike | None = None) -> dict[str, Any]:
        o = self.options
        return {
            "tensorrt": {
                "profile": optimization_profile(model, batch=o.batch, sequence=o.sequence, dims=o.dims),
                "sparse_weights": sparse_24_weights(model),
                "explicit_quantization": any(n.op_type == "QuantizeLinear" for n in model.graph),
                "hint": "the first session builds the engine (minutes for large models) into the cache "
                "folder; later sessions with the same model, profile and GPU load it",
            }
        }


# ---------------------------------------------------------------------------------------------


def _check_triple(name: str, triple: Any) -> None:
    if (
        not isinstance(triple, (list, tuple))
        or len(triple) != 3
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in triple)
    ):
        raise PipelineError(f"tensorrt: {name} must be [min, opt, max] integers, got {triple!r}")
    lo, opt, hi = triple
    if not 1 <= lo <= opt <= hi:
        raise PipelineError(f"tensorrt: {name} must satisfy 1 <= min <= opt <= max, got {list(triple)}")


def optimization_profile(
    model: ir.Model, *, batch: list[int], sequence: list[int], dims: dict[str, list[int]]
) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shapes of every graph input with symbolic dims (empty when all are static).

    A symbolic dim takes ``dims[name]`` when given, else ``batch`` on axis 0 and ``sequence``
    elsewhere; inputs sharing a dim name share its values, as TensorRT requires.
    """
    profile: dict[str, dict[str, list[int]]] = {}
    chosen: dict[str, list[int]] = {}
    for v in model.graph.inputs:
        if v.is_initializer() or v.shape is None or all(isinstance(d, int) for d in v.shape):
            continue
        shapes: dict[str, list[int]] = {"min": [], "opt": [], "max": []}
        for axis, d in enumerate(v.shape):
            if isinstance(d, int):
                triple = [d, d, d]
            else:
                key = d.value
                if key is not None and key in dims:
                    triple = list(dims[key])
                elif key is not None and key in chosen:
                    triple = chosen[key]
                else:
                    triple = list(batch if axis == 0 else sequence)
                if key is not None:
                    chosen[key] = triple
            for i, which in enumerate(("min", "opt", "max")):
                shapes[which].append(int(triple[i]))
        profile[str(v.name)] = shapes
    return profile


def sparse_24_weights(model: ir.Model) -> list[str]:
    """Names of Conv/MatMul/Gemm weights that are 2:4 sparse along their reduction axis (at least
    two zeros in every group of four consecutive input channels), as TensorRT's sparse kernels need."""
    found: list[str] = []
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        w = node.inputs[1]
        tensor = w.const_value if not w.is_graph_input() else None
        if tensor is None or w.name in found:
            continue
        try:
            a = np.asarray(tensor.numpy())
        except Exception:  # external data unreadable, string tensors
            continue
        if not np.issubdtype(a.dtype, np.floating) or a.ndim < 2:
            continue
        if node.op_type == "MatMul":
            k_last = np.moveaxis(a, -2, -1)  # [..., N, K]
        elif node.op_type == "Gemm":
            trans_b = node.attributes.get("transB")
            k_last = a if trans_b is not None and trans_b.as_int() else a.T  # [N, K]
        else:
            k_last = np.moveaxis(a, 1, -1)  # Conv [O, kh, kw, I]
        if k_last.shape[-1] % 4:
            continue
        groups = k_last.reshape(-1, 4)
        if groups.size and int((groups == 0).sum(axis=1).min()) >= 2:
            found.append(str(w.name))
    return found


def _symmetric_int8(node: ir.Node) -> bool:
    """Q/DQ with an int8 zero point that is all zeros (or float8 types)."""
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    if zp is None:
        out_dtype = node.attributes.get("output_dtype")
        return out_dtype is not None and out_dtype.as_int() == ir.DataType.INT8.value
    if zp.dtype not in (ir.DataType.INT8, ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E5M2):
        return False
    try:
        t = ir.convenience.get_const_tensor(zp)
        return t is not None and not np.asarray(t.numpy()).astype(np.float32).any()
    except Exception:  # unreadable constant: not provably symmetric
        return False

"""ONNX Runtime CUDA execution provider target."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, ClassVar, Literal

import onnx_ir as ir

from graphopt.backends.base import Backend, io_description
from graphopt.backends.ort_cpu import with_padding_mask
from graphopt.passes.ir_helpers import MS_DOMAIN as _MS
from graphopt.spec import PassSpec, Step

__all__ = ["OrtCudaBackend"]

logger = logging.getLogger("graphopt.backends.ort_cuda")


@dataclasses.dataclass
class OrtCudaOptions:
    device_id: int = dataclasses.field(default=0, metadata={"doc": "CUDA device ordinal"})
    precision: Literal["float16", "bfloat16", "float32"] = dataclasses.field(
        default="float16", metadata={"doc": "compute precision: float16 (convert-float16), bfloat16, float32"}
    )
    fp32_io: bool = dataclasses.field(
        default=True,
        metadata={"doc": "graph inputs/outputs stay float32 (false: fp16 I/O for fp16 IO binding)"},
    )
    cudnn_conv_algo_search: Literal["auto", "EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = dataclasses.field(
        default="auto",
        metadata={
            "doc": "cuDNN algorithm search; auto: EXHAUSTIVE unless a Conv input has "
            "dynamic spatial dims (then HEURISTIC: no new search per shape)"
        },
    )
    enable_cuda_graph: bool = dataclasses.field(
        default=False, metadata={"doc": "capture a CUDA graph (static shapes and IO binding required)"}
    )
    padding_mask: list[str] = dataclasses.field(
        default_factory=list,
        metadata={
            "doc": "inputs that follow GroupQueryAttention's padding convention (right padding, e.g. "
            "onnxruntime-genai's attention_mask); forwarded to fuse-ort(padding_mask=...)"
        },
    )


class OrtCudaBackend(Backend):
    """ONNX Runtime on NVIDIA GPUs (CUDA provider): the ort-cpu fusions with CUDA kernels
    (Attention / MultiHeadAttention / GroupQueryAttention, SkipLayerNormalization, BiasGelu,
    RotaryEmbedding), then float16 compute with float32 graph I/O (``convert-float16``).

    Quantization: ``int4`` / ``int8-weight`` lower to MatMulNBits (CUDA kernels, fp16 activations);
    ``static`` Q/DQ runs as float compute between Q/DQ pairs on this provider (use ``tensorrt`` for
    int8 speed); ``dynamic`` is refused (DynamicQuantizeLinear has no CUDA kernel).
    Settings: IO binding works with the ``io`` section's names and dtypes (float32 unless
    ``fp32_io=false``); ``do_copy_in_default_stream`` keeps copies ordered with compute.
    """

    name = "ort-cuda"
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
    allows_contrib_ops = True
    Options: ClassVar[type] = OrtCudaOptions
    fallback_ops: ClassVar[dict[tuple[str, str], str]] = {
        ("", "DynamicQuantizeLinear"): "no CUDA kernel (dynamic int8 quantization is a CPU format)",
        ("", "ConvInteger"): "no CUDA kernel",
        (_MS, "DynamicQuantizeMatMul"): "CPU-only contrib op",
        (_MS, "MatMulIntegerToFloat"): "CPU-only contrib op",
        (_MS, "FusedConv"): "float32 only on CUDA (no fp16 kernel)",
    }
    unsupported_quantize: ClassVar[dict[str, str]] = {
        "dynamic": "ort-cuda: dynamic int8 quantization has no CUDA kernels (DynamicQuantizeLinear runs on the "
        "CPU); use quantize=int4 or int8-weight (MatMulNBits), or target tensorrt with quantize=static",
    }

    def fusion_passes(self, level: int, quantize: dict[str, Any] | None = None) -> list[Step]:
        # FusedConv has no fp16 CUDA kernel: keep Conv + activation standard so that the fp16
        # conversion can take the convolutions (ORT fuses Conv+Relu on CUDA itself).
        steps = super().fusion_passes(level, quantize)
        if self.options.precision != "float32":
            steps = [
                PassSpec("fuse-ort", {"exclude": ["fused-conv"]}) if s == PassSpec("fuse-ort") else s
                for s in steps
            ]
        return with_padding_mask(steps, self.options.padding_mask)

    def quantize_options(self, options: dict[str, Any]) -> dict[str, Any]:
        opts = super().quantize_options(options)
        if opts.get("mode") == "static":
            logger.warning(
                "ort-cuda: static Q/DQ runs as float compute between Q/DQ nodes on the CUDA "
                "provider (no int8 speed-up); target tensorrt for int8 kernels"
            )
        return opts

    def precision_passes(self, level: int, quantize: dict[str, Any] | None = None) -> list[Step]:
        """Runs on the cleaned graph (see :meth:`finalize_passes`), where constants are folded into
        initializers that convert once instead of being cast at run time."""
        return []

    def finalize_passes(self, level: int) -> list[Step]:
        precision = self._precision(level)
        if precision:
            return [PassSpec("cleanup"), *precision, PassSpec("cleanup")]
        return super().finalize_passes(level)

    def _precision(self, level: int) -> list[Step]:
        if level < 2 or self.options.precision == "float32":
            return []
        opts: dict[str, Any] = {}
        if self.options.precision != "float16":
            opts["dtype"] = self.options.precision
        if not self.options.fp32_io:
            opts["keep_io_types"] = False
        return [PassSpec("convert-float16", opts)]

    def provider_options(
        self, model: ir.Model | None = None, model_path: str | os.PathLike | None = None
    ) -> list[dict[str, Any]]:
        search = self.options.cudnn_conv_algo_search
        if search == "auto":
            search = "HEURISTIC" if model is not None and _dynamic_conv_input(model) else "EXHAUSTIVE"
        # Value forms as ONNX Runtime's CUDA provider documentation writes them ('1'/'0' strings for
        # the last two), so a deployment copying the settings into C/C++ options gets the same.
        cuda = {
            "device_id": self.options.device_id,
            "cudnn_conv_algo_search": search,
            "do_copy_in_default_stream": True,
            "cudnn_conv_use_max_workspace": "1",
            "enable_cuda_graph": "1" if self.options.enable_cuda_graph else "0",
        }
        return [cuda, {}]

    def session_options(self, model: ir.Model | None = None) -> dict[str, Any]:
        return {"graph_optimization_level": "ORT_ENABLE_ALL"}

    def extra_settings(self, model: ir.Model, model_path: str | os.PathLike | None = None) -> dict[str, Any]:
        io = io_description(model)
        return {
            "precision": self.options.precision,
            "io_binding": {
                "device_type": "cuda",
                "device_id": self.options.device_id,
                "inputs": {i["name"]: i["dtype"] for i in io["inputs"]},
                "outputs": {o["name"]: o["dtype"] for o in io["outputs"]},
                "hint": "bind inputs/outputs on the device with these dtypes (io section for shapes); "
                "enable_cuda_graph needs fixed shapes and bound buffers",
            },
        }


def _dynamic_conv_input(model: ir.Model) -> bool:
    """True when a Conv reads an activation whose spatial dims are not fixed numbers."""
    for node in model.graph:
        if (
            node.op_type in ("Conv", "FusedConv", "ConvTranspose")
            and node.inputs
            and node.inputs[0] is not None
        ):
            shape = node.inputs[0].shape
            if shape is None or any(not isinstance(d, int) for d in list(shape)[2:]):
                return True
    return False

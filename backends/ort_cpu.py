"""ONNX Runtime CPU execution provider target."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import onnx_ir as ir

from graphopt.backends.base import Backend
from graphopt.spec import PassSpec, Step

__all__ = ["OrtCpuBackend", "OrtCpuOptions", "with_padding_mask"]


@dataclasses.dataclass
class OrtCpuOptions:
    padding_mask: list[str] = dataclasses.field(
        default_factory=list,
        metadata={
            "doc": "inputs that follow GroupQueryAttention's padding convention (right padding, e.g. "
            "onnxruntime-genai's attention_mask); forwarded to fuse-ort(padding_mask=...)"
        },
    )


def with_padding_mask(steps: list[Step], names: list[str]) -> list[Step]:
    """``steps`` with ``padding_mask=names`` on their ``fuse-ort`` step (unchanged when empty): the
    caller's declaration of how it feeds the mask, which decoder attention needs to fuse."""
    if not names:
        return steps
    return [
        PassSpec(s.name, {**s.options, "padding_mask": list(names)})
        if isinstance(s, PassSpec) and s.name == "fuse-ort"
        else s
        for s in steps
    ]


class OrtCpuBackend(Backend):
    """ONNX Runtime on the CPU: cleanup, standard fusions, then com.microsoft contrib fusions
    (FusedConv, SkipLayerNormalization, Attention, ...); weight-only quantization lowers to
    MatMulNBits (the quantize passes emit it). Last, ``lower-ort-cpu`` turns the fused forms that
    ORT's CPU kernels run slower than the plain ops back into those ops (SkipLayerNormalization →
    Sum + LayerNormalization, which ORT's CPU kernels run faster).

    Session settings: ORT's own level-ALL optimizations stay on (they add CPU-only layout
    transforms such as NCHWc for convolutions that graphopt does not do). Intra-op threads are left
    to ONNX Runtime's default (one per physical core), which is what its own tuning guide
    recommends for a process that runs one model; set ``intra_op_num_threads`` in the settings
    file when several sessions share a machine.
    """

    name = "ort-cpu"
    providers = ("CPUExecutionProvider",)
    allows_contrib_ops = True
    Options: ClassVar[type] = OrtCpuOptions

    def fusion_passes(self, level: int, quantize: dict[str, Any] | None = None) -> list[Step]:
        return with_padding_mask(super().fusion_passes(level, quantize), self.options.padding_mask)

    def finalize_passes(self, level: int) -> list[Step]:
        # After quantization: dynamic quantization folds SmoothQuant scales into the fused norms.
        if level >= 2:
            return [PassSpec("lower-ort-cpu"), PassSpec("cleanup")]
        return super().finalize_passes(level)

    def session_options(self, model: ir.Model | None = None) -> dict[str, Any]:
        return {"graph_optimization_level": "ORT_ENABLE_ALL"}

    def provider_options(
        self, model: ir.Model | None = None, model_path: str | os.PathLike | None = None
    ) -> list[dict[str, Any]]:
        return [{}]

"""ONNX Runtime CPU execution provider target."""

from __future__ import annotations

import os
from typing import Any

import onnx_ir as ir

from graphopt.backends.base import Backend
from graphopt.spec import PassSpec, Step

__all__ = ["OrtCpuBackend"]


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

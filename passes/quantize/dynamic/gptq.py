"""GPTQ weights for ``quantize-dynamic`` (with calibration data): each int8 weight quantized
against its input's Hessian ``X^T X`` from the float model, transformed as the input will be
(divided by the SmoothQuant scale, outlier channels removed). Weights whose input has no Hessian
keep round-to-nearest."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from .._common.gptq import gptq_int8
from .._common.hessians import accumulate_hessians, budget_groups

if TYPE_CHECKING:
    from .run import Run

__all__ = ["apply_gptq", "hessians"]


def apply_gptq(run: Run) -> None:
    """Set ``plan.quantized`` of every MatMul/Gemm/Attention plan whose input has a Hessian. Runs
    on the float graph, before the transforms edit it."""
    o = run.options
    need: dict[str, int] = {}
    for p in run.plans:
        if p.node.op_type != "Gather" and p.source:
            need[p.source] = p.weight.shape[0]
    done = 0
    for hess in hessians(run.model, need, run.calibration, o.hessian_memory_mb * 2**20, run.details):
        for p in run.plans:
            h = hess.get(p.source)
            if h is None or p.node.op_type == "Gather":
                continue
            h = h.copy()
            if p.smooth is not None:
                h /= np.outer(p.smooth, p.smooth)
            w = p.weight
            if p.smooth is not None:
                w = (w.astype(np.float64) * p.smooth[:, None]).astype(np.float32)
            if p.outliers is not None:
                w = w.copy()
                w[p.outliers] = 0.0
                h[p.outliers, :] = 0.0
                h[:, p.outliers] = 0.0
            p.quantized = gptq_int8(w, h, damp=o.damp, reduce_range=o.reduce_range)
            done += 1
    run.count("gptq", done)


def hessians(
    model: ir.Model, need: dict[str, int], data: Any, budget: int, details: dict[str, Any]
) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{name: X^T X}`` (float64) for the named float-model values (``need``: name → K)
    over the calibration data, in groups that fit ``budget`` bytes (one calibration run per group)."""
    groups = budget_groups(list(need), lambda name: ((name,), need[name]), budget)
    details["calibration_runs"] = len(groups)
    for names in groups:
        acc, tokens = accumulate_hessians(model, names, data, description="gptq")
        details["calibration_tokens"] = tokens
        yield acc

"""The probe: a run of the float model that measures the candidates' inputs (per-channel
maximum and range, the largest token maximum over the median one), from which smoothing,
centering, outlier channels and the per-token choice are decided.

It runs on the calibration data when the pipeline has some, else on generated inputs: the outlier
channels of trained transformers come from their weights and norms, so random tokens show them
too, and the first token's massive activations show once per input (hence many inputs of a
realistic length rather than a few short ones)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["probe", "probe_dims", "probe_stats"]

logger = logging.getLogger("graphopt.passes.quantize.dynamic")


def probe(
    model: ir.Model,
    names: list[str],
    calibration: Any,
    batches: int,
    ranges: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    token_ratio: dict[str, float] | None = None,
    length: int = 64,
    used: dict[str, Any] | None = None,
) -> dict[str, np.ndarray] | None:
    """Per-channel (last axis) max |x| of the named values of the float model (and, into
    ``ranges``, per-channel (min, max), into ``token_ratio`` the largest row maximum over the
    median one): over all the calibration data when given, else over ``batches`` generated inputs
    of ``length`` tokens. If the model cannot run generated inputs of that size, the default
    sizes are tried. ``used`` receives what was run (for the report); None when the probe failed."""
    from graphopt.calibration import CalibrationData

    if calibration is not None:
        if used is not None:
            used["data"] = "calibration"
        try:
            return probe_stats(model, names, calibration, None, ranges, token_ratio)
        except Exception as exc:  # noqa: BLE001 - the probe is optional; the report counts the failure
            logger.warning("quantize-dynamic probe failed (%s)", exc)
            return None
    from graphopt.inputs import generate_inputs

    failure: Exception | None = None
    for dims in (probe_dims(model, length), None):
        part_ranges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        part_ratio: dict[str, float] = {}
        try:
            data = CalibrationData.from_any(
                [generate_inputs(model, dims=dims, seed=i) for i in range(batches)]
            )
            stats = probe_stats(model, names, data, batches, part_ranges, part_ratio)
        except Exception as exc:  # noqa: BLE001 - the next sizes, else no probe (the report counts it)
            failure = exc
            continue
        if ranges is not None:
            ranges.update(part_ranges)
        if token_ratio is not None:
            token_ratio.update(part_ratio)
        if used is not None:
            used.update(data="generated", inputs=batches, dims=dims if dims is not None else "default")
        return stats
    logger.warning("quantize-dynamic probe failed on generated inputs (%s)", failure)
    return None


def probe_dims(model: ir.Model, length: int) -> dict[str, int]:
    """Sizes for generated probe inputs: a symbolic dim that is some input's first axis or is
    named like a batch gets 1, every other symbolic dim (sequence, image side) gets ``length``."""
    dims: dict[str, int] = {}
    for value in model.graph.inputs:
        if value.shape is None:
            continue
        for axis, d in enumerate(value.shape):
            if not isinstance(d, ir.SymbolicDim) or d.value is None:
                continue
            batch = axis == 0 or "batch" in d.value.lower()
            if batch or d.value not in dims:
                dims[d.value] = 1 if batch else length
    return dims


def probe_stats(
    model: ir.Model,
    names: list[str],
    data: Any,
    limit: int | None,
    ranges: dict[str, tuple[np.ndarray, np.ndarray]] | None,
    token_ratio: dict[str, float] | None,
) -> dict[str, np.ndarray]:
    """The statistics of :func:`probe` over ``data``; raises when the model cannot run it."""
    from graphopt.calibration import stream_tensors

    out: dict[str, np.ndarray] = {}
    for tensors in stream_tensors(model, names, data, limit=limit):
        for k, arr in tensors.items():
            a = np.asarray(arr)
            if a.ndim == 0 or a.size == 0:
                continue
            a2 = a.reshape(-1, a.shape[-1]).astype(np.float64)
            lo, hi = a2.min(axis=0), a2.max(axis=0)
            if token_ratio is not None:
                rows = np.abs(a2).max(axis=1)
                med = float(np.median(rows))
                r = float(rows.max() / med) if med > 0 else 1.0
                token_ratio[k] = max(token_ratio.get(k, 0.0), r)
            m = np.maximum(-lo, hi)
            if k not in out or out[k].shape != m.shape:
                out[k] = m
                if ranges is not None:
                    ranges[k] = (lo, hi)
            else:
                out[k] = np.maximum(out[k], m)
                if ranges is not None:
                    ranges[k] = (np.minimum(ranges[k][0], lo), np.maximum(ranges[k][1], hi))
    return out

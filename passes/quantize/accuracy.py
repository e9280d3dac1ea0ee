"""Accuracy control for quantization: per-layer sensitivity and a fidelity target.

Sensitivity quantizes one layer at a time (everything else float) and measures the model
outputs against the float model; the fidelity target (``min_cosine``) keeps the most sensitive
layers in float, fewest first, until the fully quantized model meets it. Both run the mode pass
itself on copies of the float model, so what is measured is exactly what is emitted.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["Fidelity", "LayerSensitivity", "fidelity", "greedy_keep_float", "sensitivity_table"]

logger = logging.getLogger("graphopt.passes.quantize.accuracy")


@dataclasses.dataclass
class Fidelity:
    """How close a candidate's outputs are to the reference's, over all float outputs and rows."""

    min_cosine: float  # worst cosine over outputs and over the rows (batch items) of each output
    sqnr_db: float  # worst signal-to-quantization-noise ratio over outputs

    def to_dict(self) -> dict[str, float | str]:
        return {"min_cosine": _num(self.min_cosine), "sqnr_db": _num(self.sqnr_db)}


@dataclasses.dataclass
class LayerSensitivity:
    node: str
    op_type: str
    min_cosine: float
    sqnr_db: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "op_type": self.op_type,
            "min_cosine": _num(self.min_cosine),
            "sqnr_db": _num(self.sqnr_db),
        }


def _num(v: float) -> float | str:
    return round(float(v), 6) if math.isfinite(v) else str(v)


def _row_cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    r = ref.astype(np.float64).reshape(ref.shape[0] if ref.ndim > 1 else 1, -1)
    g = got.astype(np.float64).reshape(r.shape)
    num = (r * g).sum(axis=1)
    den = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
    out = np.ones(len(r))
    nz = den > 0
    out[nz] = num[nz] / den[nz]
    # A zero row on one side only is as different as it gets.
    out[~nz & ((np.abs(r).sum(1) > 0) | (np.abs(g).sum(1) > 0))] = 0.0
    return out


def fidelity(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> Fidelity:
    """Per-row cosine and SQNR over every float output of every evaluation batch."""
    cos, sqnr = 1.0, math.inf
    for ref_outs, got_outs in zip(reference, candidate):
        for r, g in zip(ref_outs, got_outs):
            if not np.issubdtype(np.asarray(r).dtype, np.floating):
                continue
            r = np.asarray(r, dtype=np.float64)
            g = np.asarray(g, dtype=np.float64)
            if r.shape != g.shape or not np.all(np.isfinite(g)):
                return Fidelity(0.0, -math.inf)
            if r.size == 0:
                continue
            cos = min(cos, float(_row_cosines(r, g).min()))
            noise = float(((r - g) ** 2).sum())
            signal = float((r**2).sum())
            if noise > 0:
                sqnr = min(sqnr, 10 * math.log10(max(signal, 1e-30) / noise))
    return Fidelity(cos, sqnr)


def greedy_keep_float(
    ranked: list[str],
    evaluate: Callable[[list[str]], Fidelity],
    target: float,
    *,
    max_float: int | None = None,
) -> tuple[list[str], Fidelity, int]:
    """Fewest of the most sensitive layers (``ranked``, worst first) to keep in float for
    ``evaluate(kept) >= target``: double the count until met, then bisect between the last two
    counts. Returns (kept, fidelity, trials). When even all of them do not reach the target, the
    best achieved is returned and the caller reports it."""
    limit = len(ranked) if max_float is None else min(max_float, len(ranked))
    trials = 0
    cache: dict[int, Fidelity] = {}

    def at(k: int) -> Fidelity:
        nonlocal trials
        if k not in cache:
            trials += 1
            cache[k] = evaluate(ranked[:k])
            logger.info("keeping %d layer(s) in float: min cosine %.6f", k, cache[k].min_cosine)
        return cache[k]

    lo, hi = 0, 1
    while hi <= limit and at(hi).min_cosine < target:
        lo, hi = hi, hi * 2
    if hi > limit:
        hi = limit
        if at(hi).min_cosine < target:
            best = max(cache, key=lambda k: (cache[k].min_cosine, -k))
            return ranked[:best], cache[best], trials
    # at(lo) fails (or lo == 0 untested-failing), at(hi) meets the target: bisect.
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid).min_cosine >= target:
            hi = mid
        else:
            lo = mid
    return ranked[:hi], at(hi), trials


def sensitivity_table(rows: list[dict[str, Any]], limit: int | None = None) -> str:
    """Text table of per-layer sensitivity rows (``details['sensitivity']``), worst first."""
    rows = rows[:limit] if limit else rows
    out = [("layer", "op", "min cosine", "SQNR dB")]
    for r in rows:
        cos = r["min_cosine"]
        sq = r["sqnr_db"]
        out.append(
            (
                r["node"],
                r["op_type"],
                f"{cos:.6f}" if isinstance(cos, float) else str(cos),
                f"{sq:.1f}" if isinstance(sq, float) else str(sq),
            )
        )
    widths = [max(len(row[i]) for row in out) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in out)


def node_index(model: ir.Model) -> dict[str, ir.Node]:
    return {n.name: n for n in model.graph if n.name}

"""Calibration statistics and calibrators for static quantization.

Statistics are *streaming and mergeable*: each batch is reduced into a fixed-size summary
(running min/max, a histogram, a per-channel absolute maximum), and two summaries of disjoint
data merge into the summary of their union. Memory therefore stays flat however many batches
the calibration set has, and statistics gathered in pieces (or in parallel) combine exactly.

The histogram's range is symmetric around zero and a power of two, ``[-R, R)`` with
``R = 2**k``; when a batch exceeds it the range doubles as often as needed and adjacent bins
are summed pairwise. Because every histogram lives on the same power-of-two grid, re-binning
and merging are exact (no count is split between bins) and the result does not depend on the
order of the batches. (ONNX Runtime's ``HistogramCollector`` re-bins with ``np.histogram`` on
the old bin edges, which smears counts and depends on batch order.)

Calibrators turn statistics into a clip range ``(rmin, rmax)`` per tensor:

* ``minmax``: the observed extremes;
* ``percentile``: the ``percentile``-th value of each tail (outliers clipped);
* ``entropy``: TensorRT's KL-divergence threshold on the histogram of ``|x|``;
* ``mse``: the range whose quantization (rounding + clipping) error on the histogram is least.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from graphopt.errors import PipelineError

__all__ = [
    "CALIBRATORS",
    "ChannelAbsMax",
    "Histogram",
    "MinMax",
    "compute_range",
    "entropy_range",
    "minmax_range",
    "mse_range",
    "percentile_range",
]

CALIBRATORS = ("minmax", "percentile", "entropy", "mse")


@dataclasses.dataclass
class MinMax:
    """Running minimum and maximum (NaN/inf ignored)."""

    min: float = math.inf
    max: float = -math.inf
    count: int = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size == 0:
            return
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        finite = x if np.isfinite(x).all() else x[np.isfinite(x)]
        if finite.size == 0:
            return
        self.min = min(self.min, float(finite.min()))
        self.max = max(self.max, float(finite.max()))
        self.count += int(finite.size)

    def merge(self, other: MinMax) -> MinMax:
        return MinMax(min(self.min, other.min), max(self.max, other.max), self.count + other.count)

    @property
    def empty(self) -> bool:
        return self.count == 0


class Histogram:
    """A histogram over ``[-R, R)`` with ``R`` a power of two and ``2*half_bins`` bins.

    Mergeable and order-independent (see the module docstring); it also keeps the exact
    running min/max, so every calibrator can be computed from it.
    """

    def __init__(self, half_bins: int = 4096) -> None:
        if half_bins < 16 or half_bins & (half_bins - 1):
            raise ValueError("half_bins must be a power of two >= 16")
        self.half_bins = half_bins
        self.exponent: int | None = None  # R = 2**exponent; None until a non-zero value arrives
        self.counts = np.zeros(2 * half_bins, dtype=np.int64)
        self.minmax = MinMax()

    # --- geometry ---------------------------------------------------------------------------
    @property
    def range(self) -> float:
        return 0.0 if self.exponent is None else math.ldexp(1.0, self.exponent)

    @property
    def width(self) -> float:
        return self.range / self.half_bins

    def edges(self) -> np.ndarray:
        r = self.range or 1.0
        return np.linspace(-r, r, 2 * self.half_bins + 1)

    def _grow(self, exponent: int) -> None:
        """Re-bin to ``R = 2**exponent`` (≥ the current range) by summing aligned bins."""
        if self.exponent is None:
            # Only zeros so far: they sit in bin half_bins ([0, w)) on any grid.
            self.exponent = exponent
            return
        factor = 1 << (exponent - self.exponent)
        if factor == 1:
            return
        n = 2 * self.half_bins
        # Old bin i starts at (offset + i) fine units from the new -R; new bins span `factor` units.
        offset = (factor - 1) * self.half_bins
        target = (offset + np.arange(n)) // factor
        self.counts = np.bincount(target, weights=self.counts, minlength=n).astype(np.int64)
        self.exponent = exponent

    # --- updates ----------------------------------------------------------------------------
    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).ravel()
        if x.size and not np.isfinite(x).all():
            x = x[np.isfinite(x)]
        if x.size == 0:
            return
        self.minmax.update(x)
        amax = max(abs(self.minmax.min), abs(self.minmax.max))
        if amax > 0:
            # smallest power of two strictly above amax, so amax falls inside [-R, R)
            needed = math.frexp(amax)[1]
            if self.exponent is None or needed > self.exponent:
                self._grow(needed)
        if self.exponent is None:
            self.counts[self.half_bins] += x.size
            return
        idx = np.floor(x / self.width).astype(np.int64) + self.half_bins
        np.clip(idx, 0, 2 * self.half_bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=2 * self.half_bins)

    def merge(self, other: Histogram) -> Histogram:
        """The histogram of both data sets (neither operand changes)."""
        if other.half_bins != self.half_bins:
            raise ValueError("cannot merge histograms with different bin counts")
        out = Histogram(self.half_bins)
        out.minmax = self.minmax.merge(other.minmax)
        exps = [e for e in (self.exponent, other.exponent) if e is not None]
        out.exponent = max(exps) if exps else None
        for h in (self, other):
            c = Histogram(self.half_bins)
            c.counts, c.exponent = h.counts.copy(), h.exponent
            if out.exponent is not None:
                c._grow(out.exponent)
            out.counts += c.counts
        return out

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def nbytes(self) -> int:
        return int(self.counts.nbytes)


class ChannelAbsMax:
    """Running per-channel max of ``|x|`` over the last axis (SmoothQuant's activation scale)."""

    def __init__(self) -> None:
        self.values: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim == 0 or x.size == 0:
            return
        m = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0).astype(np.float64)
        if self.values is None:
            self.values = m
        elif self.values.shape == m.shape:
            self.values = np.maximum(self.values, m)
        else:
            raise ValueError(f"channel count changed between batches ({self.values.shape} vs {m.shape})")

    def merge(self, other: ChannelAbsMax) -> ChannelAbsMax:
        out = ChannelAbsMax()
        vals = [v for v in (self.values, other.values) if v is not None]
        out.values = np.maximum.reduce(vals) if len(vals) == 2 else (vals[0].copy() if vals else None)
        return out


# ---------------------------------------------------------------------------------------------
# Calibrators: statistics → (rmin, rmax)


def minmax_range(stats: MinMax | Histogram) -> tuple[float, float]:
    mm = stats.minmax if isinstance(stats, Histogram) else stats
    if mm.empty:
        return 0.0, 0.0
    return mm.min, mm.max


def _trimmed(h: Histogram, max_bins: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of the occupied part of ``h``, coarsened to at most ``max_bins`` bins."""
    nz = np.nonzero(h.counts)[0]
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    counts = h.counts[lo:hi]
    factor = max(1, math.ceil(len(counts) / max_bins))
    if factor > 1:
        pad = (-len(counts)) % factor
        counts = np.concatenate([counts, np.zeros(pad, np.int64)]).reshape(-1, factor).sum(axis=1)
    w = h.width * factor
    edges = -h.range + lo * h.width + w * np.arange(len(counts) + 1)
    return counts, edges


def percentile_range(h: Histogram, percentile: float = 99.999) -> tuple[float, float]:
    """Clip each tail at ``100 - percentile`` percent of the values (a one-signed tensor keeps 0)."""
    if not 50.0 < percentile <= 100.0:
        raise PipelineError(f"percentile must be in (50, 100], not {percentile}")
    if h.total == 0 or h.exponent is None:
        return minmax_range(h)
    lo_v, hi_v = h.minmax.min, h.minmax.max
    cdf = np.cumsum(h.counts) / h.total
    edges = h.edges()
    tail = 1.0 - percentile / 100.0
    # upper: the right edge of the first bin where the cdf reaches 1 - tail
    i_hi = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
    rmax = float(edges[min(i_hi + 1, len(edges) - 1)])
    i_lo = int(np.searchsorted(cdf, tail, side="right"))
    rmin = float(edges[i_lo])
    rmax = min(max(rmax, 0.0), hi_v) if hi_v > 0 else hi_v
    rmin = max(min(rmin, 0.0), lo_v) if lo_v < 0 else lo_v
    return rmin, rmax


def _kl_threshold(abs_counts: np.ndarray, levels: int) -> int:
    """TensorRT's entropy calibration: the bin count ``i`` whose clipped distribution, merged
    into ``levels`` quantization bins, is closest (KL divergence) to the reference."""
    n = len(abs_counts)
    if n <= levels:
        return n
    counts = abs_counts.astype(np.float64)
    best_i, best_kl = n, math.inf
    stride = max(1, (n - levels) // 256)
    candidates = list(range(levels, n + 1, stride))
    if candidates[-1] != n:
        candidates.append(n)
    for i in candidates:
        ref = counts[:i].copy()
        ref[i - 1] += counts[i:].sum()
        nonzero = ref != 0
        # merge the i bins into `levels` bins, then expand back over the non-empty bins
        chunk = np.linspace(0, i, levels + 1).astype(np.int64)
        sums = np.add.reduceat(counts[:i], chunk[:-1])
        nz_per = np.add.reduceat(nonzero.astype(np.float64), chunk[:-1])
        with np.errstate(divide="ignore", invalid="ignore"):
            avg = np.where(nz_per > 0, sums / nz_per, 0.0)
        q = np.repeat(avg, np.diff(chunk)) * nonzero
        p_sum, q_sum = ref.sum(), q.sum()
        if q_sum == 0:
            continue
        p = ref / p_sum
        qn = q / q_sum
        mask = p > 0
        # bins with p > 0 but q == 0 make KL infinite; smooth them as TensorRT does
        qn = np.where(mask & (qn == 0), 1e-12, qn)
        kl = float(np.sum(p[mask] * np.log(p[mask] / qn[mask])))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i


def entropy_range(h: Histogram, levels: int = 128, max_bins: int = 2048) -> tuple[float, float]:
    """Symmetric KL threshold on ``|x|`` (TensorRT-style), intersected with the observed range."""
    if h.total == 0 or h.exponent is None:
        return minmax_range(h)
    hb = h.half_bins
    abs_counts = h.counts[hb:].copy()
    abs_counts += h.counts[:hb][::-1]
    nz = np.nonzero(abs_counts)[0]
    top = int(nz[-1]) + 1
    abs_counts = abs_counts[:top]
    factor = max(1, math.ceil(top / max_bins))
    if factor > 1:
        pad = (-top) % factor
        abs_counts = np.concatenate([abs_counts, np.zeros(pad, np.int64)]).reshape(-1, factor).sum(axis=1)
    width = h.width * factor
    if len(abs_counts) > 1:
        # The zero spike (ReLU outputs, padding) merged with its neighbours dominates the KL and
        # drives the threshold far too low; like NVIDIA's pytorch-quantization, flatten it.
        abs_counts = abs_counts.copy()
        abs_counts[0] = abs_counts[1]
    i = _kl_threshold(abs_counts, levels)
    threshold = i * width
    lo_v, hi_v = h.minmax.min, h.minmax.max
    return max(lo_v, -threshold), min(hi_v, threshold)


def _qparams(rmin: np.ndarray, rmax: np.ndarray, qmin: int, qmax: int, symmetric: bool):
    rmin = np.minimum(rmin, 0.0)
    rmax = np.maximum(rmax, 0.0)
    if symmetric:
        amax = np.maximum(-rmin, rmax)
        half = (qmax - qmin) // 2
        scale = np.where(amax > 0, amax / half, 1.0)
        zp = np.full_like(scale, float((qmax + qmin + 1) // 2))
    else:
        scale = np.where(rmax > rmin, (rmax - rmin) / (qmax - qmin), 1.0)
        zp = np.clip(np.round(qmin - rmin / scale), qmin, qmax)
    return scale, zp


def mse_range(
    h: Histogram,
    qmin: int = 0,
    qmax: int = 255,
    symmetric: bool = False,
    steps: int = 128,
    max_bins: int = 2048,
) -> tuple[float, float]:
    """The range, shrinking both ends of the observed one proportionally, with the least
    expected quantize-dequantize squared error over the histogram (bin centres)."""
    if h.total == 0 or h.exponent is None:
        return minmax_range(h)
    counts, edges = _trimmed(h, max_bins)
    centers = (edges[:-1] + edges[1:]) / 2
    centers = np.clip(centers, h.minmax.min, h.minmax.max)
    lo_v, hi_v = min(h.minmax.min, 0.0), max(h.minmax.max, 0.0)
    alphas = np.linspace(1.0 / steps, 1.0, steps)
    rmin, rmax = alphas * lo_v, alphas * hi_v
    scale, zp = _qparams(rmin, rmax, qmin, qmax, symmetric)
    q = np.clip(np.round(centers[None, :] / scale[:, None]) + zp[:, None], qmin, qmax)
    err = ((q - zp[:, None]) * scale[:, None] - centers[None, :]) ** 2
    # rounding noise inside a bin (uniform) is not seen by the centres: add width²/12 ≈ const
    total = err @ counts.astype(np.float64)
    best = int(np.argmin(total))  # first minimum: the widest range on ties is last, prefer smallest error
    return float(max(rmin[best], h.minmax.min)), float(min(rmax[best], h.minmax.max))


def compute_range(
    stats: MinMax | Histogram,
    calibrator: str,
    *,
    percentile: float = 99.999,
    qmin: int = 0,
    qmax: int = 255,
    symmetric: bool = False,
) -> tuple[float, float]:
    """``(rmin, rmax)`` for one tensor by the named calibrator."""
    if calibrator == "minmax" or not isinstance(stats, Histogram):
        return minmax_range(stats)
    if calibrator == "percentile":
        return percentile_range(stats, percentile)
    if calibrator == "entropy":
        nonneg = stats.minmax.min >= 0
        levels = (qmax - qmin) if (nonneg and not symmetric) else (qmax - qmin + 1) // 2
        return entropy_range(stats, levels=max(2, levels))
    if calibrator == "mse":
        return mse_range(stats, qmin, qmax, symmetric)
    raise PipelineError(f"unknown calibrator {calibrator!r}; choose one of {', '.join(CALIBRATORS)}")


def describe(stats: Any) -> dict[str, Any]:
    """A JSON-safe summary of a statistics object (for reports and debugging)."""
    if isinstance(stats, Histogram):
        return {"min": stats.minmax.min, "max": stats.minmax.max, "count": stats.total, "range": stats.range}
    if isinstance(stats, MinMax):
        return {"min": stats.min, "max": stats.max, "count": stats.count}
    return {}

"""int8 weights with one scale per output channel (or one per tensor), as ORT's integer kernels
(dynamic mode) and QDQ ``DequantizeLinear`` (static mode) take them."""

from __future__ import annotations

import numpy as np

__all__ = ["int8_symmetric", "quantize_weight"]


def int8_symmetric(
    w: np.ndarray, reduce_axes: tuple[int, ...] | None = None, *, qmax: int = 127, float32_scale: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 levels in ``[-qmax, qmax]`` (zero point 0), one scale per slice that
    ``reduce_axes`` reduces over (None: one scale in all).

    Returns ``(q int8 like w, scale float32)``, the scale of shape ``w.shape`` without
    ``reduce_axes``. ``float32_scale``: round the scale to float32 before dividing by it (the levels
    then match the stored scale exactly); else divide by the float64 scale."""
    w64 = np.asarray(w, dtype=np.float64)
    amax = np.abs(w64).max(axis=reduce_axes, keepdims=True, initial=0.0)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    if float32_scale:
        scale = scale.astype(np.float32).astype(np.float64)
    q = np.clip(np.rint(w64 / scale), -qmax, qmax).astype(np.int8)
    kept = scale.reshape(()) if reduce_axes is None else np.squeeze(scale, axis=reduce_axes)
    return q, np.asarray(kept, np.float32)


def quantize_weight(
    w: np.ndarray, *, per_channel: bool = True, symmetric: bool = True, reduce_range: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize a (K, N) float weight to int8 along K, one scale per column N (or one in all).

    Returns ``(q int8 (K, N), scale float32, zero_point int8)``; scale/zero point have shape (N,)
    when ``per_channel`` else shape (). ``reduce_range``: 7-bit levels (int16-safe products on
    x86 CPUs without VNNI)."""
    axis = (0,) if per_channel else None
    if symmetric:
        q, scale = int8_symmetric(w, axis, qmax=63 if reduce_range else 127, float32_scale=False)
        return q, scale, np.zeros(scale.shape, np.int8)
    w = np.asarray(w, dtype=np.float64)
    qmin, qmax = (-64, 63) if reduce_range else (-128, 127)
    rmin = np.minimum(np.min(w, axis=axis), 0.0)
    rmax = np.maximum(np.max(w, axis=axis), 0.0)
    span = rmax - rmin
    scale = np.where(span > 0, span / (qmax - qmin), 1.0)
    zp = np.clip(np.rint(qmin - rmin / scale), qmin, qmax)
    q = np.clip(np.rint(w / scale) + zp, qmin, qmax)
    return q.astype(np.int8), np.asarray(scale, np.float32), np.asarray(zp, np.int8)

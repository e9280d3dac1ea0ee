"""Block-wise weight numerics for ``quantize-weight-only`` (numpy; W is in [N, K] orientation: one
row per output, K = the reduction axis).

Layout (ORT's ``MatMulNBits`` / ``GatherBlockQuantized`` schemas): blocks of ``block_size`` along
K, one scale per block (and a zero point when asymmetric); 4-bit levels packed two per byte, low
nibble first. Without zero points ORT uses ``2^(bits-1)``, so the symmetric variant stores
``q = round(w / s) + 2^(bits-1)`` with ``s = w_absmax_signed / -2^(bits-1)`` (the largest
magnitude maps exactly to the most negative level, as ORT's MLAS quantizer does). K that is not a
multiple of ``block_size`` is zero-padded (ORT reads only K values).

Float block offsets (:func:`quantize_offset`): an integer zero point cannot place a block's levels
at an arbitrary float minimum, as GGUF's Q4_1 blocks do (``w = d * q + m``). Such a weight keeps
an exact float offset per block, and ORT computes its share of the product,
``sum_blocks offset * blocksum(x)``, as extra K columns of the same MatMulNBits: the input gets its
block sums appended, the weight the offsets (quantized with ``bits`` in blocks of their own;
:func:`with_offset_columns`). MatMulNBits' own float zero points would express the same thing but
send ORT's CPU kernel to a slow fp32 path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .._common.gptq import gptq_inverse_factor, gptq_sweep

__all__ = [
    "SEARCH_RATIOS",
    "QuantizedWeight",
    "block_params",
    "dequantize",
    "gptq_quantize",
    "on_grid",
    "pack_blocks",
    "quantize_offset",
    "quantize_rtn",
    "unpack_blocks",
    "with_offset_columns",
]


@dataclasses.dataclass
class QuantizedWeight:
    """Block-quantized ``W [N, K]``: levels ``q [N, k_blocks, block_size]`` (uint8, unpacked),
    ``scales [N, k_blocks]`` (storage dtype), ``zero_points [N, k_blocks]`` (uint8) or None and
    ``offsets [N, k_blocks]`` (float32, added to each block's values; see :func:`quantize_offset`)
    or None."""

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    k: int
    offsets: np.ndarray | None = None

    @property
    def block_size(self) -> int:
        return int(self.q.shape[2])


def _pad_k(w: np.ndarray, block_size: int) -> np.ndarray:
    k = w.shape[1]
    kp = -(-k // block_size) * block_size
    if kp == k:
        return w
    return np.concatenate([w, np.zeros((w.shape[0], kp - k), w.dtype)], axis=1)


#: Clipping ratios tried by the scale search (1.0 = the block's full range, plain RTN).
SEARCH_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def block_params(
    blocks: np.ndarray, bits: int, symmetric: bool, scale_dtype: Any = np.float32, search: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Per-block scale and zero point (as float32 arrays ``blocks.shape[:-1]``) for values in the
    last axis; the scale is rounded to its storage dtype first so ``q`` matches what ORT dequantizes.

    ``search``: also try the range shrunk by :data:`SEARCH_RATIOS` and keep, per block, the one
    with the least squared rounding error (clipping a few outliers often lowers it)."""
    if not search:
        return _block_params(blocks, bits, symmetric, scale_dtype, 1.0)
    best_s, best_z = _block_params(blocks, bits, symmetric, scale_dtype, 1.0)
    best_e = _block_error(blocks, best_s, best_z, bits)
    for r in SEARCH_RATIOS[1:]:
        s, z = _block_params(blocks, bits, symmetric, scale_dtype, r)
        e = _block_error(blocks, s, z, bits)
        better = e < best_e
        best_s, best_z, best_e = (
            np.where(better, s, best_s),
            np.where(better, z, best_z),
            np.where(better, e, best_e),
        )
    return best_s, best_z


def _block_error(blocks: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    q = _levels(blocks, scale[..., None], zp[..., None], bits)
    return np.sum(np.square((q - zp[..., None]) * scale[..., None] - blocks), axis=-1)


def _block_params(
    blocks: np.ndarray, bits: int, symmetric: bool, scale_dtype: Any, ratio: float
) -> tuple[np.ndarray, np.ndarray]:
    maxq = (1 << bits) - 1
    if symmetric:
        half = float(1 << (bits - 1))
        idx = np.abs(blocks).argmax(axis=-1)[..., None]
        peak = np.take_along_axis(blocks, idx, axis=-1)[..., 0]
        scale = peak * ratio / -half
        zp = np.full(scale.shape, half, np.float32)
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0) * ratio
        hi = np.maximum(blocks.max(axis=-1), 0.0) * ratio
        scale = (hi - lo) / maxq
        zp = None
    scale = np.where(scale == 0, 1.0, scale).astype(scale_dtype).astype(np.float32)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)  # fp16 underflow
    if zp is None:
        zp = np.clip(np.round(-lo / scale), 0, maxq).astype(np.float32)
    return scale, zp


def _levels(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(np.round(w / scale) + zp, 0, (1 << bits) - 1)


def quantize_rtn(
    w: np.ndarray,
    bits: int,
    block_size: int,
    symmetric: bool,
    scale_dtype: Any = np.float32,
    search: bool = False,
) -> QuantizedWeight:
    """Round-to-nearest block quantization of ``w [N, K]`` (``search``: see :func:`block_params`)."""
    n, k = w.shape
    blocks = _pad_k(w.astype(np.float32), block_size).reshape(n, -1, block_size)
    scale, zp = block_params(blocks, bits, symmetric, scale_dtype, search)
    q = _levels(blocks, scale[..., None], zp[..., None], bits).astype(np.uint8)
    return QuantizedWeight(q, scale.astype(scale_dtype), None if symmetric else zp.astype(np.uint8), bits, k)


def quantize_offset(
    w: np.ndarray, bits: int, block_size: int, scale_dtype: Any = np.float32
) -> QuantizedWeight:
    """Levels from each block's minimum (``scale = (max - min) / (2^bits - 1)``, as GGUF's Q4_1),
    with the integer zero point nearest ``-min / scale`` and the rest of the block's offset kept
    as a float (``offsets``). A weight dequantized from such blocks comes back exactly; any other
    weight gets the least-squares offset for its levels. ``w [N, K]``, K a multiple of
    ``block_size`` (the offsets are per block of the input).

    Always with zero points: without them the offset must carry the whole block minimum, and its
    own 4-bit rounding (:func:`with_offset_columns`) then costs more than the zero points save
    (measured on SmolLM2; ORT's kernel was no faster either)."""
    n, k = w.shape
    maxq = (1 << bits) - 1
    blocks = w.astype(np.float32).reshape(n, -1, block_size)
    lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
    scale = ((hi - lo) / maxq).astype(scale_dtype).astype(np.float32)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.round((blocks - lo[..., None]) / scale[..., None]), 0, maxq)
    zp = np.clip(np.round(-lo / scale), 0, maxq)
    rest = blocks.astype(np.float64) - (q - zp[..., None]) * scale[..., None]
    offsets = rest.mean(axis=-1).astype(np.float32)
    return QuantizedWeight(
        q.astype(np.uint8), scale.astype(scale_dtype), zp.astype(np.uint8), bits, k, offsets
    )


def on_grid(w: np.ndarray, qw: QuantizedWeight, tolerance: float = 1e-3) -> bool:
    """Whether ``qw`` (from :func:`quantize_offset`) reproduces ``w`` to ``tolerance`` of each
    block's step: the weight already lay on a ``bits``-bit grid with a float minimum per block
    (a model dequantized from GGUF Q4_1-style blocks), so its quantization loses nothing."""
    assert qw.offsets is not None
    scale = qw.scales.astype(np.float32)
    zp = _zero_points(qw)
    exact = (qw.q - zp) * scale[..., None] + qw.offsets[..., None]
    err = np.abs(exact - w.reshape(qw.q.shape)).max(axis=-1)
    return bool(np.all(err <= tolerance * scale))


def with_offset_columns(qw: QuantizedWeight) -> QuantizedWeight:
    """The weight over ``K + k_blocks`` inputs that ORT runs for ``qw`` with offsets: its blocks,
    then the offsets themselves (one per block of the input, quantized asymmetric with ``bits``
    in blocks of the same size), read against the input's block sums."""
    n, nb, bs = qw.q.shape
    cols = _offset_blocks(qw)
    assert qw.zero_points is not None and cols.zero_points is not None
    return QuantizedWeight(
        np.concatenate([qw.q, cols.q], axis=1),
        np.concatenate([qw.scales, cols.scales], axis=1),
        np.concatenate([qw.zero_points, cols.zero_points], axis=1),
        qw.bits,
        nb * bs + nb,
    )


def _offset_blocks(qw: QuantizedWeight) -> QuantizedWeight:
    assert qw.offsets is not None
    return quantize_rtn(qw.offsets, qw.bits, qw.block_size, symmetric=False, scale_dtype=qw.scales.dtype.type)


def _zero_points(qw: QuantizedWeight) -> np.ndarray | np.float32:
    """The zero point ORT uses per block (broadcastable to ``q``): stored, or ``2^(bits-1)``."""
    if qw.zero_points is None:
        return np.float32(1 << (qw.bits - 1))
    return qw.zero_points.astype(np.float32)[..., None]


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """``W [N, K]`` (float32) as ORT reconstructs it from ``qw`` (with offsets: as stored by
    :func:`with_offset_columns`, their own rounding included)."""
    w = (qw.q.astype(np.float32) - _zero_points(qw)) * qw.scales.astype(np.float32)[..., None]
    if qw.offsets is not None:
        w = w + dequantize(_offset_blocks(qw))[..., None]
    return w.reshape(w.shape[0], -1)[:, : qw.k]


def gptq_quantize(
    w: np.ndarray,
    h: np.ndarray,
    bits: int,
    block_size: int,
    symmetric: bool,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    scale_dtype: Any = np.float32,
    search: bool = False,
    lazy: int = 128,
) -> QuantizedWeight:
    """GPTQ of ``w [N, K]`` given ``h = sum X^T X [K, K]`` (float64 inside; deterministic).

    Scales of a block are chosen from the block's error-updated weights when its first column is
    reached; with ``act_order`` they are fixed from the original weights (static groups), since
    MatMulNBits needs each block's K range contiguous."""
    n, k = w.shape
    kp = -(-k // block_size) * block_size
    nb = kp // block_size
    W = np.zeros((n, kp), np.float64)
    W[:, :k] = w
    H = np.zeros((kp, kp), np.float64)
    H[:k, :k] = h
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = None
    if act_order:
        s0, z0 = block_params(
            W.reshape(n, nb, block_size).astype(np.float32), bits, symmetric, scale_dtype, search
        )
        static = (s0.astype(np.float64), z0.astype(np.float64))
        perm = np.argsort(-np.diag(H), kind="stable")
    else:
        perm = np.arange(kp)
    W = W[:, perm]
    H = H[perm][:, perm]
    hinv = gptq_inverse_factor(H, damp)
    lazy = max(block_size, (lazy // block_size) * block_size)
    Q = np.zeros((n, kp), np.float64)
    scales = np.zeros((n, nb), np.float64)
    zps = np.zeros((n, nb), np.float64)
    if static is not None:
        scales, zps = static
    maxq = (1 << bits) - 1

    def quantize_column(col: int, window: np.ndarray, i: int) -> np.ndarray:
        if static is None:
            g = col // block_size
            if col % block_size == 0:
                s, z = block_params(
                    window[:, i : i + block_size].astype(np.float32), bits, symmetric, scale_dtype, search
                )
                scales[:, g], zps[:, g] = s, z
        else:
            g = perm[col] // block_size
        s, z = scales[:, g], zps[:, g]
        q = np.clip(np.round(window[:, i] / s) + z, 0, maxq)
        Q[:, col] = q
        return (q - z) * s

    gptq_sweep(W, hinv, quantize_column, lazy)
    inv = np.argsort(perm)
    Q = Q[:, inv]
    qz = None if symmetric else zps.astype(np.uint8)
    return QuantizedWeight(
        Q.reshape(n, nb, block_size).astype(np.uint8), scales.astype(scale_dtype), qz, bits, k
    )


def pack_blocks(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 levels ``[..., m]`` → packed bytes ``[..., m * bits / 8]`` (low nibble first)."""
    q = q.astype(np.uint8)
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack_blocks(packed: np.ndarray, bits: int, count: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_blocks` (``count`` trims a padded last axis)."""
    if bits == 8:
        return packed
    out = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))
    return out if count is None else out[..., :count]

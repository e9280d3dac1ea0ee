"""GPTQ (Frantar et al. 2022): quantize a weight column by column and spread each column's
rounding error over the columns not yet quantized, in proportion to the inverse Hessian ``H =
X^T X`` of the weight's input, which is what makes it better than rounding each weight alone.

The sweep is shared; the weight-only mode quantizes block-wise for ``MatMulNBits`` with it, the
dynamic mode per output channel in int8 (:func:`gptq_int8`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["gptq_int8", "gptq_inverse_factor", "gptq_sweep"]


def gptq_inverse_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of ``(H + damp·mean(diag H)·I)^-1`` (float64; H is modified in
    place), the matrix GPTQ's column sweep divides by. A singular H gets a stronger damping."""
    k = h.shape[0]
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    try:
        return np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        h[np.diag_indices(k)] += float(np.mean(np.diag(h)))
        return np.linalg.cholesky(np.linalg.inv(h)).T


def gptq_sweep(
    W: np.ndarray,
    hinv: np.ndarray,
    quantize_column: Callable[[int, np.ndarray, int], np.ndarray],
    lazy: int = 128,
) -> None:
    """GPTQ's column sweep over ``W [N, K]`` (float64, updated in place).

    ``quantize_column(col, window, i)`` returns the dequantized column ``window[:, i]`` (``window``
    is ``W[:, i1:i2]`` with the error updates so far, so a quantizer may pick block scales from it)
    and records its levels; the rounding error of each column is spread over the later columns in
    proportion to the inverse Hessian. Columns go in lazy batches of ``lazy``."""
    kp = W.shape[1]
    for i1 in range(0, kp, lazy):
        i2 = min(i1 + lazy, kp)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        Hi = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            x = W1[:, i]
            err = (x - quantize_column(i1 + i, W1, i)) / Hi[i, i]
            W1[:, i:] -= np.outer(err, Hi[i, i:])
            E1[:, i] = err
        if i2 < kp:
            W[:, i2:] -= E1 @ hinv[i1:i2, i2:]


def gptq_int8(
    w: np.ndarray, h: np.ndarray, *, damp: float = 0.01, reduce_range: bool = False, act_order: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ for the int8 weights of the dynamic kernels: ``w (K, N)``, one symmetric scale per
    output channel (fixed from the weight's range, as round-to-nearest picks it), ``h = X^T X (K, K)``.

    Returns ``(q int8 (K, N), scale float32 (N,), zero_point int8 (N,))`` like
    :func:`~.int8.quantize_weight`. An input channel that never fires (zero diagonal) gets a zero
    weight."""
    W = np.asarray(w, dtype=np.float64).T.copy()  # (N, K): one row per output channel
    H = np.asarray(h, dtype=np.float64).copy()
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    qmax = 63 if reduce_range else 127
    scale = (np.abs(W).max(axis=1) / qmax).astype(np.float32)
    scale[scale == 0] = 1.0
    s64 = scale.astype(np.float64)
    # The scales are fixed per output channel, so the columns can go in any order: the largest
    # activations first ("act order"), whose errors the most later columns can absorb.
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(H.shape[0])
    W, H = W[:, perm], H[perm][:, perm]
    levels = np.zeros_like(W)

    def quantize_column(col: int, window: np.ndarray, i: int) -> np.ndarray:
        q = np.clip(np.round(window[:, i] / s64), -qmax, qmax)
        levels[:, col] = q
        return q * s64

    gptq_sweep(W, gptq_inverse_factor(H, damp), quantize_column)
    levels = levels[:, np.argsort(perm)]
    return np.ascontiguousarray(levels.T).astype(np.int8), scale, np.zeros(scale.shape, np.int8)

"""Which weights unstructured and N:M pruning zero: masks and checks on plain arrays.

N:M keeps the ``n`` largest (or highest-scoring) of every ``m`` consecutive weights along the
reduction axis (:func:`nm_axis`): MatMul ``W[K, N]`` along K per column, Gemm along K respecting
``transB``, Conv ``W[O, I, kh, kw]`` along I per (output channel, kh, kw), the layout TensorRT /
cuSPARSELt use (KRSC with C innermost). Unstructured pruning zeroes the smallest magnitudes per
layer, under one global threshold, or (with Wanda-style scores) per output unit. Nothing here
touches the graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "global_prune",
    "magnitude_mask",
    "nm_axis",
    "nm_prune",
    "out_axis",
    "per_output_mask",
    "satisfies_nm",
    "sparsity_of",
]


def sparsity_of(array: np.ndarray) -> float:
    """Fraction of exact zeros."""
    a = np.asarray(array)
    return float((a == 0).sum() / a.size) if a.size else 0.0


def satisfies_nm(array: np.ndarray, n: int, m: int, axis: int) -> bool:
    """True when every group of ``m`` consecutive elements along ``axis`` has at most ``n`` non-zeros."""
    a = np.moveaxis(np.asarray(array), axis, -1)
    if a.shape[-1] % m:
        return False
    groups = a.reshape(-1, m)
    return bool(((groups != 0).sum(axis=1) <= n).all())


def nm_axis(op_type: str, weight_rank: int, attributes: dict[str, Any] | None = None) -> int | None:
    """The reduction axis of a layer's weight along which N:M groups run (None: not a target)."""
    attributes = attributes or {}
    if op_type == "MatMul":
        return weight_rank - 2 if weight_rank >= 2 else None
    if op_type == "Gemm":
        return 1 if attributes.get("transB", 0) else 0
    if op_type == "Conv":
        return 1 if weight_rank >= 3 else None
    return None


def out_axis(op_type: str, rank: int, trans_b: int) -> int:
    """The axis of a layer's weight that holds its output units."""
    if op_type == "MatMul":
        return rank - 1
    if op_type == "Gemm":
        return 0 if trans_b else 1
    return 0  # Conv


def nm_prune(w: np.ndarray, n: int, m: int, axis: int, score: np.ndarray | None = None) -> np.ndarray:
    """Keep the ``n`` highest-scoring (default: largest-magnitude) entries in each group of ``m``
    along ``axis`` (ties: first)."""
    moved = np.moveaxis(w, axis, -1)
    shape = moved.shape
    groups = moved.reshape(-1, m)
    key = np.abs(groups) if score is None else np.moveaxis(score, axis, -1).reshape(-1, m)
    order = np.argsort(-key, axis=1, kind="stable")
    mask = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(mask, order[:, :n], True, axis=1)
    out = np.where(mask, groups, 0).astype(w.dtype).reshape(shape)
    return np.ascontiguousarray(np.moveaxis(out, -1, axis))


def per_output_mask(score: np.ndarray, axis: int, sparsity: float) -> np.ndarray:
    """Mask of the lowest-scoring ``sparsity`` fraction within each output unit's weights (units
    along ``axis``; Wanda compares weights of the same output, whose errors add up in the same
    activation)."""
    moved = np.moveaxis(score, axis, 0)
    rows = moved.reshape(moved.shape[0], -1)
    k = int(np.floor(sparsity * rows.shape[1]))
    mask = np.zeros(rows.shape, dtype=bool)
    if k > 0:
        order = np.argsort(rows, axis=1, kind="stable")
        np.put_along_axis(mask, order[:, :k], True, axis=1)
    return np.moveaxis(mask.reshape(moved.shape), 0, axis)


def magnitude_mask(w: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` smallest-|w| entries (exact count; introselect, not a full sort:
    deterministic for the same weights)."""
    flat = np.abs(w).ravel()
    mask = np.zeros(flat.size, dtype=bool)
    if k >= flat.size:
        mask[:] = True
    elif k > 0:
        mask[np.argpartition(flat, k - 1)[:k]] = True
    return mask.reshape(w.shape)


def global_prune(
    arrays: dict[Any, np.ndarray], scores: dict[Any, np.ndarray], sparsity: float
) -> dict[Any, np.ndarray]:
    """Zero the ``sparsity`` fraction of all ``arrays`` together with the lowest scores (|w| where
    ``scores`` has none): one threshold, ties broken in order; empty when nothing is removed."""
    new: dict[Any, np.ndarray] = {}
    total = sum(a.size for a in arrays.values())
    k = int(np.floor(sparsity * total))
    if k > 0:
        mags = np.concatenate(
            [(scores[w] if w in scores else np.abs(a)).ravel().astype(np.float32) for w, a in arrays.items()]
        )
        thr = np.partition(mags, k - 1)[k - 1]
        below = int((mags < thr).sum())
        del mags
        ties_left = k - below
        for w, a in arrays.items():
            mag = (scores[w] if w in scores else np.abs(a)).astype(np.float32)
            mask = mag < thr
            if ties_left > 0:
                eq = np.flatnonzero((mag == thr).ravel())[:ties_left]
                mask.ravel()[eq] = True
                ties_left -= len(eq)
            new[w] = np.where(mask, 0, a).astype(a.dtype)
    return new

"""``H = X^T X`` of named activations over calibration data, for GPTQ.

A Hessian is ``K x K`` float64 per activation, so a large model's do not fit in memory at once:
the activations are grouped into calibration runs whose Hessians fit a byte budget, and each run
streams the data one batch at a time (memory ``O(K^2)`` per activation, never ``O(tokens)``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable
from typing import Any, TypeVar

import numpy as np

__all__ = ["accumulate_hessians", "budget_groups"]

K = TypeVar("K")


def budget_groups(
    keys: list[K],
    needs: Callable[[K], tuple[Collection[Hashable], int]],
    budget: int,
    *,
    run_per_activation: bool = False,
) -> list[list[K]]:
    """Split ``keys`` (in order) into calibration runs whose Hessians fit ``budget`` bytes.

    ``needs(key)`` gives the activations whose Hessians ``key`` needs and their channel count K;
    an activation the current run already holds costs nothing more. ``run_per_activation``: a new
    run for each key that needs an activation the current run lacks (sequential calibration)."""
    groups: list[list[K]] = [[]]
    held: set[Hashable] = set()  # activations whose Hessian the current run already holds
    used = 0
    for key in keys:
        activations, k = needs(key)
        fresh = set(activations) - held
        size = k * k * 8 * len(fresh)
        if groups[-1] and (used + size > budget or (run_per_activation and fresh)):
            groups.append([])
            held, used = set(), 0
            fresh = set(activations)
            size = k * k * 8 * len(fresh)
        groups[-1].append(key)
        held |= fresh
        used += size
    return groups


def accumulate_hessians(
    model: Any, names: list[str], data: Any, *, limit: int | None = None, description: str = "gptq"
) -> tuple[dict[str, np.ndarray], int]:
    """``{name: X^T X}`` (float64, X the activation flattened to rows of its last axis) over one
    run of ``model`` on the calibration ``data``, and the number of rows (tokens) per activation."""
    from graphopt.calibration import stream_tensors

    acc: dict[str, np.ndarray] = {}
    tokens = 0
    for values in stream_tensors(model, names, data, limit=limit, description=description):
        for name in names:
            x = np.asarray(values[name], dtype=np.float64)
            x = x.reshape(-1, x.shape[-1])
            if name in acc:
                acc[name] += x.T @ x
            else:
                acc[name] = x.T @ x
        tokens += x.shape[0]
    return acc, tokens

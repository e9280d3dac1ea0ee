"""Structured pruning: remove whole units (Conv channels, FFN neurons, attention heads) and shrink
every dependent weight, parameter and shape.

Groups are found first (attention heads, then the closures of the remaining producer layers),
filtered by targets and include/exclude, scored, and the lowest-scoring units of each group (or
under one global threshold) are cut out by :mod:`.rewrite`. A group the analysis does not
understand is left whole, with the reason in the report's ``skipped``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from graphopt.passes.ir_helpers import constant_array, infer_shapes

from .closure import Closure
from .groups import Group, producer_axes
from .heads import HeadMatcher
from .importance import unit_scores
from .options import PruneRun
from .rewrite import apply_keep

__all__ = ["find_groups", "keep_units", "prune_structured"]


def prune_structured(run: PruneRun, model: ir.Model) -> bool:
    """Find, score and cut the unit groups; report each. True when a unit was removed."""
    groups, skipped = find_groups(run, model)
    scores = unit_scores(run, model, groups)
    keeps = keep_units(run, groups, scores)
    graph = model.graph
    taken: set[str] = set()  # names made so far (unique_name fills it from the graph)
    report: list[dict[str, Any]] = []
    modified = False
    need_inference = False
    for g, keep in zip(groups, keeps):
        removed = np.setdiff1d(np.arange(g.units), keep)
        entry = {
            "kind": g.kind,
            "group": g.name,
            "units": g.units,
            "kept": int(keep.size),
            "removed": [int(i) for i in removed],
            "slices": [
                {
                    "node": s.node.name,
                    "input": s.index,
                    "weight": s.weight_name or s.node.inputs[s.index].name,
                    "axis": s.axis,
                    "block": s.block,
                    "role": s.role,
                }
                for s in g.slices
            ],
        }
        report.append(entry)
        if removed.size == 0:
            continue
        modified = True
        run.count(f"pruned:{g.kind}")
        run.count(f"removed_units:{g.kind}", int(removed.size))
        if apply_keep(graph, taken, g, keep):
            need_inference = True
    if modified:
        common.RemoveUnusedNodesPass()(model)
        if need_inference:
            infer_shapes(model)
    run.details["groups"] = report
    run.details["skipped"] = skipped
    total = sum(g.units for g in groups)
    run.details["removed_fraction"] = (
        round(sum(len(e["removed"]) for e in report) / total, 6) if total else 0.0
    )
    return modified


def find_groups(run: PruneRun, model: ir.Model) -> tuple[list[Group], list[dict[str, Any]]]:
    """(prunable groups, skipped groups with their reasons), heads first."""
    infer_shapes(model)
    targets = set(run.options.targets)
    groups: list[Group] = []
    skipped: list[dict[str, Any]] = []
    covered: set[int] = set()  # producers already in a group
    if "heads" in targets:
        _head_groups(run, model.graph, groups, skipped, covered)
    if targets & {"channels", "ffn"}:
        _unit_groups(run, model.graph, targets, groups, skipped, covered)
    return groups, skipped


def _head_groups(
    run: PruneRun, graph: ir.Graph, groups: list[Group], skipped: list[dict[str, Any]], covered: set[int]
) -> None:
    for node in list(graph):
        if node.op_type not in ("MatMul", "Gemm") or producer_axes(node) is None:
            continue
        hm = HeadMatcher(node)
        g = hm.match()
        if g is None:
            if hm.reason is not None:
                skipped.append({"kind": "heads", "group": node.name, "reason": hm.reason})
                run.count("skipped:heads")
            continue
        why = run.selected(node, node.inputs[1].name) or next(
            (run.selected(p, p.inputs[1].name) for p in g.producers if run.selected(p, p.inputs[1].name)),
            None,
        )
        if why:
            skipped.append({"kind": "heads", "group": g.name, "reason": why})
            continue
        if g.units < 2:
            skipped.append({"kind": "heads", "group": g.name, "reason": "a single head"})
            continue
        groups.append(g)
        for p in g.producers:
            covered.add(id(p))


def _unit_groups(
    run: PruneRun,
    graph: ir.Graph,
    targets: set[str],
    groups: list[Group],
    skipped: list[dict[str, Any]],
    covered: set[int],
) -> None:
    for node in list(graph):
        if id(node) in covered or node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        axes = producer_axes(node)
        if axes is None:
            continue
        w = constant_array(node.inputs[1])
        units = int(w.shape[axes[1]])  # type: ignore[union-attr]
        g = Closure(node, units).run()
        for p in g.producers:
            covered.add(id(p))
        name = ",".join(p.name or p.op_type for p in g.producers)
        if g.reason is None and not any(s.role == "in" for s in g.slices):
            g.reason = "units have no consumer layer"
        if g.reason is None and g.kind not in targets:
            g.reason = f"{g.kind} not in targets"
        if g.reason is None:
            for s in g.slices:
                if s.role in ("out", "in") and (why := run.selected(s.node, s.weight_name)):
                    g.reason = f"{s.node.name}: {why}"
                    break
        if g.reason is None and units < 2:
            g.reason = "a single unit"
        if g.reason is not None:
            skipped.append({"kind": g.kind, "group": name, "reason": g.reason})
            run.count(f"skipped:{g.kind}")
            continue
        g.name = name
        groups.append(g)


def keep_units(run: PruneRun, groups: list[Group], scores: list[np.ndarray]) -> list[np.ndarray]:
    """Sorted unit indices to keep per group."""
    o = run.options
    keeps: list[np.ndarray] = []
    if o.scope == "global" and groups:
        flat = np.concatenate(scores)
        k = int(np.floor(o.sparsity * flat.size))
        order = np.argsort(flat, kind="stable")
        removed = np.zeros(flat.size, dtype=bool)
        removed[order[:k]] = True
        start = 0
        for g in groups:
            r = removed[start : start + g.units]
            start += g.units
            n_remove = min(int(r.sum()), g.units - 1)
            keeps.append(_keep(g, scores[len(keeps)], n_remove, o.round_to))
        return keeps
    for g, s in zip(groups, scores):
        keeps.append(_keep(g, s, int(np.floor(o.sparsity * g.units)), o.round_to))
    return keeps


def _keep(g: Group, score: np.ndarray, n_remove: int, round_to: int) -> np.ndarray:
    keep_n = max(1, g.units - n_remove)
    r = round_to
    if r > 1 and keep_n % r and g.units >= r:
        keep_n = min(g.units, int(np.ceil(keep_n / r) * r))
    order = np.argsort(-score, kind="stable")
    return np.sort(order[:keep_n])

"""Unstructured and N:M pruning: zero weights in place, shapes unchanged.

Targets are the weight initializers of Conv / MatMul / Gemm (input 1); embedding tables
(Gather), normalization parameters, biases, weights shared with other ops or exposed as graph
outputs, and tensors below ``min_size`` are never targets. Each distinct weight is pruned once,
per layer, under one global threshold, or N:M along its reduction axis; the report lists every
weight with its decision.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from .importance import WeightTarget, weight_activation_scores
from .masks import (
    global_prune,
    magnitude_mask,
    nm_axis,
    nm_prune,
    out_axis,
    per_output_mask,
    satisfies_nm,
    sparsity_of,
)
from .options import FLOAT_TYPES, PruneRun

__all__ = ["weight_targets", "zero_weights"]


def weight_targets(run: PruneRun, model: ir.Model) -> list[WeightTarget]:
    """(weight value, nodes using it, N:M axis, skip reason) per distinct weight, graph order."""
    graph = model.graph
    by_weight: dict[ir.Value, list[ir.Node]] = {}
    order: list[ir.Value] = []
    axes: dict[ir.Value, int | None] = {}
    reasons: dict[ir.Value, str | None] = {}
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        if len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        w = node.inputs[1]
        if w.const_value is None:
            continue  # activations (attention scores), not weights
        if w not in by_weight:
            by_weight[w] = []
            order.append(w)
        by_weight[w].append(node)
        arr_shape = w.shape
        rank = arr_shape.rank() if arr_shape is not None else 0
        axis = nm_axis(node.op_type, rank, {"transB": node.attributes.get_int("transB", 0)})
        reason = None
        if w.dtype not in FLOAT_TYPES:
            reason = f"weight dtype {w.dtype} not float"
        elif node.op_type == "MatMul" and rank < 2:
            reason = "MatMul weight rank < 2"
        elif (sel := run.selected(node, w.name)) is not None:
            reason = sel
        elif w.const_value.size < run.options.min_size:
            reason = f"smaller than min_size={run.options.min_size}"
        prev = reasons.get(w)
        if w in axes and axes[w] != axis:
            reason = reason or "weight shared by layers with different reduction axes"
        axes[w] = axis
        reasons[w] = prev or reason
    for w in order:
        if reasons[w] is None:
            for u in w.uses():
                if u.node.op_type not in ("Conv", "MatMul", "Gemm") or u.idx != 1:
                    reasons[w] = f"weight also used by {u.node.op_type} {u.node.name} (embedding/tied)"
                    break
            if w.is_graph_output():
                reasons[w] = "weight is a graph output"
    return [(w, by_weight[w], axes[w], reasons[w]) for w in order]


def zero_weights(run: PruneRun, model: ir.Model) -> bool:
    """Prune every target weight in place and report each; True when a weight changed."""
    targets = weight_targets(run, model)
    arrays: dict[ir.Value, np.ndarray] = {}
    for w, _nodes, _axis, reason in targets:
        if reason is None:
            arrays[w] = w.const_value.numpy()  # type: ignore[union-attr]
    scores: dict[ir.Value, np.ndarray] = {}
    if run.options.importance == "activation":
        scores = weight_activation_scores(run, model, targets, arrays)
    new, nm_reason = _pruned_arrays(run, targets, arrays, scores)
    layers: list[dict[str, Any]] = []
    modified = False
    total_pruned = zeros = 0
    for w, nodes, axis, reason in targets:
        entry: dict[str, Any] = {
            "weight": w.name,
            "nodes": [n.name for n in nodes],
            "op_type": nodes[0].op_type,
            "shape": [d if isinstance(d, int) else str(d) for d in w.shape] if w.shape is not None else None,
        }
        a = arrays.get(w)
        if a is not None:
            entry["sparsity_before"] = round(sparsity_of(a), 6)
            if run.kind == "nm" and axis is not None and a.shape[axis] % run.m == 0:
                entry["already_nm"] = satisfies_nm(a, run.n, run.m, axis)
        reason = reason or nm_reason.get(w)
        if reason is not None or w not in new:
            entry.update(pruned=False, reason=reason or "nothing to prune")
            run.count(f"skipped:{(reason or 'nothing').split('=')[0].split(' (')[0]}")
            layers.append(entry)
            continue
        b = new[w]
        changed = not np.array_equal(a, b)
        if changed:
            w.const_value = ir.tensor(b, name=w.name)
            modified = True
        entry.update(pruned=True, sparsity=round(sparsity_of(b), 6))
        if run.kind == "nm":
            entry["nm_axis"] = axis
        total_pruned += b.size
        zeros += int((b == 0).sum())
        run.count("pruned_weights")
        layers.append(entry)
    run.count("zeroed", zeros)
    run.details["layers"] = layers
    run.details["pruned_sparsity"] = round(zeros / total_pruned, 6) if total_pruned else 0.0
    return modified


def _pruned_arrays(
    run: PruneRun,
    targets: list[WeightTarget],
    arrays: dict[ir.Value, np.ndarray],
    scores: dict[ir.Value, np.ndarray],
) -> tuple[dict[ir.Value, np.ndarray], dict[ir.Value, str]]:
    """(new array per pruned weight, reason per weight N:M cannot prune)."""
    o = run.options
    new: dict[ir.Value, np.ndarray] = {}
    nm_reason: dict[ir.Value, str] = {}
    if run.kind == "nm":
        for w, _nodes, axis, _reason in targets:
            if w not in arrays:
                continue
            a = arrays[w]
            if axis is None or a.shape[axis] % run.m:
                nm_reason[w] = (
                    f"reduction dim {a.shape[axis] if axis is not None else '?'} not a multiple of {run.m}"
                )
                continue
            new[w] = nm_prune(a, run.n, run.m, axis, scores.get(w))
    elif o.scope == "global" and arrays:
        new = global_prune(arrays, scores, o.sparsity)
    else:
        out_axes = {
            w: out_axis(nodes[0].op_type, a.ndim, nodes[0].attributes.get_int("transB", 0))
            for w, nodes, _, _ in targets
            if (a := arrays.get(w)) is not None
        }
        for w, a in arrays.items():
            if w in scores:
                new[w] = np.where(per_output_mask(scores[w], out_axes[w], o.sparsity), 0, a).astype(a.dtype)
                continue
            k = int(np.floor(o.sparsity * a.size))
            new[w] = np.where(magnitude_mask(a, k), 0, a).astype(a.dtype)
    return new, nm_reason

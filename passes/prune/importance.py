"""Importance scores: which units (structured) or weights (unstructured, N:M) matter least.

Structured units score the L1 or L2 norm of their weights (producers' output slices and
consumers' input slices, each normalized by its mean; a BatchNorm after a producer scales its
norms), or, with calibration data, ``mean|activation|`` of the unit at each consumer's input
times the norm of the consumer's weights for that unit. Unstructured and N:M weights score
``|W| · ‖x_j‖₂`` with calibration data (Wanda); without it they are ranked by ``|W|``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.errors import PipelineError
from graphopt.passes.ir_helpers import constant_array

from .groups import Group
from .options import PruneRun

__all__ = ["WeightTarget", "activation_stats", "unit_scores", "weight_activation_scores"]

#: An unstructured / N:M target: (weight value, nodes using it, N:M axis, skip reason or None).
WeightTarget = tuple[ir.Value, list[ir.Node], int | None, str | None]


def unit_scores(run: PruneRun, model: ir.Model, groups: list[Group]) -> list[np.ndarray]:
    """One score per unit of each group (higher: more important)."""
    o = run.options
    scores: list[np.ndarray] = []
    acts: dict[ir.Value, np.ndarray] = {}
    if o.importance == "activation":
        acts = activation_stats(run, model, groups)
    for g in groups:
        total = np.zeros(g.units, dtype=np.float64)
        # A BatchNormalization right after a producer rescales its output channels: weigh the
        # producer's norms by |γ|/√(σ²+ε), the scale the next layer actually sees.
        bn_scale: dict[int, np.ndarray] = {}
        for s in g.slices:
            if s.node.op_type == "BatchNormalization" and s.index == 1:
                bn = s.node
                gamma, var = constant_array(bn.inputs[1]), constant_array(bn.inputs[4])
                src = bn.inputs[0].producer() if bn.inputs[0] is not None else None
                if gamma is not None and var is not None and src is not None:
                    eps = bn.attributes.get_float("epsilon", 1e-5)
                    bn_scale[id(src)] = np.abs(gamma.astype(np.float64)) / np.sqrt(
                        var.astype(np.float64) + eps
                    )
        for s in g.slices:
            if s.role not in ("out", "in"):
                continue
            w = constant_array(s.node.inputs[s.index]).astype(np.float64)  # type: ignore[union-attr]
            per = (
                np.moveaxis(w, s.axis, 0)
                .reshape(s.groups, g.units, -1)
                .transpose(1, 0, 2)
                .reshape(g.units, -1)
            )
            if o.importance == "l1":
                norm = np.abs(per).sum(axis=1)
            else:
                norm = np.sqrt((per * per).sum(axis=1))
            if s.role == "out" and id(s.node) in bn_scale:
                norm = norm * bn_scale[id(s.node)]
            if o.importance == "activation":
                if s.role != "in" or s.data not in acts:
                    continue
                norm = np.sqrt((per * per).sum(axis=1)) * acts[s.data]
            total += norm / (norm.mean() + 1e-12)
        scores.append(total)
    return scores


def activation_stats(run: PruneRun, model: ir.Model, groups: list[Group]) -> dict[ir.Value, np.ndarray]:
    """``mean|x|`` per unit of every consumer's input activation over the calibration data."""
    from graphopt.calibration import stream_tensors

    o = run.options
    data = run.calibration()
    wanted: dict[str, tuple[ir.Value, int, int, int]] = {}
    for g in groups:
        for s in g.slices:
            if s.role == "in" and s.data is not None and s.data.name:
                wanted[s.data.name] = (s.data, s.data_axis, s.block, g.units)
    names = sorted(wanted)
    sums: dict[str, np.ndarray] = {}
    count = 0
    for batch in stream_tensors(model, names, data, limit=o.calibration_batches, description="prune stats"):
        count += 1
        for name in names:
            v, axis, block, units = wanted[name]
            a = np.abs(np.asarray(batch[name], dtype=np.float64))
            moved = np.moveaxis(a, axis, 0).reshape(units * block, -1).mean(axis=1)
            per = moved.reshape(units, block).mean(axis=1)
            sums[name] = sums.get(name, 0) + per
    if not count:
        raise PipelineError("prune importance=activation: the calibration data has no batches")
    return {wanted[n][0]: sums[n] / count for n in names}


def weight_activation_scores(
    run: PruneRun, model: ir.Model, targets: list[WeightTarget], arrays: dict[ir.Value, np.ndarray]
) -> dict[ir.Value, np.ndarray]:
    """Wanda scores ``|W| · ‖x_j‖₂``: each weight times the L2 norm (over the calibration data) of
    the input feature it multiplies. Weights whose input layout is not understood keep |W|."""
    from graphopt.calibration import stream_tensors

    wanted: dict[str, int] = {}  # activation name -> feature axis
    uses: dict[ir.Value, list[tuple[str, int]]] = {}  # weight -> (activation, weight feature axis)
    for w, nodes, _axis, _reason in targets:
        if w not in arrays:
            continue
        entries = []
        for node in nodes:
            x = node.inputs[0]
            if x is None or not x.name or x.shape is None:
                entries = []
                break
            if node.op_type == "Conv":
                feat, waxis = 1, 1
            elif node.op_type == "Gemm" and not node.attributes.get_int("transA", 0):
                feat, waxis = x.shape.rank() - 1, (1 if node.attributes.get_int("transB", 0) else 0)
            elif node.op_type == "MatMul":
                feat, waxis = x.shape.rank() - 1, arrays[w].ndim - 2
            else:
                entries = []
                break
            wanted[x.name] = feat
            entries.append((x.name, waxis))
        if entries:
            uses[w] = entries
    if not uses:
        return {}
    names = sorted(wanted)
    sq: dict[str, np.ndarray] = {}
    for batch in stream_tensors(
        model, names, run.calibration(), limit=run.options.calibration_batches, description="prune stats"
    ):
        for name in names:
            a = np.asarray(batch[name], dtype=np.float64)
            moved = np.moveaxis(a, wanted[name], 0).reshape(a.shape[wanted[name]], -1)
            sq[name] = sq.get(name, 0) + (moved * moved).sum(axis=1)
    scores = {}
    for w, entries in uses.items():
        a = arrays[w]
        waxis = entries[0][1]
        norm = np.sqrt(sum(sq[name] for name, _ in entries if name in sq))
        if np.ndim(norm) == 0 or norm.shape[0] != a.shape[waxis]:
            continue
        shape = [1] * a.ndim
        shape[waxis] = a.shape[waxis]
        scores[w] = np.abs(a).astype(np.float64) * norm.reshape(shape)
    return scores

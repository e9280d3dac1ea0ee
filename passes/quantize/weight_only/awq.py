"""AWQ (Lin et al. 2023) for ``quantize-weight-only``: activation-aware per-channel scaling.

Each input channel is scaled by ``s = mean|x|^alpha`` in the weights before they are quantized,
and ``x / s`` is folded exactly into whatever makes the activation: a norm's scale/bias, or a
decomposed RMSNorm's Mul by a constant, through Reshapes that keep K last (elsewhere it does
nothing, so it never costs a node). Alpha is searched per layer on kept calibration rows by the
layer-output error; alpha=0 is plain RTN, so it never does worse there."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from ...ir_helpers import constant_array
from .._common.fold import channel_chain, channel_params, divided_by, fold_into, last_dim
from .._common.norms import norm_of
from .blocks import dequantize, quantize_rtn
from .options import WeightOnlyOptions
from .sites import FLOAT_DTYPES, Site

__all__ = ["awq", "awq_fold"]


def awq(
    model: ir.Model,
    sites: list[Site],
    by_key: dict[tuple[int, bool], list[Site]],
    data: Any,
    taken: set[str],
    o: WeightOnlyOptions,
    details: dict[str, Any],
    frozen: set[tuple[int, bool]] | None = None,
) -> None:
    """Scale the weights of every group of sites sharing an input whose division folds (see
    :func:`awq_fold`), with the alpha that cuts the group's output error on the kept calibration
    rows by at least ``awq_min_gain``. A group with a weight of ``frozen`` (a table an embedding
    Gather reads too) is left unscaled."""
    from graphopt.calibration import stream_tensors

    groups: dict[int, list[Site]] = {}
    for site in sites:
        groups.setdefault(id(site.node.inputs[0]), []).append(site)
    folds: list[tuple[ir.Node, list[int], list[Site]]] = []
    skipped: dict[str, int] = {}
    for group in groups.values():
        if frozen and any(site.key in frozen for site in group):
            fold, reason = None, "weight tied to an embedding"
        else:
            fold, reason = awq_fold(group, by_key)
        if fold is None:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            folds.append((*fold, group))
    details["awq_skipped"] = skipped
    if not folds:
        details["awq_folded"] = 0
        return
    names = [g[0].node.inputs[0].name for *_, g in folds]
    sums: dict[str, Any] = {n: None for n in names}
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    kept = dict.fromkeys(names, 0)
    for values in stream_tensors(model, names, data, limit=o.calibration_batches, description="awq"):
        for n in names:
            x = np.asarray(values[n], np.float32)
            x = x.reshape(-1, x.shape[-1])
            a = np.abs(x).astype(np.float64).sum(axis=0)
            sums[n] = a if sums[n] is None else sums[n] + a
            if kept[n] < o.awq_tokens:
                rows[n].append(x[: o.awq_tokens - kept[n]])
                kept[n] += rows[n][-1].shape[0]
    alphas = []
    for (node, indices, group), n in zip(folds, names):
        mean = np.maximum(sums[n] / max(kept[n], 1), 1e-8)
        x = np.concatenate(rows[n]).astype(np.float32)
        keys = list(dict.fromkeys(site.key for site in group))
        alpha, scale = _search(x, mean, [by_key[key][0] for key in keys], o)
        alphas.append(round(alpha, 3))
        if alpha == 0.0:
            continue
        for key in keys:
            for site in by_key[key]:
                site.w = (site.w.astype(np.float32) * scale[None, :]).astype(site.w.dtype)
        fold_into(
            model.graph, node, indices, divided_by(scale), lambda v, _i: f"{v.name or 'norm'}_awq", taken
        )
    details["awq_folded"] = sum(a > 0 for a in alphas)
    details["awq_alphas"] = alphas


def _search(
    x: np.ndarray, mean: np.ndarray, weights: list[Site], o: WeightOnlyOptions
) -> tuple[float, np.ndarray]:
    """The exponent (of ``awq_grid`` in [0, 1]) and channel scale with the least output error
    ``|x·(W − dequantized(W·s)/s)|²`` over ``weights`` (one site per distinct weight); alpha 0
    unless the best one gains at least ``awq_min_gain``."""
    grid = np.linspace(0.0, 1.0, max(o.awq_grid, 2))
    best, best_loss, plain = None, np.inf, None
    for alpha in grid:
        scale = mean**alpha
        scale = (scale / np.sqrt(scale.max() * scale.min())).astype(np.float32)
        loss = 0.0
        for first in weights:
            w = first.w.astype(np.float32)
            qw = quantize_rtn(
                w * scale[None, :],
                o.bits,
                o.block_size,
                o.symmetric,
                FLOAT_DTYPES[first.dtype],
                o.scale_search,
            )
            d = (dequantize(qw) / scale[None, :] - w).T
            loss += float(np.sum(np.square(x @ d)))
        if plain is None:
            plain = (float(alpha), scale, loss)  # alpha = 0: no scaling
        if loss < best_loss:
            best, best_loss = (float(alpha), scale), loss
    alpha, scale = best  # type: ignore[misc]
    if best_loss > (1.0 - o.awq_min_gain) * plain[2]:  # type: ignore[index]
        # A gain this small on the kept rows is within what the choice itself overfits.
        alpha, scale = plain[0], plain[1]  # type: ignore[index]
    return alpha, scale


def awq_fold(
    group: list[Site], by_key: dict[tuple[int, bool], list[Site]]
) -> tuple[tuple[ir.Node, list[int]] | None, str]:
    """Where ``x / s`` folds exactly for sites sharing input ``x``: the node making ``x`` (through
    Reshapes that keep the last axis K) and the inputs of it to divide by ``s`` along the last axis —
    a norm's scale (and bias), or a Mul's constant per-channel operand (a decomposed RMSNorm) — or
    None with the reason."""
    x = group[0].node.inputs[0]
    k = group[0].w.shape[1]
    nodes = {id(s.node) for s in group}
    if x.is_graph_output() or any(id(u.node) not in nodes for u in x.uses()):
        return None, "input has other consumers"
    # Per-channel scaling commutes with a Reshape only when K stays the last axis.
    chain = channel_chain(x, channels=k)
    if any(v.is_graph_output() or len(v.uses()) != 1 for v in chain[1:]):
        return None, "input has other consumers"
    x = chain[-1]
    node = x.producer()
    if node is None:
        return None, "input not from a norm or a Mul by a constant"
    norm = norm_of(node)
    if norm is not None:
        if node.outputs[0] is not x:
            return None, "input not the norm's output"
        axis = node.attributes.get_int("axis", -1)
        if axis != -1 and (x.shape is None or axis != x.shape.rank() - 1):
            return None, "norm not over the last axis"
        if len(node.inputs) <= norm.scale or node.inputs[norm.scale] is None:
            return None, "norm has no scale"
        indices = channel_params(node)
    elif node.domain == "" and node.op_type == "Mul" and last_dim(x) == k:
        indices = channel_params(node)
        if indices is None:
            return None, "Mul has no single constant operand"
    else:
        return None, "input not from a norm or a Mul by a constant"
    assert indices is not None
    for i in indices:
        arr = constant_array(node.inputs[i])
        if arr is None or arr.size != k or arr.shape[-1] != k:
            return None, "scale/bias not a constant per-channel [K]"
    for site in group:
        if any(id(u.node) not in nodes for u in site.node.inputs[1].uses()):
            return None, "weight shared outside the group"
        if any(id(s.node) not in nodes for s in by_key[site.key]):
            return None, "weight shared outside the group"
    return (node, indices), ""

"""Probe-driven transforms that shrink the activation error, each decided on the float graph
(``decide_*``, from the probe's statistics) and applied before the lowering (``apply_*``):

* smoothing (SmoothQuant): inputs made by a normalization are divided per channel by
  ``s = max|x|^a / max|w|^(1-a)`` and ``s`` goes into the weights; folded into the norm's scale
  and shift when the norm feeds only these nodes (pre-LN), else one Mul.
* centering (Outlier Suppression+-style): per-token inputs made by a norm (with
  ``asymmetric=false``) or an attention op are shifted per channel to the middle of their probed
  range, so symmetric levels fit them; the shift returns exactly through the bias, and is folded
  into the norm's shift or the attention's V bias (attention rows are convex combinations of V
  rows), else one Add.
* outlier channels (LLM.int8()-style): for other inputs (GELU/ReLU outputs), the few channels far
  above the median channel are masked out of the int8 kernel and multiplied in float.
* channel copies (outlier channel splitting, with calibration data): a norm output's massive
  channel is divided by c and appended c−1 more times, its weight row repeated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from ...ir_helpers import constant_array
from .._common.fold import RESHAPE_OPS, channel_chain, fold_into
from .._common.norms import NORM_OPS, norm_of
from .emit_per_token import lower_bound

if TYPE_CHECKING:
    from .plan import Plan
    from .run import Run

__all__ = [
    "apply_center",
    "apply_smooth",
    "apply_split",
    "decide_copies",
    "decide_levels",
    "decide_smooth",
    "decide_split",
    "groups",
    "source",
]

#: Channel splitting: a channel is split when its maximum exceeds _COPY_RATIO x the _COPY_RANK-th largest.
_COPY_RANK, _COPY_RATIO = 8, 1.5


def source(value: ir.Value) -> ir.Node | None:
    """The node that made ``value``'s channels, looking through reshapes that keep the last axis
    (GPT-2's Conv1D flattens the LayerNorm output to 2-D before its MatMul)."""
    return channel_chain(value, ops=RESHAPE_OPS, max_steps=4)[-1].producer()


def groups(
    graph: ir.Graph, plans: list[Plan], op_types: tuple[str, ...] | None = None
) -> list[tuple[ir.Value, list[Plan], ir.Node]]:
    """Plans grouped by their input, with the group's first node in graph order."""
    by_input: dict[str, list[Plan]] = {}
    for plan in plans:
        if op_types is None or plan.node.op_type in op_types:
            by_input.setdefault(plan.node.inputs[0].name, []).append(plan)
    order = {id(n): i for i, n in enumerate(graph)}
    return [(g[0].node.inputs[0], g, min(g, key=lambda p: order[id(p.node)]).node) for g in by_input.values()]


def _is_norm_output(x: ir.Value) -> bool:
    producer = source(x)
    return producer is not None and producer.op_type in NORM_OPS


def _fold_into_norm(
    run: Run, x: ir.Value, group: list[Plan], inv: np.ndarray | None, shift: np.ndarray | None = None
) -> bool:
    """Fold the per-channel ``1 / s`` (``inv``) into the norm's scale and shift, or ``shift`` into
    its shift, when the norm's output reaches only the group's nodes (pre-LN models: GPT-2, Llama),
    so the transform costs nothing at run time. Post-LN models (BERT) also feed the norm output to
    the residual: False, and the caller adds a node."""
    chain = channel_chain(x, ops=RESHAPE_OPS, max_steps=4)
    norm = chain[-1].producer()
    spec = norm_of(norm)
    if norm is None or spec is None:
        return False
    if x.is_graph_output() or {id(u.node) for u in x.uses()} != {id(p.node) for p in group}:
        return False
    if any(v.is_graph_output() or len(v.uses()) != 1 for v in chain[1:]):
        return False
    if norm.outputs.index(chain[-1]) != 0:
        return False
    size = (inv if inv is not None else shift).shape  # type: ignore[union-attr]
    params = []
    for i in (
        [spec.shift] if shift is not None else [spec.scale, spec.shift]
    ):  # a shift changes the shift only
        if i is None or i >= len(norm.inputs) or norm.inputs[i] is None:
            if shift is not None:
                return False  # no shift parameter to fold into (RMSNorm)
            continue
        arr = constant_array(norm.inputs[i])
        if arr is None or arr.shape != size:
            return False
        params.append(i)
    if not params:
        return False

    def new_value(arr: np.ndarray) -> np.ndarray:
        value = arr.astype(np.float64) * inv if inv is not None else arr.astype(np.float64) + shift
        return value.astype(arr.dtype)

    fold_into(
        run.graph,
        norm,
        params,
        new_value,
        lambda _old, i: f"{norm.name or 'norm'}_smoothed_param{i}",
        run.taken,
    )
    return True


# ---------------------------------------------------------------------------------------------
# Smoothing


def decide_smooth(run: Run) -> None:
    """SmoothQuant: move activation outliers into the weights, per input channel.

    ``X W = (X / s)(s W)`` with ``s = max|x|^a / max|w|^(1-a)``. This decides ``plan.smooth``;
    :func:`apply_smooth` divides the input (folded into the norm, or one Mul shared by the
    consumers of X) and scales the weights, before they are quantized per output channel.
    """
    assert run.stats is not None
    alpha = run.options.smooth
    for x, group, _first in groups(run.graph, run.plans):
        if not _is_norm_output(x):
            # Only normalization outputs have a per-channel profile that generated inputs
            # reproduce (it comes from the norm's scale and the residual stream's outlier
            # channels). Elsewhere (GELU, attention outputs) per-channel maxima come from a few
            # tokens, and smoothing by them made MiniLM worse even with real calibration data.
            continue
        act = run.stats.get(x.name)
        k = group[0].weight.shape[0]
        if act is None or act.shape != (k,) or any(p.weight.shape[0] != k for p in group):
            run.count("smooth:skipped")
            continue
        wmax = np.max(np.stack([np.abs(p.weight).max(axis=1) for p in group]), axis=0).astype(np.float64)
        act = act.astype(np.float64)
        ok = (act > 0) & (wmax > 0)
        scale = np.ones(k)
        scale[ok] = act[ok] ** alpha / wmax[ok] ** (1 - alpha)
        scale = np.clip(scale, 1e-5, 1e5)
        for plan in group:
            plan.smooth = scale


def apply_smooth(run: Run) -> None:
    graph = run.graph
    for x, group, first in groups(graph, [p for p in run.plans if p.smooth is not None]):
        name, s = x.name, group[0].smooth
        assert s is not None
        # Split channels (see decide_copies) are divided by their count too; their weight
        # rows are not scaled by it: the c copies add up to the whole product.
        divisor = s * group[0].copy_counts if group[0].copy_counts is not None else s
        if _fold_into_norm(run, x, group, 1.0 / divisor):
            run.count("smooth:folded")
        else:
            inv = run.init(f"{first.name or 'smooth'}_smooth_scale", (1.0 / divisor).astype(np.float32))
            mul = ir.Node("", "Mul", [x, inv], num_outputs=1, name=run.name(f"{name}_smooth"))
            y = mul.outputs[0]
            y.name, y.shape, y.type = run.name(f"{name}_smoothed"), x.shape, x.type
            graph.insert_before(first, mul)
            for plan in group:
                plan.node.replace_input_with(0, y)
        for plan in group:
            plan.weight = (plan.weight.astype(np.float64) * s[:, None]).astype(np.float32)
        run.count("smooth")
        run.details.setdefault("smoothed_inputs", []).append(name)


# ---------------------------------------------------------------------------------------------
# Outlier channels


def decide_split(run: Run) -> None:
    """Outlier channels of inputs that are not normalization outputs (GELU/ReLU outputs feeding
    an FFN's second projection): a few neurons reach far above the typical channel maximum and
    set the activation scale. They are masked to zero before the int8 kernel and multiplied in
    float on their own (LLM.int8()-style decomposition, channels from the probe). This decides
    (``plan.outliers``); :func:`apply_split` edits the graph."""
    assert run.stats is not None
    o = run.options
    for x, group, _first in groups(run.graph, run.plans, ("MatMul", "Gemm")):
        if _is_norm_output(x) and o.smooth > 0:
            continue  # smoothed instead
        act = run.stats.get(x.name)
        k = group[0].weight.shape[0]
        if act is None or act.shape != (k,) or any(p.weight.shape[0] != k for p in group):
            continue
        typical = float(np.median(act))
        if typical <= 0:
            continue
        idx = np.nonzero(act > o.outlier_channels * typical)[0]
        if idx.size == 0:
            continue
        idx = idx[np.argsort(-act[idx], kind="stable")][: o.max_outlier_channels]
        idx = np.sort(idx).astype(np.int64)
        for plan in group:
            plan.outliers = idx


def apply_split(run: Run) -> None:
    graph = run.graph
    for x, group, first in groups(graph, [p for p in run.plans if p.outliers is not None]):
        name, idx = x.name, group[0].outliers
        assert idx is not None
        k = group[0].weight.shape[0]
        base = first.name or "split"
        mask = np.ones(k, np.float32)
        mask[idx] = 0.0
        mul = ir.Node(
            "",
            "Mul",
            [x, run.init(base + "_inlier_mask", mask)],
            num_outputs=1,
            name=run.name(base + "_inliers"),
        )
        y = mul.outputs[0]
        y.name, y.shape, y.type = run.name(f"{name}_inliers"), x.shape, x.type
        gather = ir.Node(
            "",
            "Gather",
            [x, run.init(base + "_outlier_index", idx)],
            attributes=[ir.AttrInt64("axis", -1)],
            num_outputs=1,
            name=run.name(base + "_outlier_gather"),
        )
        g = gather.outputs[0]
        g.name, g.type = run.name(f"{name}_outliers"), x.type
        graph.insert_before(first, mul)
        graph.insert_before(first, gather)
        for plan in group:
            plan.node.replace_input_with(0, y)
            plan.side = (g, idx)
        run.details.setdefault("outlier_channels", {})[name] = [int(i) for i in idx]


# ---------------------------------------------------------------------------------------------
# Levels and centering


def decide_levels(run: Run) -> None:
    """How two-sided per-token inputs get their levels.

    Attention outputs: symmetric levels after per-channel centering (Outlier Suppression+-
    style shifting) through the V bias (each output row is a convex combination of V rows), which
    costs nothing at run time. Other inputs, norm outputs above all (their shift β and the
    residual stream's outlier channels put a channel's values mostly on one side, and massive
    tokens make rows lopsided): asymmetric levels from each row's own range (``asymmetric``),
    else symmetric levels after centering folded into the norm's shift or one Add. Either way
    ``x·W = (x − δ)·W + δ·W`` and ``δ·W`` (W as the kernel sees it) goes into the bias."""
    o = run.options
    by_node = {id(p.node): p for p in run.plans}
    for x, group, _first in groups(run.graph, run.plans, ("MatMul", "Gemm", "Attention")):
        if any(not p.per_token or p.outliers is not None for p in group):
            continue
        for p in group:
            p.asymmetric = o.asymmetric
        r = run.ranges.get(x.name)
        k = group[0].weight.shape[0]
        producer = source(x)
        if (
            not o.center
            or producer is None
            or r is None
            or r[0].shape != (k,)
            or any(p.weight.shape[0] != k for p in group)
        ):
            continue
        delta = (r[0] + r[1]) / 2.0
        if producer.op_type == "Attention" and id(producer) in by_node and x.producer() is producer:
            if x.is_graph_output() or {id(u.node) for u in x.uses()} != {id(p.node) for p in group}:
                continue
            if producer.outputs.index(x) != 0:
                continue
            by_node[id(producer)].v_shift = delta
            for p in group:
                p.center, p.asymmetric = delta, False
        elif producer.op_type in NORM_OPS and not o.asymmetric:
            for p in group:
                p.center = delta / (p.smooth if p.smooth is not None else 1.0)
                p.center_in_graph = True
        else:
            continue
        run.count("center")


def apply_center(run: Run) -> None:
    """Subtract the centers of norm-fed inputs in the graph: folded into the norm's shift when
    the norm feeds only these nodes, else one Add shared by them."""
    graph = run.graph
    for x, group, first in groups(graph, [p for p in run.plans if p.center_in_graph]):
        c = group[0].center
        assert c is not None
        if _is_norm_output(x) and _fold_into_norm(run, x, group, None, shift=-c):
            run.count("center:folded")
            continue
        add = ir.Node(
            "",
            "Add",
            [x, run.init(f"{first.name or 'center'}_center", (-c).astype(np.float32))],
            num_outputs=1,
            name=run.name(f"{x.name}_center"),
        )
        y = add.outputs[0]
        y.name, y.shape, y.type = run.name(f"{x.name}_centered"), x.shape, x.type
        graph.insert_before(first, add)
        for plan in group:
            plan.node.replace_input_with(0, y)


# ---------------------------------------------------------------------------------------------
# Channel copies


def decide_copies(run: Run) -> None:
    """Outlier channel splitting for asymmetric per-token inputs (norm outputs): the residual
    stream's massive channel (a few times the next one after smoothing, at [CLS]/[SEP]-like
    tokens) sets those tokens' row range, so every other channel of those rows gets coarse
    levels. Divided by c and present c times (weight row repeated), it contributes the same
    product and the row range shrinks; the copies cost c−1 columns of K and no pass over the
    output. Decides ``plan.copies``; the smoothing divides."""
    assert run.stats is not None
    o = run.options
    if o.channel_copies <= 0 or not o.symmetric or run.opset < 18:
        return
    for x, group, _first in groups(run.graph, run.plans, ("MatMul", "Gemm", "Attention")):
        if (
            any(
                not p.per_token
                or not p.asymmetric
                or p.outliers is not None
                or p.smooth is None
                or p.center is not None
                for p in group
            )
            or lower_bound(x) is not None
        ):
            continue
        act = run.stats.get(x.name)
        k = group[0].weight.shape[0]
        if act is None or act.shape != (k,) or k < 16:
            continue
        act = act / group[0].smooth
        target = float(np.sort(act)[-_COPY_RANK])
        if target <= 0:
            continue
        counts = np.ones(k, np.int64)
        budget = o.channel_copies
        for j in np.argsort(-act, kind="stable"):
            if act[j] <= _COPY_RATIO * target or budget <= 0:
                break
            c = min(int(np.ceil(act[j] / target)), budget + 1)
            counts[j] = c
            budget -= c - 1
        if budget == o.channel_copies:
            continue
        copies = np.repeat(np.arange(k), counts - 1).astype(np.int64)
        for p in group:
            p.copies, p.copy_counts = copies, counts
        run.count("channel_copies", int(copies.size))

"""Structured pruning's rewrite: cut a unit group down to the units it keeps.

Every sliced weight, bias and per-channel parameter becomes a new initializer (the old one may
be shared with another node; dead-code removal drops it afterwards), shape literals holding the
unit count are rewritten (a Concat of shape pieces is cloned, as its original may serve other
layers), and the tracked values' shapes shrink with them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.ir_helpers import constant_array, new_initializer, unique_name

from .groups import Group, shape_pieces

__all__ = ["apply_keep", "fix_shape", "set_input_const"]


def set_input_const(
    graph: ir.Graph, taken: set[str], node: ir.Node, index: int, array: np.ndarray, suffix: str
) -> ir.Value:
    """Give ``node`` input ``index`` a new initializer (the old one may be shared; DCE drops it)."""
    old = node.inputs[index]
    base = (old.name if old is not None and old.name else f"{node.name or node.op_type}_{index}") + suffix
    value = new_initializer(graph, base, array, taken)
    node.replace_input_with(index, value)
    return value


def apply_keep(graph: ir.Graph, taken: set[str], g: Group, keep: np.ndarray) -> bool:
    """Keep only units ``keep`` (sorted indices) of group ``g``; True when some values lost their
    shape and shape inference must run again."""
    need_inference = False
    for s in g.slices:
        arr = constant_array(s.node.inputs[s.index])
        idx = (
            np.arange(s.groups)[:, None, None] * g.units * s.block
            + keep[None, :, None] * s.block
            + np.arange(s.block)[None, None, :]
        ).ravel()
        set_input_const(graph, taken, s.node, s.index, np.take(arr, idx, axis=s.axis), "_pruned")
    for node, index, fix in g.shape_fixes:
        fix_shape(graph, taken, node, index, fix, g.units, int(keep.size))
    for v, (axis, block) in g.values.items():
        if v.shape is not None and not v.is_graph_output():
            dims = list(v.shape.dims)
            dims[axis] = int(keep.size) * block
            v.shape = ir.Shape(dims)
    for v in g.clear:
        v.shape = None
        need_inference = True
    return need_inference


def fix_shape(
    graph: ir.Graph, taken: set[str], node: ir.Node, index: int, fix: tuple[str, int], units: int, kept: int
) -> None:
    """Rewrite the unit count held literally in a shape tensor (a constant, or a constant piece
    of a Concat, which is cloned: the original may serve other layers)."""
    kind, arg = fix
    value = node.inputs[index]
    pieces = shape_pieces(value) if value is not None else None
    if pieces is None:
        return
    flat: list[int | None] = []
    for n, arr in pieces:
        flat.extend([None] * n if arr is None else [int(a) for a in arr])
    changes: dict[int, int] = {}
    if kind in ("last", "merge") and flat and flat[-1] == units * arg:
        changes[len(flat) - 1] = kept * arg
    elif kind == "heads" and len(flat) > 2 and flat[2] == units:
        changes[2] = kept
    elif kind == "literal_heads":
        changes = {i: kept for i, v in enumerate(flat) if v == units}
    elif kind == "split":
        changes = {i: kept * arg for i, v in enumerate(flat) if v == units * arg}
    if not changes:
        return  # -1 / 0 / run-time values adapt by themselves
    c = constant_array(value)
    if c is not None:
        arr = c.astype(np.int64).ravel().copy()
        for i, v in changes.items():
            arr[i] = v
        set_input_const(graph, taken, node, index, arr.reshape(c.shape).astype(c.dtype), "_pruned")
        return
    concat = value.producer()
    clone = ir.node(
        "Concat",
        list(concat.inputs),
        attributes={"axis": 0},
        name=unique_name(graph, (concat.name or "Concat") + "_pruned", taken),
    )
    graph.insert_after(concat, clone)
    clone.outputs[0].name = unique_name(graph, (value.name or "shape") + "_pruned", taken)
    clone.outputs[0].dtype = value.dtype
    clone.outputs[0].shape = value.shape
    start = 0
    for k, (n, arr) in enumerate(pieces):
        local = {i - start: v for i, v in changes.items() if start <= i < start + n}
        if local and arr is not None:
            new_piece = arr.copy()
            for i, v in local.items():
                new_piece[i] = v
            dtype = constant_array(concat.inputs[k]).dtype  # type: ignore[union-attr]
            set_input_const(
                graph,
                taken,
                clone,
                k,
                new_piece.reshape(constant_array(concat.inputs[k]).shape).astype(dtype),
                "_pruned",
            )  # type: ignore[union-attr]
        start += n
    node.replace_input_with(index, clone.outputs[0])

"""How a unit axis passes through the ops between a producer layer and its consumers.

Each function takes the walk building a group (:class:`~.closure.Closure`, seen through
:class:`UnitWalk` so that this module does not import it), the node, and the unit axis (negative,
from the end) and block (elements per unit on that axis) of the tracked value; it pushes the
values the units reach, records the constant slices that must shrink with them (biases,
BatchNorm parameters, shape literals), or blocks the group with the reason.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import onnx_ir as ir

from graphopt.passes.ir_helpers import constant_array

from .groups import Group, Slice, dim, element, rank, shape_pieces

__all__ = ["UnitWalk", "binary", "flatten", "normalization", "pool", "reduction", "transpose", "unary"]


class UnitWalk(Protocol):
    """What the op handlers use of the walk building a group."""

    group: Group

    def block(self, reason: str) -> None: ...

    def push(self, v: ir.Value, axis: int, block: int) -> None: ...


def unary(closure: UnitWalk, node: ir.Node, axis: int, block: int) -> None:
    if node.op_type == "Clip":
        for extra in node.inputs[1:]:
            if extra is not None and (constant_array(extra) is None or constant_array(extra).size != 1):  # type: ignore[union-attr]
                closure.block(f"Clip {node.name} bounds are not constant scalars")
                return
    if node.op_type == "Dropout" and len(node.outputs) > 1 and node.outputs[1].uses():
        closure.block(f"Dropout {node.name} mask is used")
        return
    if node.inputs[0] is None:
        closure.block(f"{node.op_type} {node.name} has no input")
        return
    closure.push(node.inputs[0], axis, block)
    closure.push(node.outputs[0], axis, block)


def binary(closure: UnitWalk, node: ir.Node, axis: int, block: int) -> None:
    full = closure.group.units * block
    for i, x in enumerate(node.inputs):
        if x is None:
            continue
        c = constant_array(x)
        if c is not None:
            if axis + c.ndim < 0 or c.shape[axis] == 1:
                continue
            if c.shape[axis] == full:
                closure.group.slices.append(Slice(node, i, axis, block, "param"))
                continue
            closure.block(
                f"constant {x.name} {c.shape} of {node.op_type} {node.name} does not match the units"
            )
            return
        d = dim(x, axis)
        if d == 1:
            continue
        if d is None:
            closure.block(f"shape of {x.name} unknown")
            return
        closure.push(x, axis, block)
    closure.push(node.outputs[0], axis, block)


def normalization(closure: UnitWalk, node: ir.Node, axis: int, block: int) -> None:
    x = node.inputs[0]
    r = rank(x) if x is not None else None
    if r is None or axis != 1 - r or block != 1:
        closure.block(f"{node.op_type} {node.name} does not normalize the unit axis per channel")
        return
    if node.op_type == "BatchNormalization":
        if node.attributes.get_int("training_mode", 0) or any(o.uses() for o in node.outputs[1:]):
            closure.block(f"BatchNormalization {node.name} is in training mode")
            return
        params = node.inputs[1:5]
    else:
        params = node.inputs[1:3]
    for i, p in enumerate(params, start=1):
        c = constant_array(p)
        if c is None or c.shape != (closure.group.units,):
            closure.block(f"{node.op_type} {node.name} parameters are not constant per channel")
            return
        closure.group.slices.append(Slice(node, i, 0, 1, "param"))
    closure.push(x, axis, block)  # type: ignore[arg-type]
    closure.push(node.outputs[0], axis, block)


def pool(closure: UnitWalk, node: ir.Node, axis: int, block: int) -> None:
    x = node.inputs[0]
    r = rank(x) if x is not None else None
    if r is None or axis != 1 - r or (len(node.outputs) > 1 and node.outputs[1].uses()):
        closure.block(f"{node.op_type} {node.name}: units not on the channel axis or indices used")
        return
    closure.push(x, axis, block)  # type: ignore[arg-type]
    closure.push(node.outputs[0], axis, block)


def reduction(closure: UnitWalk, node: ir.Node, axis: int, block: int) -> None:
    x = node.inputs[0]
    r = rank(x) if x is not None else None
    if r is None:
        closure.block(f"rank of {node.op_type} {node.name} input unknown")
        return
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes_arr = constant_array(node.inputs[1])
        if axes_arr is None:
            closure.block(f"{node.op_type} {node.name} axes not constant")
            return
        axes = [int(a) for a in axes_arr.ravel()]
    else:
        attr = node.attributes.get("axes")
        axes = list(attr.as_ints()) if attr is not None else []
    if not axes:
        closure.block(f"{node.op_type} {node.name} reduces every axis")
        return
    axes = sorted({a % r for a in axes})
    p = axis + r
    if p in axes:
        closure.block(f"{node.op_type} {node.name} reduces over the units")
        return
    keep = node.attributes.get_int("keepdims", 1)
    out_r = r if keep else r - len(axes)
    out_p = p if keep else p - sum(1 for a in axes if a < p)
    closure.push(node.outputs[0], out_p - out_r, block)


def transpose(closure: UnitWalk, node: ir.Node, v: ir.Value, axis: int, block: int) -> None:
    x, y = node.inputs[0], node.outputs[0]
    r = rank(x) if x is not None else None
    attr = node.attributes.get("perm")
    if r is None:
        closure.block(f"rank of Transpose {node.name} unknown")
        return
    perm = list(attr.as_ints()) if attr is not None else list(range(r))[::-1]
    if v is x:
        closure.push(y, perm.index(axis + r) - r, block)
    else:
        closure.push(x, perm[axis + r] - r, block)  # type: ignore[arg-type]


def _reshape_keep_last(closure: UnitWalk, node: ir.Node, x: ir.Value, y: ir.Value, block: int) -> None:
    """A Reshape that keeps the unit axis last and whole (``[B*S, C]`` ⇄ ``[B, S, C]``): rows
    map to rows, so only a literal ``C`` in the shape tensor changes."""
    full = closure.group.units * block
    if y.shape.rank() < 1 or y.shape[-1] != full:
        closure.block(f"Reshape {node.name} does not keep the units whole on the last axis")
        return
    pieces = shape_pieces(node.inputs[1]) if node.inputs[1] is not None else None
    if pieces is None:
        closure.block(f"Reshape {node.name} shape is computed in a way not understood")
        return
    total = sum(n for n, _ in pieces)
    _, _, last = element(pieces, total - 1)
    consts = [int(a) for _, arr in pieces if arr is not None for a in arr]
    if last == full:
        closure.group.shape_fixes.append((node, 1, ("last", block)))
    elif last == -1 and consts.count(-1) == 1:
        pass
    elif last == 0 and not node.attributes.get_int("allowzero", 0) and total == x.shape.rank():
        pass
    else:
        closure.block(f"Reshape {node.name} last shape element {last} not understood")
        return
    closure.push(y, -1, block)


def flatten(closure: UnitWalk, node: ir.Node, axis: int, block: int) -> None:
    """Flatten / Reshape that merges the unit axis with the static axes after it into the last axis."""
    x, y = node.inputs[0], node.outputs[0]
    if x is None or x.shape is None or y.shape is None:
        closure.block(f"{node.op_type} {node.name} shapes unknown")
        return
    r = x.shape.rank()
    p = axis + r
    if p == r - 1 and node.op_type == "Reshape":
        _reshape_keep_last(closure, node, x, y, block)
        return
    tail = [x.shape[i] for i in range(p + 1, r)]
    if not all(isinstance(t, int) for t in tail):
        closure.block(f"{node.op_type} {node.name}: axes after the units are not static")
        return
    inner = int(np.prod(tail)) if tail else 1
    new_block = block * inner
    full = closure.group.units * new_block
    if y.shape.rank() != p + 1 or y.shape[-1] != full:
        closure.block(f"{node.op_type} {node.name} does not flatten the units into the last axis")
        return
    if node.op_type == "Flatten":
        if node.attributes.get_int("axis", 1) != p:
            closure.block(f"Flatten {node.name} axis is not the unit axis")
            return
    else:
        shape = constant_array(node.inputs[1])
        if shape is None or shape.ndim != 1 or shape.size != p + 1:
            closure.block(f"Reshape {node.name} shape is not a constant of rank {p + 1}")
            return
        head = [int(s) for s in shape[:-1]]
        last = int(shape[-1])
        if last == full and -1 in head:
            closure.group.shape_fixes.append((node, 1, ("last", new_block)))
        elif last == -1 and all(h >= 0 for h in head):
            pass
        else:
            closure.block(f"Reshape {node.name} shape {shape.tolist()} not understood")
            return
    closure.push(y, -1, new_block)

"""Structured pruning's unit groups, and the graph reads that finding and rewriting them share.

A :class:`Group` is every constant slice (weights, biases, per-channel parameters) and shape
literal that depends on one set of units: removing unit ``u`` removes its slice from all of
them at once. The closure (channels / FFN neurons) and the head matcher build groups; the
rewrite applies them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.passes.ir_helpers import constant_array

from .options import FLOAT_TYPES

__all__ = [
    "BINARY",
    "LAYERS",
    "POOL",
    "REDUCE",
    "UNARY",
    "Group",
    "Slice",
    "dim",
    "element",
    "producer_axes",
    "rank",
    "shape_pieces",
    "single_consumer",
]

UNARY = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "Tanh",
        "Gelu",
        "Erf",
        "Elu",
        "Selu",
        "Celu",
        "HardSigmoid",
        "HardSwish",
        "Softplus",
        "Softsign",
        "Abs",
        "Neg",
        "Exp",
        "Log",
        "Sqrt",
        "Reciprocal",
        "Sin",
        "Cos",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        "Identity",
        "Cast",
        "IsNaN",
        "IsInf",
        "Not",
        "Mish",
        "ThresholdedRelu",
        "Swish",
    }
)
BINARY = frozenset(
    {
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Max",
        "Min",
        "Where",
        "PRelu",
        "And",
        "Or",
        "Equal",
        "Less",
        "Greater",
        "LessOrEqual",
        "GreaterOrEqual",
        "Mod",
    }
)
LAYERS = frozenset({"Conv", "MatMul", "Gemm"})
POOL = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
REDUCE = frozenset(
    {
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "ReduceL1",
        "ReduceL2",
        "ReduceProd",
        "ReduceSumSquare",
        "ReduceLogSum",
        "ReduceLogSumExp",
    }
)


@dataclasses.dataclass
class Slice:
    """A constant node input cut along ``axis``; unit ``u`` owns elements [u*block, (u+1)*block)."""

    node: ir.Node
    index: int
    axis: int
    block: int
    role: str  # "out" (producer weight), "in" (consumer weight), "param" (bias, BN, ...), "shape"
    data: ir.Value | None = None  # consumers: the activation feeding the weight
    data_axis: int = -1
    weight_name: str = ""
    #: Sections along the axis, each holding every unit (a fused QKV weight: 3 sections).
    groups: int = 1

    def __post_init__(self) -> None:
        if not self.weight_name:
            v = self.node.inputs[self.index]
            self.weight_name = (v.name or "") if v is not None else ""


@dataclasses.dataclass
class Group:
    kind: str
    units: int
    slices: list[Slice] = dataclasses.field(default_factory=list)
    values: dict[ir.Value, tuple[int, int]] = dataclasses.field(default_factory=dict)
    reason: str | None = None
    producers: list[ir.Node] = dataclasses.field(default_factory=list)
    #: Values whose shape must be re-inferred (heads: layouts too tangled to update by hand).
    clear: list[ir.Value] = dataclasses.field(default_factory=list)
    #: (node, input index, new array builder) for shape tensors that hold a unit count.
    shape_fixes: list[tuple[ir.Node, int, Any]] = dataclasses.field(default_factory=list)
    name: str = ""


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else value.shape.rank()


def dim(value: ir.Value, axis: int) -> Any:
    """Static int, SymbolicDim or None for ``value``'s dim at (negative) ``axis``."""
    if value.shape is None:
        return None
    r = value.shape.rank()
    if axis + r < 0:
        return 1  # broadcast: the value has no such axis
    return value.shape[axis]


def single_consumer(v: ir.Value, allow_shape: bool = True) -> ir.Node | None:
    """The one node reading ``v`` (Shape reads ignored when ``allow_shape``), or None."""
    users = [u.node for u in v.uses() if not (allow_shape and u.node.op_type == "Shape")]
    return users[0] if len(users) == 1 and not v.is_graph_output() else None


def producer_axes(node: ir.Node) -> tuple[int, int, int] | None:
    """(weight input index, weight output axis, activation output axis) of a prunable producer."""
    if node.domain not in ("", "ai.onnx"):
        return None
    w = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or node.inputs[1].dtype not in FLOAT_TYPES:  # type: ignore[union-attr]
        return None
    if node.op_type == "Conv" and w.ndim >= 3 and node.attributes.get_int("group", 1) == 1:
        return 1, 0, -(w.ndim - 1)
    if node.op_type == "MatMul" and w.ndim == 2 and constant_array(node.inputs[0]) is None:
        return 1, 1, -1
    if node.op_type == "Gemm" and w.ndim == 2 and constant_array(node.inputs[0]) is None:
        return 1, (0 if node.attributes.get_int("transB", 0) else 1), -1
    return None


def shape_pieces(v: ir.Value) -> list[tuple[int, Any]] | None:
    """A 1-D shape tensor as (length, constant array or None) pieces (Concat of constants/dynamic parts)."""
    c = constant_array(v)
    if c is not None:
        return [(int(c.size), c.astype(np.int64).ravel())]
    p = v.producer()
    if p is None or p.op_type != "Concat":
        return None
    pieces = []
    for x in p.inputs:
        if x is None:
            return None
        cx = constant_array(x)
        if cx is not None:
            pieces.append((int(cx.size), cx.astype(np.int64).ravel()))
        elif x.shape is not None and x.shape.rank() == 1 and isinstance(x.shape[0], int):
            pieces.append((int(x.shape[0]), None))
        else:
            return None
    return pieces


def element(pieces: list[tuple[int, Any]], pos: int) -> tuple[int, int, Any]:
    """(piece index, offset in piece, constant value or None) of shape element ``pos``."""
    start = 0
    for k, (n, arr) in enumerate(pieces):
        if pos < start + n:
            return k, pos - start, None if arr is None else int(arr[pos - start])
        start += n
    raise IndexError(pos)

"""Matching helpers for the hand-written fusion rules (plain Python over onnx_ir nodes).

The rule modules (``ort_gelu``, ``ort_conv``, ``ort_rotary``, ...) walk out from a root node with
these instead of onnxscript patterns. One home for them, so that no rule module borrows from
another; IR helpers every pass family needs (constants, names, value replacement) stay in
:mod:`passes.ir_helpers`.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from ..ir_helpers import MS_DOMAIN, constant_array, is_standard, rank, replace_value

__all__ = [
    "PRIVATE_DOMAIN",
    "add_contrib_opset",
    "close",
    "is_op",
    "only_consumer",
    "other",
    "producer",
    "replace_with",
    "same_dim",
    "same_shape",
    "scalar",
    "single_use",
]

#: onnxscript's intermediate domain (SDPA, its RotaryEmbedding, ...): what its ort_fusions rules
#: create for later rules to consume; nothing in it may survive ``fuse-ort``.
PRIVATE_DOMAIN = "ai.onnxruntime._fusion"
#: Relative tolerance of :func:`close`.
RTOL = 1e-5


def is_op(node: ir.Node | None, *op_types: str) -> bool:
    """True for a default-domain node of one of ``op_types`` (False for None)."""
    return node is not None and is_standard(node, *op_types)


def producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The standard-domain ``op_type`` node that produces ``value`` (None if another op or none)."""
    node = None if value is None else value.producer()
    return node if is_op(node, *op_types) and None not in node.inputs else None  # type: ignore[union-attr]


def single_use(value: ir.Value | None) -> bool:
    """``value`` feeds exactly one node input and is no graph output (so a fusion may delete it)."""
    return value is not None and len(value.uses()) == 1 and not value.is_graph_output()


def only_consumer(value: ir.Value, *op_types: str) -> ir.Node | None:
    """The single consumer of ``value`` if it is one of ``op_types`` (value no graph output)."""
    if not single_use(value):
        return None
    node = value.uses()[0].node
    return node if is_op(node, *op_types) and None not in node.inputs else None


def scalar(value: ir.Value | None, like: ir.Value) -> float | None:
    """A single-element float constant that cannot broadcast ``like`` to a larger rank."""
    arr = constant_array(value)
    if arr is None or arr.size != 1 or arr.dtype.kind != "f":
        return None
    r = rank(like)
    if arr.ndim > (0 if r is None else r):
        return None
    v = float(arr.astype(np.float64).reshape(-1)[0])
    return v if math.isfinite(v) else None


def close(value: ir.Value | None, like: ir.Value, expected: float) -> bool:
    """``value`` is a :func:`scalar` within :data:`RTOL` of ``expected``."""
    v = scalar(value, like)
    return v is not None and abs(v - expected) <= RTOL * abs(expected)


def other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The operand of binary ``node`` that is not ``value`` (None if value is no operand)."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    return b if a is value else a if b is value else None


def same_dim(a: object, b: object) -> bool:
    """Two dims known to be equal: equal ints, or symbolic dims with the same name."""
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    av, bv = getattr(a, "value", None), getattr(b, "value", None)
    return av is not None and av == bv


def same_shape(a: ir.Value, b: ir.Value) -> bool:
    """Both shapes known, of one rank, and every dim pair :func:`same_dim`."""
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    return all(same_dim(x, y) for x, y in zip(a.shape, b.shape))


def add_contrib_opset(model: ir.Model) -> None:
    """Import the com.microsoft domain (version 1) unless the model already does."""
    model.opset_imports.setdefault(MS_DOMAIN, 1)


def replace_with(model: ir.Model, final: ir.Node, new: ir.Node, matched: list[ir.Node]) -> bool:
    """Insert ``new`` before ``final``, let it take over ``final``'s output (name kept when that is
    a graph output) and delete the ``matched`` nodes. False (nothing changed) when unsafe."""
    graph = final.graph
    assert graph is not None
    old = final.outputs[0]
    out = new.outputs[0]
    out.type, out.shape = old.type, old.shape
    graph.insert_before(final, new)
    if not replace_value(final, old, out):
        graph.remove(new, safe=True)
        return False
    rest = [n for n in matched if n is not final and n.graph is graph]
    graph.remove(rest, safe=True)
    add_contrib_opset(model)
    return True

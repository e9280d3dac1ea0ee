"""Merge chains of elementwise arithmetic with constant operands into one node:
``(x*c1)*c2 → x*(c1*c2)``, ``(x/c1)*c2 → x*(c2/c1)``, ``(x+c1)-c2 → x+(c1-c2)``, …

Exporters leave such chains behind after scale folding and attention-scale rewrites (``q*s*s'``,
``(x-m)/σ*γ``). Own code: onnxscript's rewriter has no rule that merges constant chains (its
``basic_rules`` only drop ``x*1``/``x+0``), and the rule is simplest over onnx_ir nodes directly.
Floating point only; the forms and safety conditions are in :func:`_apply_chains`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from ..ir_helpers import all_nodes, infer_shapes, is_standard, replace_value
from ..ir_helpers import constant_array as _constant
from ._base import STANDARD, FusionPass, FusionRule

__all__ = ["FuseConstantChainsPass"]

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16})

# A node of a chain is one of these forms, with x the non-constant operand and c the constant:
#   multiplicative: "x*c" (Mul either order), "x/c", "c/x";  additive: "x+c", "x-c", "c-x".
# (form of the first node, op of the second node with v its first operand "v?c" or second "c?v")
#   → (form of the merged node, how the merged constant is computed from c1, c2).
_MUL_TABLE: dict[tuple[str, str], tuple[str, str]] = {
    ("x*c", "v*c"): ("x*c", "c1*c2"),
    ("x*c", "v/c"): ("x*c", "c1/c2"),
    ("x*c", "c/v"): ("c/x", "c2/c1"),  # c2/(x*c1) = (c2/c1)/x
    ("x/c", "v*c"): ("x*c", "c2/c1"),
    ("x/c", "v/c"): ("x/c", "c1*c2"),
    ("x/c", "c/v"): ("c/x", "c1*c2"),  # c2/(x/c1) = (c2*c1)/x
    ("c/x", "v*c"): ("c/x", "c1*c2"),
    ("c/x", "v/c"): ("c/x", "c1/c2"),
    ("c/x", "c/v"): ("x*c", "c2/c1"),  # c2/(c1/x) = x*(c2/c1)
}
_ADD_TABLE: dict[tuple[str, str], tuple[str, str]] = {
    ("x+c", "v+c"): ("x+c", "c1+c2"),
    ("x+c", "v-c"): ("x+c", "c1-c2"),
    ("x+c", "c-v"): ("c-x", "c2-c1"),  # c2-(x+c1) = (c2-c1)-x
    ("x-c", "v+c"): ("x+c", "c2-c1"),
    ("x-c", "v-c"): ("x-c", "c1+c2"),
    ("x-c", "c-v"): ("c-x", "c1+c2"),  # c2-(x-c1) = (c2+c1)-x
    ("c-x", "v+c"): ("c-x", "c1+c2"),
    ("c-x", "v-c"): ("c-x", "c1-c2"),
    ("c-x", "c-v"): ("x+c", "c2-c1"),  # c2-(c1-x) = x+(c2-c1)
}
_ONNX_OP = {"*": "Mul", "/": "Div", "+": "Add", "-": "Sub"}
_NP_OP = {"*": np.multiply, "/": np.divide, "+": np.add, "-": np.subtract}


def _dtype(arr: np.ndarray) -> ir.DataType | None:
    try:
        return ir.DataType.from_numpy(arr.dtype)
    except TypeError:
        return None


def _node_form(node: ir.Node) -> tuple[str, ir.Value, ir.Value, np.ndarray] | None:
    """(form, x, constant value, constant array) of a binary Mul/Div/Add/Sub with one constant operand."""
    if not is_standard(node, "Mul", "Div", "Add", "Sub"):
        return None
    if len(node.inputs) != 2 or len(node.outputs) != 1 or None in node.inputs:
        return None
    a, b = node.inputs
    assert a is not None and b is not None
    ca, cb = _constant(a), _constant(b)
    sym = {"Mul": "*", "Div": "/", "Add": "+", "Sub": "-"}[node.op_type]
    if cb is not None and ca is None:
        return f"x{sym}c", a, b, cb
    if ca is not None and cb is None:
        form = f"x{sym}c" if sym in "*+" else f"c{sym}x"  # Mul/Add commute; Div/Sub do not
        return form, b, a, ca
    return None  # both constant (folding's job) or none


def _shapes_ok(x: ir.Value, c1: np.ndarray, c2: np.ndarray) -> bool:
    """True when merging cannot change the output shape or grow the constant.

    Either both constants are single elements of rank ≤ rank(x) (so neither broadcasts x to
    a new shape), or they have identical shapes (then x∘c1∘c2 and x∘c have the same broadcast).
    """
    if c1.shape == c2.shape:
        return True
    rank = None if x.shape is None else len(x.shape)
    return rank is not None and c1.size == 1 and c2.size == 1 and c1.ndim <= rank and c2.ndim <= rank


def _merge_constants(how: str, c1: np.ndarray, c2: np.ndarray, multiplicative: bool) -> np.ndarray | None:
    """The merged constant in the constants' own dtype, or None if it is not safe to use.

    float16/bfloat16 are computed in float32 and rounded once at the end: the float32 product
    of two float16/bfloat16 values is exact, so the result is the correctly rounded constant, and
    ml_dtypes' bfloat16 has no native numpy arithmetic to rely on.
    """
    dtype = c1.dtype
    work = np.float64 if dtype == np.float64 else np.float32
    a, b = c1.astype(work), c2.astype(work)
    for arr in (a, b):
        if not np.all(np.isfinite(arr)) or (multiplicative and np.any(arr == 0)):
            return None
    first, op, second = how[:2], how[2], how[3:]
    lhs, rhs = (a, b) if first == "c1" else (b, a)
    assert second in ("c1", "c2")
    with np.errstate(all="ignore"):
        merged = np.asarray(_NP_OP[op](lhs, rhs)).astype(dtype)
    check = merged.astype(work)
    if not np.all(np.isfinite(check)) or (multiplicative and np.any(check == 0)):
        return None  # overflow or underflow in the merged constant: the chain stays
    return merged


class _Namer:
    """Unique value names for the new constants (one scan of the model per rule application)."""

    def __init__(self, model: ir.Model) -> None:
        self.taken: set[str] = set()
        for graph in [*model.graphs(), *(f.graph for f in model.functions.values())]:
            self.taken.update(v.name for v in graph.inputs if v.name)
            self.taken.update(graph.initializers.keys())
            for node in graph:
                self.taken.update(o.name for o in node.outputs if o.name)

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


def _merge_site(node: ir.Node, table: dict[tuple[str, str], tuple[str, str]]) -> tuple | None:
    """Match ``node`` (the second op) with its producer (the first op); None when it may not merge."""
    second = _node_form(node)
    if second is None:
        return None
    form2, v, _, c2 = second
    first_node = v.producer()
    if first_node is None or first_node.graph is not node.graph:
        return None
    first = _node_form(first_node)
    if first is None:
        return None
    form1, x, _, c1 = first
    role2 = form2.replace("x", "v")
    key = (form1, role2)
    if key not in table:
        return None  # e.g. an additive op after a multiplicative one
    if v.is_graph_output() or len(v.uses()) != 1:
        return None  # the intermediate is needed elsewhere
    dtypes = {_dtype(c1), _dtype(c2), *([x.dtype] if x.dtype is not None else [])}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _FLOAT_TYPES:
        return None
    if not _shapes_ok(x, c1, c2):
        return None
    new_form, how = table[key]
    merged = _merge_constants(how, c1, c2, multiplicative=table is _MUL_TABLE)
    if merged is None:
        return None
    return first_node, x, new_form, merged


def _apply_chains(model: ir.Model, table: dict[tuple[str, str], tuple[str, str]]) -> int:
    """Merge every chain of two ops of ``table`` (pairwise, until none is left); the count.

    Forms: ``(x*c1)*c2 → x*(c1*c2)``, ``(x/c1)*c2 → x*(c2/c1)``, ``(x+c1)-c2 → x+(c1-c2)``, … and the
    forms with the constant first: ``Mul(c, x)``/``Add(c, x)`` are the same as ``x*c``/``x+c``, while
    ``c/x`` and ``c-x`` are kept apart from ``x/c`` and ``x-c`` (they compose into ``c'/x``, ``c'-x``
    or, for ``c2/(c1/x)`` and ``c2-(c1-x)``, back into ``x*c'`` and ``x+c'``).

    Safety: only floating-point tensors (integer ``(x/2)/2`` is not ``x/4``); the intermediate value
    has exactly one consumer and is not a graph output; constants are initializers or Constant
    outputs (never graph inputs, which a caller can override); broadcasting must be provably
    harmless (see :func:`_shapes_ok`); and constants that are 0, inf or NaN (or merge into one) are
    left alone, because reassociating ``x*0*inf`` or an overflowing product changes results.
    Reassociation itself changes rounding by an ulp or so of the intermediate value, which is the
    usual cost of constant reassociation.
    """
    namer: _Namer | None = None
    count = 0
    changed = True
    while changed:  # a chain of n ops merges pairwise; topological order usually does it in one walk
        changed = False
        for node in all_nodes(model):
            graph = node.graph
            if graph is None:
                continue  # removed earlier in this walk
            site = _merge_site(node, table)
            if site is None:
                continue
            first_node, x, new_form, merged = site
            if namer is None:
                namer = _Namer(model)
            out = node.outputs[0]
            const_name = namer(f"{out.name or 'chain'}_const")
            tensor = ir.tensor(merged, name=const_name)
            new_nodes: list[ir.Node] = []
            if graph is model.graph:
                const = ir.Value(
                    name=const_name,
                    type=ir.TensorType(tensor.dtype),
                    shape=ir.Shape(merged.shape),
                    const_value=tensor,
                )
                graph.register_initializer(const)
            else:  # subgraphs and functions: a Constant node keeps the value local to them
                cnode = ir.node("Constant", [], {"value": tensor})
                const = cnode.outputs[0]
                const.name = const_name
                const.const_value = tensor
                const.type = ir.TensorType(tensor.dtype)
                const.shape = ir.Shape(merged.shape)
                new_nodes.append(cnode)
            op = _ONNX_OP[new_form[1]]
            inputs = [x, const] if new_form[0] == "x" else [const, x]
            fused = ir.node(op, inputs, name=node.name)
            fused.outputs[0].type = out.type
            fused.outputs[0].shape = out.shape
            new_nodes.append(fused)
            graph.insert_before(node, new_nodes)
            if not replace_value(node, out, fused.outputs[0]):  # cannot happen: the producer is in graph
                graph.remove(new_nodes, safe=True)
                continue
            if not first_node.outputs[0].uses():
                first_node.graph.remove(first_node, safe=True)  # type: ignore[union-attr]
            count += 1
            changed = True
    return count


def _mul_chains(model: ir.Model) -> int:
    return _apply_chains(model, _MUL_TABLE)


def _add_chains(model: ir.Model) -> int:
    return _apply_chains(model, _ADD_TABLE)


class FuseConstantChainsPass(FusionPass):
    """Merge consecutive Mul/Div (or Add/Sub) nodes with constant operands into one node.

    Safe because it only touches floating-point tensors, needs a single-consumer intermediate
    that is not a graph output, proves broadcasting harmless (single-element constants of rank
    ≤ rank(x), or constants of identical shape), and refuses zero/non-finite constants and
    merged constants that overflow or underflow. Graph outputs keep their names.
    """

    name = "fuse-constant-chains"
    RULES: ClassVar = (
        FusionRule(
            "mul-chain",
            "(x*c1)*c2, (x/c1)*c2, c2/(x*c1), … → one Mul/Div with a merged constant",
            _mul_chains,
            STANDARD,
        ),
        FusionRule(
            "add-chain",
            "(x+c1)+c2, (x-c1)+c2, c2-(x+c1), … → one Add/Sub with a merged constant",
            _add_chains,
            STANDARD,
        ),
    )

    def prepare(self, model: ir.Model) -> bool:
        return infer_shapes(model)  # the broadcast proof needs the rank of x

    def finish(self, model: ir.Model, modified: bool) -> bool:
        if not modified:
            return False
        # Constant nodes whose only users were the merged ops.
        return bool(common.RemoveUnusedNodesPass()(model).modified)

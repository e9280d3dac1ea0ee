"""``remove-noops`` and ``simplify``: drop nodes that return their input unchanged, and apply
onnxscript's exact shape-chain simplifications.

onnx_ir's identity elimination renames an input that is already a graph output, which loses that
output; :func:`~graphopt.passes.ir_helpers.replace_value` keeps the node in such cases.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.pipeline import Pass

from ..ir_helpers import (
    STANDARD_DOMAINS,
    all_nodes,
    is_standard,
    model_opset,
    opset_guarded,
    replace_value,
    static_shape,
)
from ..ir_helpers import rank as _input_rank
from ._values import broadcast as _broadcast
from ._values import const_value as _const

__all__ = ["NoOpOptions", "RemoveNoOpsPass", "SimplifyPass"]


@dataclasses.dataclass
class NoOpOptions:
    identity: bool = True
    dropout: bool = True
    cast: bool = True
    reshape: bool = True
    expand: bool = True
    transpose: bool = True
    arithmetic: bool = True


def _neutral_operand_input(node: ir.Node) -> ir.Value | None:
    """x for x+0, 0+x, x-0, x*1, 1*x, x/1 when the constant cannot broadcast x to a new shape."""
    neutral = 0 if node.op_type in ("Add", "Sub") else 1
    sides = [(0, 1), (1, 0)] if node.op_type in ("Add", "Mul") else [(0, 1)]
    for xi, ci in sides:
        x, c = node.inputs[xi], node.inputs[ci]
        if x is None or c is None or x.shape is None or x.dtype is None:
            continue
        arr = _const(c)
        if arr is None or arr.size == 0 or c.dtype != x.dtype:
            continue
        if arr.ndim > len(x.shape) or any(d != 1 for d in arr.shape):
            continue  # could broadcast x to a larger shape
        if not np.all(arr == neutral):
            continue
        return x
    return None


def _perm(node: ir.Node, rank: int | None) -> list[int] | None:
    attr = node.attributes.get("perm")
    if attr is not None:
        return list(attr.as_ints())
    if rank is None:
        return None
    return list(range(rank))[::-1]


class RemoveNoOpsPass(Pass):
    """Remove nodes that return their input unchanged: Identity, inference Dropout, Cast to the
    same type, Reshape/Expand to the same static shape, identity Transpose and inverse
    Transpose pairs, x+0 / x-0 / x*1 / x/1 with a constant that cannot broadcast.

    Safe because each rule needs proof (known dtypes, fully static shapes, constant shape
    operands), and a node whose output is a graph output is kept when its input cannot take
    over that name.
    """

    name = "remove-noops"
    Options = NoOpOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in all_nodes(model):
            if node.graph is None or not node.outputs:
                continue  # already removed by an earlier rewrite in this walk
            replacement = self._noop_input(node)
            if replacement is None:
                continue
            if replace_value(node, node.outputs[0], replacement):
                self.count(node.op_type.lower())
                modified = True
        return ir.passes.PassResult(model, modified)

    def _noop_input(self, node: ir.Node) -> ir.Value | None:
        o = self.options
        if node.domain not in STANDARD_DOMAINS or not node.inputs or node.inputs[0] is None:
            return None
        x = node.inputs[0]
        op = node.op_type
        if op == "Identity" and o.identity:
            # Identity on sequences/optionals is fine too: same value.
            return x
        if op == "Dropout" and o.dropout:
            training = node.inputs[2] if len(node.inputs) > 2 else None
            if training is not None:
                t = _const(training)
                if t is None or bool(t.reshape(-1)[0]):
                    return None
            if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
                return None  # the mask is used
            return x
        if op == "Cast" and o.cast:
            to = node.attributes.get("to")
            if to is not None and x.dtype is not None and ir.DataType(to.as_int()) == x.dtype:
                return x
            return None
        if op == "CastLike" and o.cast and len(node.inputs) > 1 and node.inputs[1] is not None:
            if x.dtype is not None and x.dtype == node.inputs[1].dtype:
                return x
            return None
        if op == "Reshape" and o.reshape and len(node.inputs) > 1:
            src = static_shape(x)
            target = _const(node.inputs[1])
            if src is None or target is None:
                return None
            allowzero = node.attributes.get("allowzero")
            az = allowzero is not None and allowzero.as_int() == 1
            t = [int(d) for d in target.reshape(-1)]
            if len(t) != len(src):
                return None
            resolved = []
            for i, d in enumerate(t):
                if d == 0 and not az:
                    d = src[i]
                resolved.append(d)
            if resolved.count(-1) == 1:
                known = math.prod(d for d in resolved if d != -1)
                if known == 0:
                    return None
                resolved[resolved.index(-1)] = math.prod(src) // known
            return x if tuple(resolved) == src else None
        if op == "Expand" and o.expand and len(node.inputs) > 1:
            src = static_shape(x)
            target = _const(node.inputs[1])
            if src is None or target is None:
                return None
            b = _broadcast(src, [int(d) for d in target.reshape(-1)])
            return x if b is not None and b == src else None
        if op in ("Add", "Sub", "Mul", "Div") and o.arithmetic and len(node.inputs) == 2:
            return _neutral_operand_input(node)
        if op == "Transpose" and o.transpose:
            rank = _input_rank(x)
            perm = _perm(node, rank)
            if perm is not None and perm == sorted(perm) and (rank is None or len(perm) == rank):
                return x
            prev = x.producer()
            if (
                perm is not None
                and prev is not None
                and is_standard(prev, "Transpose")
                and prev.inputs[0] is not None
            ):
                first = _perm(prev, _input_rank(prev.inputs[0]))
                if first is not None and len(first) == len(perm):
                    composed = [first[p] for p in perm]
                    if composed == list(range(len(perm))):
                        return prev.inputs[0]
            return None
        return None


@functools.cache
def _materialize_reshape_shape_rule() -> Any:
    """onnxscript's ``MaterializeReshapeShape`` in the form the model's opset has.

    onnxscript writes every materialized shape with ``allowzero=1``, an attribute Reshape has only
    from opset 14 (ONNX Runtime refuses it before: "Unrecognized attribute: allowzero"). It matters
    only where the shape holds a 0 (``allowzero=0`` would copy the input's dim there): so the
    Reshape carries it only then, and before opset 14 such a site is left alone.
    """
    from onnxscript.rewriter.rules.common import _materialize_reshape_shape as osmat

    class MaterializeReshapeShape(osmat.MaterializeReshapeShape):
        def check(self, context, data, shape):
            result = super().check(context, data, shape)
            if not result:
                return result
            self._allowzero = 1 if 0 in self._new_dims else None
            if self._allowzero and (-1 in self._new_dims or model_opset(context.model) < 14):
                return result.fail(
                    "a 0 dim needs allowzero=1, which Reshape has from opset 14 (and not with -1)"
                )
            return result

        def rewrite(self, op, data, shape):
            new_shape = op.Constant(value=ir.tensor(self._new_dims, dtype=ir.DataType.INT64))
            return op.Reshape(data, new_shape, allowzero=self._allowzero)

    return MaterializeReshapeShape.rule()


class SimplifyPass(Pass):
    """Apply onnxscript's shape-chain simplifications: collapse no-op Slices, merge
    Reshape/Reshape and Unsqueeze/Unsqueeze chains, materialise Reshape shapes known from
    inference, drop no-op ScatterND, fold Cast of ConstantOfShape.

    Safe because each onnxscript rule checks constants and static shapes before it fires.
    Rules that are not exact are left out on purpose: Cast∘Cast (double rounding) and
    x+0/x*1 (they ignore broadcasting, which can change the output shape).
    """

    name = "simplify"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.rewriter.rules import common as rules

        from graphopt.passes.fusion.shapes import safe_reshape_reshape_rule

        ruleset = opset_guarded(
            [
                rules.collapse_slice_rule,
                rules.collapse_slice2_rule,
                _materialize_reshape_shape_rule(),
                # onnxscript's reshape_reshape_rule names its new shape "<output>/shape" and the
                # rewriter overwrites an initializer of that name; ours names it freshly.
                safe_reshape_reshape_rule(),
                rules.unsqueeze_unsqueeze_rule,
                rules.squeeze_reshape_1d_rule,
                rules.no_op_dynamic_scatter_nd_rule,
                rules.no_op_static_scatter_nd_rule,
                rules.cast_constant_of_shape_rule,
                rules.cast_constant_of_shape_without_value_rule,
            ]
        )

        def shape() -> tuple[int, int, int]:
            nodes = list(all_nodes(model))
            inits = sum(len(g.initializers) for g in model.graphs())
            return len(nodes), sum(len(n.inputs) for n in nodes), inits

        before = shape()
        count = ruleset.apply_to_model(model)
        if count:
            self.count("rewrites", count)
        # The rewriter also drops nodes and initializers left dead by earlier passes and trailing
        # empty optional inputs (Clip(x, "", "") → Clip(x)), even with no match.
        removed = before != shape()
        return ir.passes.PassResult(model, bool(count) or removed)

"""Decomposed GELU, matched once for both of its fusions: the standard ``Gelu`` (opset 20,
:mod:`.activation`) and ONNX Runtime's ``FastGelu`` (:mod:`.ort_gelu`).

Why a matcher of our own: onnxscript's GELU rules match one association each, while exporters
write ``½·x·(1 + f(arg))`` in many (GPT-2's ``(½·x)·(1+t)``, BERT-style ``x·½·(1+erf(x/√2))``,
``x·(1+erf(x·0.7071))·½``, ``(1+f)/2·x``), and the tanh argument ``√(2/π)·(x + 0.044715·x³)`` in
several more: ``0.044715·Pow(x, 3)``, ``(x·x)·x``, jax/tf2onnx's ``x·(x·(0.044715·x))``, or the
factors spread over the sum. The tanh argument is therefore matched as a polynomial in x: each
term a product tree of x and scalar constants (:func:`monomial`), so every association of it is
one case. Constants match within :data:`.matching.RTOL` relative, only as single elements that
cannot broadcast x, and every intermediate must be used only inside the pattern.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from ..ir_helpers import constant_array
from .matching import RTOL, close, only_consumer, other, producer, scalar, single_use

__all__ = ["GeluMatch", "match_gelu", "monomial"]

#: √(2/π) and √(2/π)·0.044715: the coefficients of x and x³ in tanh GELU's argument.
_K1 = math.sqrt(2.0 / math.pi)
_K3 = _K1 * 0.044715
#: Deepest product tree :func:`monomial` walks (x³ written as a chain with constants needs 4).
_MAX_DEPTH = 6


@dataclasses.dataclass
class GeluMatch:
    x: ir.Value
    nodes: list[ir.Node]  # every node the fused op replaces
    final: ir.Node  # the node whose output the fused op's output replaces


def _near(value: float, expected: float) -> bool:
    return abs(value - expected) <= RTOL * abs(expected)


def monomial(value: ir.Value, x: ir.Value, nodes: list[ir.Node], depth: int = 0) -> tuple[float, int] | None:
    """``value`` as ``c·x^p``: a tree of Mul and Pow (integer exponent 1–4) over x and scalar
    constants, every intermediate used once; (c, p), its nodes appended to ``nodes``, or None."""
    if value is x:
        return 1.0, 1
    c = scalar(value, x)
    if c is not None:
        return c, 0
    node = producer(value, "Mul", "Pow")
    if node is None or depth >= _MAX_DEPTH or not single_use(value) or len(node.inputs) != 2:
        return None
    found: list[ir.Node] = []
    base = monomial(node.inputs[0], x, found, depth + 1)  # type: ignore[arg-type]
    if base is None:
        return None
    if node.op_type == "Mul":
        second = monomial(node.inputs[1], x, found, depth + 1)  # type: ignore[arg-type]
        if second is None:
            return None
        result = (base[0] * second[0], base[1] + second[1])
    else:
        exp = constant_array(node.inputs[1])
        rank = None if x.shape is None else len(x.shape)
        if exp is None or exp.size != 1 or exp.ndim > (rank or 0) or exp.dtype.kind not in "fiu":
            return None
        e = float(np.asarray(exp, dtype=np.float64).reshape(-1)[0])
        if e not in (1.0, 2.0, 3.0, 4.0):
            return None
        result = (base[0] ** int(e), base[1] * int(e))
    nodes.extend([*found, node])
    return result


def _linear_candidates(term: ir.Value) -> list[tuple[ir.Value, float, list[ir.Node]]]:
    """The ways ``term`` can be ``c·x``: (x, c, nodes) with x the term itself, or ``y`` when the
    term is a single-use ``Mul(y, c)``."""
    found: list[tuple[ir.Value, float, list[ir.Node]]] = [(term, 1.0, [])]
    mul = producer(term, "Mul")
    if mul is not None and single_use(term) and len(mul.inputs) == 2:
        for y, c in (mul.inputs, mul.inputs[::-1]):
            k = scalar(c, y)  # type: ignore[arg-type]
            if k is not None and y is not None and constant_array(y) is None:
                found.append((y, k, [mul]))
    return found


def _tanh_argument(arg: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
    """x and the nodes of ``√(2/π)·(x + 0.044715·x³)``: ``s·(a·x + b·x³)`` or ``a·x + b·x³`` with
    ``s·a = √(2/π)`` and ``s·b = √(2/π)·0.044715``, each product in any association."""
    outer = producer(arg, "Mul")
    scaled: list[tuple[float, ir.Value, list[ir.Node]]] = [(1.0, arg, [])]
    if outer is not None and len(outer.inputs) == 2:
        for inner, c in (outer.inputs, outer.inputs[::-1]):
            s = scalar(c, inner)  # type: ignore[arg-type]
            if s is not None and single_use(inner):
                scaled.append((s, inner, [outer]))  # type: ignore[arg-type]
    for s, inner, outer_nodes in scaled:
        add = producer(inner, "Add")
        if add is None or len(add.inputs) != 2:
            continue
        for lin, cubic in (add.inputs, add.inputs[::-1]):
            if lin is None or cubic is None or not single_use(cubic):
                continue
            for x, a, lin_nodes in _linear_candidates(lin):
                nodes: list[ir.Node] = []
                cube = monomial(cubic, x, nodes)
                if cube is None or cube[1] != 3 or not _near(s * a, _K1) or not _near(s * cube[0], _K3):
                    continue
                return x, [*outer_nodes, add, *lin_nodes, *nodes]
    return None


def _erf_argument(arg: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
    """x and the node of ``x/√2`` (Div by √2, or Mul by 1/√2 in either order)."""
    div = producer(arg, "Div")
    if div is not None and len(div.inputs) == 2 and close(div.inputs[1], div.inputs[0], math.sqrt(2.0)):  # type: ignore[arg-type]
        return div.inputs[0], [div]  # type: ignore[return-value]
    mul = producer(arg, "Mul")
    if mul is not None and len(mul.inputs) == 2:
        for x, c in (mul.inputs, mul.inputs[::-1]):
            if constant_array(x) is None and close(c, x, 1.0 / math.sqrt(2.0)):  # type: ignore[arg-type]
                return x, [mul]  # type: ignore[return-value]
    return None


def match_gelu(f_node: ir.Node, approximate: str) -> GeluMatch | None:
    """``½·x·(1 + f(arg(x)))`` around the ``Erf`` (approximate ``none``) or ``Tanh`` (``tanh``)
    node ``f_node``, in the associations ``(½x)·(1+f)``, ``x·(½·(1+f))``, ``(x·(1+f))·½``,
    ``(x·(1+f))/2`` and ``(1+f)/2·x``."""
    f_in = f_node.inputs[0] if len(f_node.inputs) == 1 else None
    if f_in is None or not single_use(f_in):
        return None
    found = _erf_argument(f_in) if approximate == "none" else _tanh_argument(f_in)
    if found is None:
        return None
    x, nodes = found
    f_out = f_node.outputs[0]
    add = only_consumer(f_out, "Add")
    if add is None or not close(other(add, f_out), x, 1.0):
        return None
    one_plus = add.outputs[0]
    nodes = [*nodes, f_node, add]
    m1 = only_consumer(one_plus, "Mul", "Div")
    if m1 is None:
        return None
    m1_out = m1.outputs[0]
    if m1.op_type == "Div":  # (1 + f) / 2 · x
        if m1.inputs[0] is not one_plus or not close(m1.inputs[1], x, 2.0):
            return None
        m2 = only_consumer(m1_out, "Mul")
        if m2 is None or other(m2, m1_out) is not x:
            return None
        return GeluMatch(x, [*nodes, m1, m2], m2)
    o = other(m1, one_plus)
    if o is x:  # (x·(1+f))·½  or  (x·(1+f))/2
        m2 = only_consumer(m1_out, "Mul", "Div")
        if m2 is None:
            return None
        if m2.op_type == "Mul" and close(other(m2, m1_out), x, 0.5):
            return GeluMatch(x, [*nodes, m1, m2], m2)
        if m2.op_type == "Div" and m2.inputs[0] is m1_out and close(m2.inputs[1], x, 2.0):
            return GeluMatch(x, [*nodes, m1, m2], m2)
        return None
    if close(o, x, 0.5):  # x·(½·(1+f))
        m2 = only_consumer(m1_out, "Mul")
        if m2 is None or other(m2, m1_out) is not x:
            return None
        return GeluMatch(x, [*nodes, m1, m2], m2)
    half = producer(o, "Mul")  # (½·x)·(1+f)
    if half is not None and single_use(o) and close(other(half, x), x, 0.5):
        return GeluMatch(x, [*nodes, half, m1], m1)
    return None

"""GELU forms onnxscript's ort_fusions misses → ``com.microsoft.FastGelu`` / ``QuickGelu``.

* ``fast-gelu-tanh``: onnxscript's ``GeluTanhFusion`` matches one association only,
  ``x·(½·(1+tanh(…)))``, while transformers' GPT-2 (``NewGELUActivation``) exports
  ``(½·x)·(1+tanh(√(2/π)·(x+0.044715·x³)))``; this rule takes any association and folds a
  ``MatMul`` bias into FastGelu's bias input.
* ``quick-gelu``: ``x·Sigmoid(αx)`` (SiLU when α=1, Llama's MLP) has no onnxscript rule. ONNX
  Runtime fuses it itself from ORT_ENABLE_EXTENDED on; the offline fusion helps sessions that run
  with fewer rewrites.

Both ops' CPU kernels are float32 only, so the rules fire on float32 only.
"""

from __future__ import annotations

import dataclasses
import math

import onnx_ir as ir

from ..ir_helpers import MS_DOMAIN, graph_nodes, rank
from ..ir_helpers import constant_array as constant
from .matching import close, is_op, only_consumer, other, producer, replace_with, scalar, single_use

__all__ = ["fuse_fast_gelu", "fuse_quick_gelu"]


@dataclasses.dataclass
class _Gelu:
    x: ir.Value
    nodes: list[ir.Node]  # every node the FastGelu replaces
    final: ir.Node  # the node whose output FastGelu's output replaces


def _is_cube(value: ir.Value, x: ir.Value, nodes: list[ir.Node]) -> bool:
    """value = Pow(x, 3) or x·x·x in either association (intermediates used once)."""
    pw = producer(value, "Pow")
    if pw is not None:
        exp = constant(pw.inputs[1])
        if (
            pw.inputs[0] is x
            and exp is not None
            and exp.size == 1
            and float(exp.reshape(-1)[0]) == 3.0
            and exp.ndim <= (rank(x) or 0)
        ):
            nodes.append(pw)
            return True
        return False
    m = producer(value, "Mul")
    if m is None:
        return False
    sq_value = other(m, x)
    sq = producer(sq_value, "Mul")
    if sq is not None and sq.inputs[0] is x and sq.inputs[1] is x and single_use(sq_value):
        nodes.extend([m, sq])
        return True
    return False


def _tanh_argument(arg: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
    """x and the nodes of √(2/π)·(x + 0.044715·x³), constants on either side."""
    outer = producer(arg, "Mul")
    if outer is None:
        return None
    for inner, c1 in (outer.inputs, outer.inputs[::-1]):
        add = producer(inner, "Add")
        if add is None or not single_use(inner):
            continue
        for x, term in (add.inputs, add.inputs[::-1]):
            scaled = producer(term, "Mul")
            if scaled is None or not single_use(term) or constant(x) is not None:
                continue
            if not close(c1, x, math.sqrt(2.0 / math.pi)):  # type: ignore[arg-type]
                continue
            for cube, c3 in (scaled.inputs, scaled.inputs[::-1]):
                nodes: list[ir.Node] = []
                if close(c3, x, 0.044715) and single_use(cube) and _is_cube(cube, x, nodes):  # type: ignore[arg-type]
                    return x, [outer, add, scaled, *nodes]  # type: ignore[return-value]
    return None


def _match_fast_gelu(tanh: ir.Node) -> _Gelu | None:
    """``½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` around ``tanh``, in the associations
    ``(½x)·(1+t)`` (GPT-2), ``x·(½·(1+t))``, ``(x·(1+t))·½`` and ``(x·(1+t))/2``."""
    arg = tanh.inputs[0]
    if not single_use(arg):
        return None
    found = _tanh_argument(arg)  # type: ignore[arg-type]
    if found is None:
        return None
    x, nodes = found
    t = tanh.outputs[0]
    add1 = only_consumer(t, "Add")
    if add1 is None or not close(other(add1, t), x, 1.0):
        return None
    one_plus = add1.outputs[0]
    nodes = [*nodes, tanh, add1]
    m1 = only_consumer(one_plus, "Mul")
    if m1 is None:
        return None
    o = other(m1, one_plus)
    m1_out = m1.outputs[0]
    if o is x:  # (x·(1+t))·½  or  (x·(1+t))/2
        m2 = only_consumer(m1_out, "Mul", "Div")
        if m2 is None:
            return None
        if m2.op_type == "Mul" and close(other(m2, m1_out), x, 0.5):
            return _Gelu(x, [*nodes, m1, m2], m2)
        if m2.op_type == "Div" and m2.inputs[0] is m1_out and close(m2.inputs[1], x, 2.0):
            return _Gelu(x, [*nodes, m1, m2], m2)
        return None
    if close(o, x, 0.5):  # x·(½·(1+t))
        m2 = only_consumer(m1_out, "Mul")
        if m2 is None or other(m2, m1_out) is not x:
            return None
        return _Gelu(x, [*nodes, m1, m2], m2)
    half = producer(o, "Mul")  # (½·x)·(1+t)
    if half is not None and single_use(o) and close(other(half, x), x, 0.5):
        return _Gelu(x, [*nodes, half, m1], m1)
    return None


def _gelu_bias(match: _Gelu) -> tuple[ir.Value, ir.Value, ir.Node] | None:
    """(matmul output, bias, Add) when x = MatMul(..) + b with b a 1-D constant over the last
    axis, and x is used only inside the GELU (so the Add can go)."""
    add = producer(match.x, "Add")
    if add is None or match.x.is_graph_output():
        return None
    inside = {id(n) for n in match.nodes}
    if any(id(u.node) not in inside for u in match.x.uses()):
        return None
    for mm_out, b in (add.inputs, add.inputs[::-1]):
        arr = constant(b)
        if producer(mm_out, "MatMul") is None or arr is None or arr.ndim != 1:
            continue
        shape = mm_out.shape  # type: ignore[union-attr]
        if shape is None or len(shape) == 0 or not isinstance(shape[-1], int) or shape[-1] != arr.shape[0]:
            continue
        if b.dtype != ir.DataType.FLOAT or mm_out.dtype != ir.DataType.FLOAT:  # type: ignore[union-attr]
            continue
        return mm_out, b, add  # type: ignore[return-value]
    return None


def fuse_fast_gelu(model: ir.Model) -> int:
    """tanh GELU in any association → ``com.microsoft.FastGelu(x[, bias])``."""
    count = 0
    for node in graph_nodes(model):
        if node.graph is None or not is_op(node, "Tanh") or len(node.inputs) != 1:
            continue
        match = _match_fast_gelu(node)
        if match is None or match.x.dtype != ir.DataType.FLOAT:
            continue
        if any(n.graph is not node.graph for n in match.nodes):
            continue
        inputs, nodes = [match.x], match.nodes
        biased = _gelu_bias(match)
        if biased is not None:
            mm_out, bias, add = biased
            inputs, nodes = [mm_out, bias], [*nodes, add]
        gelu = ir.node("FastGelu", inputs, domain=MS_DOMAIN, name=match.final.name)
        count += replace_with(model, match.final, gelu, nodes)
    return count


def fuse_quick_gelu(model: ir.Model) -> int:
    """``x·Sigmoid(x)`` / ``x·Sigmoid(α·x)`` (operands in any order) → ``QuickGelu(x, alpha=α)``."""
    count = 0
    for sig in graph_nodes(model):
        if sig.graph is None or not is_op(sig, "Sigmoid") or len(sig.inputs) != 1 or sig.inputs[0] is None:
            continue
        s_in = sig.inputs[0]
        s_out = sig.outputs[0]
        mul = only_consumer(s_out, "Mul")
        if mul is None:
            continue
        x = other(mul, s_out)
        if x is None or x is s_out:
            continue
        nodes = [sig, mul]
        alpha: float | None = 1.0
        if s_in is not x:
            scale = producer(s_in, "Mul")
            alpha = None if scale is None or not single_use(s_in) else scalar(other(scale, x), x)
            if alpha is None:
                continue  # Sigmoid(x)·y with y ≠ x, or Sigmoid(f(x)) with f no constant scale
            nodes.insert(0, scale)  # type: ignore[arg-type]
        if x.dtype != ir.DataType.FLOAT or any(n.graph is not sig.graph for n in nodes):
            continue
        quick = ir.node("QuickGelu", [x], {"alpha": float(alpha)}, domain=MS_DOMAIN, name=mul.name)
        count += replace_with(model, mul, quick, nodes)
    return count

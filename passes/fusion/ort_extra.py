"""Contrib fusions onnxscript's ort_fusions misses on real exports (see each rule for why).

* ``fast-gelu-tanh``: onnxscript's ``GeluTanhFusion`` matches one association only,
  ``x·(½·(1+tanh(…)))``; transformers' GPT-2 (``NewGELUActivation``) exports
  ``(½·x)·(1+tanh(√(2/π)·(x+0.044715·x³)))``. This rule starts at the ``Tanh`` and walks out to the
  product in any of the associations below, and folds a ``MatMul`` bias into FastGelu's bias input.
* ``quick-gelu``: ``x·Sigmoid(x)`` (SiLU, Llama's MLP) and ``x·Sigmoid(α·x)`` → ``QuickGelu`` (no
  onnxscript rule). ONNX Runtime fuses this itself from ORT_ENABLE_EXTENDED on; the offline fusion
  helps sessions that run with fewer rewrites (QuickGelu ≈ 1.5× faster than Sigmoid + Mul there).
* ``fused-conv``: ``Conv`` [+ ``Add`` (residual, same shape)] + activation → ``FusedConv``, the
  activations the CPU kernel implements (contrib_ops/cpu/fused_activation.cc: Relu, Tanh,
  Sigmoid, LeakyRelu, Clip, HardSigmoid). The residual goes to input Z, which the CPU ``Conv<float>``
  kernel adds before the activation and requires to have the output's shape exactly. ONNX Runtime
  does the same fusions at session level, so this mostly shows the fused graph offline (no
  latency change measured on tiny ResNet at ORT_ENABLE_ALL).
* ``rotary-embedding-mul``: transformers ≥ 5 compute the rotary angles as
  ``position_ids[..., None].float() * inv_freq`` (a ``Mul``), where onnxscript's ``cos-sin-cache``
  expects ``Transpose(MatMul(inv_freq, positions))``; see :mod:`passes.fusion.ort_rotary`.

The CPU kernels of FastGelu, QuickGelu and FusedConv are float32 only (checked with
``onnxruntime.capi.onnxruntime_pybind11_state.get_all_opkernel_def()``), so these rules fire on
float32 only: a fused float16 model would not load on the CPU provider.

Matching is plain Python over onnx_ir nodes, indexed by the root op (Tanh, Sigmoid, Conv), so
each rule visits a handful of nodes; every intermediate must be used only inside the match, and
constants must be single elements that cannot broadcast x to a larger shape.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from ..ir_helpers import MS_DOMAIN, graph_nodes, model_opset, replace_value
from ..ir_helpers import constant_array as constant
from ._base import CONTRIB, FusionRule

__all__ = ["EARLY_RULES", "GELU_RULES", "LATE_RULES"]

_RTOL = 1e-5
#: What ONNX Runtime's own Conv+Clip fusion uses for a missing Clip bound.
_FLOAT_MAX = float(np.finfo(np.float32).max)


# ---------------------------------------------------------------------------------------------
# Helpers over onnx_ir nodes (shared with ort_rotary)


def is_op(node: ir.Node | None, *op_types: str) -> bool:
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type in op_types


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


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def scalar(value: ir.Value | None, like: ir.Value) -> float | None:
    """A single-element float constant that cannot broadcast ``like`` to a larger rank."""
    arr = constant(value)
    if arr is None or arr.size != 1 or arr.dtype.kind != "f":
        return None
    r = rank(like)
    if arr.ndim > (0 if r is None else r):
        return None
    v = float(arr.astype(np.float64).reshape(-1)[0])
    return v if math.isfinite(v) else None


def close(value: ir.Value | None, like: ir.Value, expected: float) -> bool:
    v = scalar(value, like)
    return v is not None and abs(v - expected) <= _RTOL * abs(expected)


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
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    return all(same_dim(x, y) for x, y in zip(a.shape, b.shape))


def add_contrib_opset(model: ir.Model) -> None:
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


# ---------------------------------------------------------------------------------------------
# FastGelu


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
        if pw.inputs[0] is x and exp is not None and exp.size == 1 and float(exp.reshape(-1)[0]) == 3.0 \
                and exp.ndim <= (rank(x) or 0):
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


# ---------------------------------------------------------------------------------------------
# QuickGelu


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


# ---------------------------------------------------------------------------------------------
# FusedConv


def _activation(act: ir.Node, opset: int) -> tuple[str, list[float] | None] | None:
    """FusedConv's (activation, activation_params) for ``act``; None when the CPU kernel has no
    such activation or a parameter is not a constant."""
    op = act.op_type
    if op in ("Relu", "Sigmoid", "Tanh"):
        return op, None
    if op == "LeakyRelu":
        return op, [act.attributes.get_float("alpha", 0.01)]
    if op == "HardSigmoid":
        return op, [act.attributes.get_float("alpha", 0.2), act.attributes.get_float("beta", 0.5)]
    if op == "Clip":
        lo, hi = -_FLOAT_MAX, _FLOAT_MAX
        if opset < 11:  # bounds are attributes
            lo = act.attributes.get_float("min", lo)
            hi = act.attributes.get_float("max", hi)
        else:
            for i in (1, 2):
                v = act.inputs[i] if len(act.inputs) > i else None
                if v is None:
                    continue
                arr = constant(v)
                if arr is None or arr.size != 1:
                    return None
                b = float(arr.astype(np.float64).reshape(-1)[0])
                if math.isnan(b):
                    return None
                lo, hi = (b, hi) if i == 1 else (lo, b)
        return op, [float(lo), float(hi)]
    return None


_ACTIVATIONS = ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "Clip")


def fuse_conv_activation(model: ir.Model) -> int:
    """``Conv`` [+ ``Add(residual)``] + activation → ``com.microsoft.FusedConv``."""
    count = 0
    opset = model_opset(model)
    for conv in graph_nodes(model):
        if conv.graph is None or not is_op(conv, "Conv") or not 2 <= len(conv.inputs) <= 3:
            continue
        if conv.inputs[0] is None or conv.inputs[1] is None:
            continue
        y = conv.outputs[0]
        if y.dtype != ir.DataType.FLOAT or not single_use(y):
            continue
        consumer = y.uses()[0].node
        nodes = [conv]
        z = None
        if is_op(consumer, "Add") and len(consumer.inputs) == 2:
            z = other(consumer, y)
            # Z must be exactly the output's shape: the kernel rejects anything else at run time.
            if z is None or z is y or z.dtype != ir.DataType.FLOAT or not same_shape(z, y):
                continue
            if not same_shape(consumer.outputs[0], y):
                continue
            nodes.append(consumer)
            consumer = only_consumer(consumer.outputs[0], *_ACTIVATIONS)  # type: ignore[assignment]
            if consumer is None:
                continue
        if not is_op(consumer, *_ACTIVATIONS) or consumer.graph is not conv.graph:
            continue
        act = _activation(consumer, opset)
        if act is None:
            continue
        kind, params = act
        attrs: dict[str, object] = {a.name: a for a in conv.attributes.values()}
        attrs["activation"] = kind
        if params is not None:
            attrs["activation_params"] = [float(p) for p in params]
        inputs = list(conv.inputs)
        if z is not None:
            inputs = [*inputs, *([None] * (3 - len(inputs))), z]
        fused = ir.node("FusedConv", inputs, attrs, domain=MS_DOMAIN, name=conv.name)  # type: ignore[arg-type]
        count += replace_with(model, consumer, fused, [*nodes, consumer])
    return count


# ---------------------------------------------------------------------------------------------
# Rotary embedding (transformers ≥ 5), in ort_rotary


def _rotary(model: ir.Model) -> int:
    from .ort_rotary import fuse_rotary_embedding

    return fuse_rotary_embedding(model)


_ROTARY = FusionRule(
    "rotary-embedding-mul",
    "rotate-half RoPE with angles = positions·inv_freq (transformers ≥ 5) → RotaryEmbedding + cos/sin cache",
    _rotary, CONTRIB)

#: Run before the normalization rules. ``rotary-embedding-mul`` runs early so that the attention
#: rules see com.microsoft RotaryEmbedding and absorb the Q/K/V head reshapes too (tiny Llama:
#: 77 nodes instead of 114, ~15% faster at sequence 128). That needs the guarded GQA rule in
#: :mod:`passes.fusion.ort` (onnxscript's accepts any mask once a RotaryEmbedding exists).
EARLY_RULES: list[FusionRule] = [_ROTARY]
#: Run after onnxscript's GELU rules, before BiasGelu.
GELU_RULES: list[FusionRule] = [
    FusionRule("fast-gelu-tanh", "tanh GELU in the associations onnxscript misses (GPT-2's (½x)·(1+tanh…)) → FastGelu",
               fuse_fast_gelu, CONTRIB),
    FusionRule("quick-gelu", "x·Sigmoid(αx) (SiLU when α=1) → QuickGelu", fuse_quick_gelu, CONTRIB),
]
#: Run last.
LATE_RULES: list[FusionRule] = [
    FusionRule("fused-conv", "Conv [+ Add(residual)] + Relu/Sigmoid/Tanh/LeakyRelu/Clip/HardSigmoid → FusedConv",
               fuse_conv_activation, CONTRIB),
]

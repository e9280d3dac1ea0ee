"""GELU forms onnxscript's ort_fusions misses → ``com.microsoft.FastGelu`` / ``QuickGelu``.

* ``fast-gelu-tanh``: onnxscript's ``GeluTanhFusion`` matches one association only,
  ``x·(½·(1+tanh(…)))``, while transformers' GPT-2 (``NewGELUActivation``) exports
  ``(½·x)·(1+tanh(√(2/π)·(x+0.044715·x³)))`` and jax/tf2onnx ``x·(x·(0.044715·x))`` inside it;
  this rule takes the forms :mod:`.gelu_match` knows and folds a ``MatMul`` bias into FastGelu's
  bias input.
* ``quick-gelu``: ``x·Sigmoid(αx)`` (SiLU when α=1, Llama's MLP) has no onnxscript rule. ONNX
  Runtime fuses it itself from ORT_ENABLE_EXTENDED on; the offline fusion helps sessions that run
  with fewer rewrites.

Both ops' CPU kernels are float32 only, so the rules fire on float32 only.
"""

from __future__ import annotations

import onnx_ir as ir

from ..ir_helpers import MS_DOMAIN, graph_nodes
from ..ir_helpers import constant_array as constant
from .gelu_match import GeluMatch, match_gelu
from .matching import is_op, only_consumer, other, producer, replace_with, scalar, single_use

__all__ = ["fuse_fast_gelu", "fuse_quick_gelu"]


def _gelu_bias(match: GeluMatch) -> tuple[ir.Value, ir.Value, ir.Node] | None:
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
        match = match_gelu(node, "tanh")
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

"""``Conv`` [+ ``Add`` (residual)] + activation → ``com.microsoft.FusedConv``.

Only the activations the CPU kernel implements (contrib_ops/cpu/fused_activation.cc: Relu, Tanh,
Sigmoid, LeakyRelu, Clip, HardSigmoid), float32 only (the kernel's type). The residual goes to
input Z, which the CPU ``Conv<float>`` kernel adds before the activation and requires to have the
output's shape exactly. ONNX Runtime does the same fusion at session level; doing it offline
shows the fused graph in the saved model.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from ..ir_helpers import MS_DOMAIN, graph_nodes, model_opset
from ..ir_helpers import constant_array as constant
from .matching import is_op, only_consumer, other, replace_with, same_shape, single_use

__all__ = ["fuse_conv_activation"]

#: What ONNX Runtime's own Conv+Clip fusion uses for a missing Clip bound.
_FLOAT_MAX = float(np.finfo(np.float32).max)


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

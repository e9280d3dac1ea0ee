"""Lowering of a MatMul/Gemm with a constant weight: per-tensor activations as
``com.microsoft.DynamicQuantizeMatMul`` (the bias fused), per-token activations as
``MatMulIntegerToFloat`` (see :mod:`.emit_per_token`) with the bias added where it costs least
(the consumer's bias input, else one Add); the input's float outlier channels as a thin float
MatMul added to the result."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from ...ir_helpers import MS_DOMAIN, constant_array, take_place
from .._common.norms import norm_of
from .emit_per_token import per_token_matmul

if TYPE_CHECKING:
    from .plan import Plan
    from .run import Run

__all__ = ["absorb_bias", "emit_matmul"]

#: Activations with a bias input an extra bias term can go into: op → (bias input, data inputs).
_ACTIVATION_BIAS = {"BiasGelu": (1, (0,)), "FastGelu": (1, (0,))}


def _bias_slot(node: ir.Node) -> tuple[int, tuple[int, ...]] | None:
    """(bias input, data inputs) of a com.microsoft op that adds a bias to its data inputs: a
    fused skip-normalization (data: the inputs before its scale) or BiasGelu/FastGelu."""
    norm = norm_of(node)
    if norm is not None and norm.bias is not None:
        return norm.bias, tuple(range(norm.scale))
    if node.domain == MS_DOMAIN:
        return _ACTIVATION_BIAS.get(node.op_type)
    return None


def emit_matmul(run: Run, plan: Plan, bias: np.ndarray | None, out: ir.Value, remove: list[ir.Node]) -> None:
    """Replace ``plan.node`` (and the nodes in ``remove``, its fused bias Add) by the int8 kernel
    whose result takes the place of ``out``."""
    graph = run.graph
    node, a, w = plan.node, plan.node.inputs[0], plan.weight
    base = node.name or "matmul"
    if plan.side is not None:
        # Outlier channels: they are zero in ``a`` (masked), so their weight rows leave the
        # int8 weight and are multiplied in float on the gathered channels.
        w = w.copy()
        w[plan.side[1]] = 0.0
    qw, scale, zp = run.qweight(base + "_W", w, plan.quantized)
    if plan.per_token:
        y, bias = per_token_matmul(run, node, a, qw, scale, zp, base, bias, plan.center, plan.asymmetric)
        y.shape, y.type = out.shape, out.type
        if bias is not None and absorb_bias(run, out, bias, base):
            bias = None
        if bias is not None:
            add = ir.Node(
                "",
                "Add",
                [y, run.init(base + "_bias", bias.astype(np.float32))],
                num_outputs=1,
                name=run.name(base + "_bias_add"),
            )
            graph.insert_before(node, add)
            y = add.outputs[0]
            y.name = run.name(base + "_quant_out")
        run.count("MatMulIntegerToFloat")
    else:
        inputs = [a, qw, scale, zp]
        if bias is not None:
            inputs.append(run.init(base + "_bias", bias.astype(np.float32)))
        new = ir.Node(
            MS_DOMAIN, "DynamicQuantizeMatMul", inputs, num_outputs=1, name=run.name(base + "_quant")
        )
        graph.insert_before(node, new)
        y = new.outputs[0]
        y.name = run.name(base + "_quant_out")
        run.count("DynamicQuantizeMatMul")
    y.shape, y.type = out.shape, out.type
    if plan.side is not None:
        gathered, idx = plan.side
        w_side = run.init(base + "_outlier_W", np.ascontiguousarray(plan.weight[idx]))
        mm = ir.Node("", "MatMul", [gathered, w_side], num_outputs=1, name=run.name(base + "_outliers"))
        mm.outputs[0].name = run.name(base + "_outliers_out")
        add = ir.Node("", "Add", [y, mm.outputs[0]], num_outputs=1, name=run.name(base + "_outliers_add"))
        graph.insert_before(node, mm)
        graph.insert_before(node, add)
        y = add.outputs[0]
        y.name, y.shape, y.type = run.name(base + "_quant_sum"), out.shape, out.type
        run.count("outlier_split")
    take_place(out, y)
    for n in [*remove, node]:
        graph.remove(n, safe=True)


def absorb_bias(run: Run, out: ir.Value, bias: np.ndarray, base: str) -> bool:
    """Add ``bias`` to the bias input of the op that is ``out``'s only consumer (through
    reshapes that keep the last axis): a skip-normalization (BERT/GPT-2 output projections) or
    BiasGelu/FastGelu (FFN input projections). Saves an Add over the whole output; False when
    there is no such consumer."""
    value = out
    for _ in range(4):
        uses = value.uses()
        if value.is_graph_output() or len(uses) != 1:
            return False
        user, index = uses[0].node, uses[0].idx
        if user.op_type not in ("Reshape", "Squeeze", "Unsqueeze") or user.domain not in ("", "ai.onnx"):
            break
        nxt = user.outputs[0]
        if index != 0 or nxt.shape is None or len(nxt.shape) == 0 or nxt.shape[-1] != bias.shape[0]:
            return False  # a reshape that moves the last axis would misplace the bias
        value = nxt
    else:
        return False
    slots = _bias_slot(user)
    if slots is None:
        return False
    slot, data_inputs = slots
    if index not in data_inputs or len(user.inputs) < slot:
        return False
    current = user.inputs[slot] if slot < len(user.inputs) else None
    old = np.zeros(bias.shape) if current is None else constant_array(current)
    if old is None or old.shape != bias.shape:
        return False
    new = run.init(base + "_folded_bias", (old.astype(np.float64) + bias).astype(np.float32))
    if current is None:
        user.resize_inputs(slot + 1)
    user.replace_input_with(slot, new)
    run.count("bias:absorbed")
    return True

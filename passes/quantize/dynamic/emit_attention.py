"""Lowering of ORT's packed-QKV ``Attention``: per-tensor activations as ``DynamicQuantizeLinear``
+ ``QAttention`` (as ORT's own quantizer does; a ``Where(keep, 0, -big)`` attention bias becomes
its raw mask index); per-token activations as an int8 QKV projection + ``Split`` +
``MultiHeadAttention`` (ORT's CPU MultiHeadAttention has no packed-QKV form, and QAttention takes
one per-tensor input scale)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from ...ir_helpers import MS_DOMAIN, constant_array, new_initializer, unique_name
from .emit_per_token import per_token_matmul

if TYPE_CHECKING:
    from .plan import Plan
    from .run import Run

__all__ = ["ATTENTION_ATTRS", "MaskPlan", "emit_mha", "emit_qattention", "raw_mask"]

#: Attention attributes that QAttention has too (qkv_hidden_sizes only when the three are equal).
ATTENTION_ATTRS = frozenset(
    {"num_heads", "unidirectional", "mask_filter_value", "scale", "do_rotary", "qkv_hidden_sizes"}
)

#: Makes QAttention's int32 mask from an attention bias: (graph, taken names, name base) →
#: (the mask, the nodes to insert).
MaskPlan = Callable[[ir.Graph, set[str], str], tuple[ir.Value, list[ir.Node]]]


def raw_mask(attn_bias: ir.Value) -> MaskPlan | None:
    """If ``attn_bias`` is ``Where(keep, 0, -big)`` with ``keep`` of shape (B, 1, S|1, T), a plan
    that makes QAttention's int32 raw mask: 3-D (B, S, T) or 2-D (B, T)."""
    node = attn_bias.producer()
    if node is None or node.op_type != "Where" or node.domain not in ("", "ai.onnx"):
        return None
    keep, zero, neg = node.inputs
    z, n = constant_array(zero), constant_array(neg)
    if z is None or n is None or z.size != 1 or n.size != 1 or float(z.reshape(())) != 0.0:
        return None
    if not float(n.reshape(())) <= -1e4:
        return None
    shape = keep.shape
    if keep.dtype != ir.DataType.BOOL or shape is None or len(shape) != 4 or shape[1] != 1:
        return None
    two_d = shape[2] == 1

    def plan(graph: ir.Graph, taken: set[str], base: str) -> tuple[ir.Value, list[ir.Node]]:
        av = new_initializer(graph, base + "_mask_axes", np.array([1, 2] if two_d else [1], np.int64), taken)
        sq = ir.Node(
            "", "Squeeze", [keep, av], num_outputs=1, name=unique_name(graph, base + "_mask_squeeze", taken)
        )
        sq.outputs[0].name = unique_name(graph, base + "_mask_bool", taken)
        cast = ir.Node(
            "",
            "Cast",
            [sq.outputs[0]],
            attributes=[ir.AttrInt64("to", ir.DataType.INT32)],
            num_outputs=1,
            name=unique_name(graph, base + "_mask_cast", taken),
        )
        out = cast.outputs[0]
        out.name = unique_name(graph, base + "_mask_index", taken)
        out.dtype = ir.DataType.INT32
        return out, [sq, cast]

    return plan


def _shift_v(b: np.ndarray, v_shift: np.ndarray) -> np.ndarray:
    """The packed QKV bias with ``v_shift`` taken off its V part (float64)."""
    b = b.astype(np.float64).copy()
    b[2 * (b.shape[0] // 3) :] -= v_shift
    return b


def emit_qattention(
    run: Run,
    node: ir.Node,
    x: ir.Value,
    plan: Plan,
    b: np.ndarray,
    mask: ir.Value | None,
    mask_plan: MaskPlan | None,
) -> None:
    """``node`` → ``DynamicQuantizeLinear(x)`` + ``QAttention`` with the int8 packed weight."""
    graph = run.graph
    base = node.name or "attention"
    qw, scale, zp = run.qweight(base + "_W", plan.weight, plan.quantized)
    if plan.v_shift is not None:
        b = _shift_v(b, plan.v_shift).astype(np.float32)
    dql = ir.Node("", "DynamicQuantizeLinear", [x], num_outputs=3, name=run.name(base + "_input_quant"))
    for i, suffix in enumerate(("quantized", "scale", "zero_point")):
        dql.outputs[i].name = run.name(f"{base}_input_{suffix}")
    graph.insert_before(node, dql)
    if mask_plan is not None:
        mask, extra = mask_plan(graph, run.taken, base)
        for n in extra:
            graph.insert_before(node, n)
    bias = run.init(base + "_bias", b)
    inputs = [dql.outputs[0], qw, bias, dql.outputs[1], scale, mask, dql.outputs[2], zp]
    attrs = [a for k, a in node.attributes.items() if k in ATTENTION_ATTRS and k != "qkv_hidden_sizes"]
    qa = ir.Node(
        MS_DOMAIN, "QAttention", inputs, attributes=attrs, num_outputs=1, name=run.name(base + "_quant")
    )
    graph.insert_before(node, qa)
    run.replace_node(node, qa.outputs[0], base + "_quant_out", "QAttention")


def emit_mha(run: Run, node: ir.Node, plan: Plan, b: np.ndarray, attn_bias: ir.Value | None) -> None:
    """``node`` with per-token activations: the QKV projection as a per-token int8 MatMul, split
    into Q, K, V, then ``MultiHeadAttention`` with the QKV bias."""
    graph = run.graph
    base = node.name or "attention"
    x = node.inputs[0]
    qw, scale, zp = run.qweight(base + "_W", plan.weight, plan.quantized)
    if plan.v_shift is not None:
        b = _shift_v(b, plan.v_shift)
    qkv, b = per_token_matmul(run, node, x, qw, scale, zp, base, b, plan.center, plan.asymmetric)
    d = plan.weight.shape[1] // 3
    split = ir.Node(
        "",
        "Split",
        [qkv, run.init(base + "_qkv_split", np.array([d, d, d], np.int64))],
        attributes=[ir.AttrInt64("axis", -1)],
        num_outputs=3,
        name=run.name(base + "_qkv_split"),
    )
    for v, part in zip(split.outputs, "qkv", strict=True):
        v.name, v.type = run.name(f"{base}_{part}"), x.type
    graph.insert_before(node, split)
    attrs = [
        a
        for k, a in node.attributes.items()
        if k in ("num_heads", "scale", "mask_filter_value", "unidirectional")
    ]
    inputs = [*split.outputs, run.init(base + "_bias", b.astype(np.float32)), None, attn_bias]
    while inputs[-1] is None:
        inputs.pop()
    mha = ir.Node(
        MS_DOMAIN, "MultiHeadAttention", inputs, attributes=attrs, num_outputs=1, name=run.name(base + "_mha")
    )
    graph.insert_before(node, mha)
    run.replace_node(node, mha.outputs[0], base + "_quant_out", "MultiHeadAttention")

"""Lowering of an embedding lookup (``Gather`` on a constant 2-D table): an int8 table with one
scale per row (per table when ``per_channel`` is off); only the gathered rows are dequantized."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from .._common.int8 import quantize_weight

if TYPE_CHECKING:
    from .run import Run

__all__ = ["emit_gather"]


def emit_gather(run: Run, node: ir.Node, table: np.ndarray) -> None:
    """Replace ``node`` by a Gather of int8 rows and their dequantization."""
    graph = run.graph
    base = node.name or "gather"
    o = run.options
    # Rows are the channels here: quantize the transposed table per column.
    q, scale, zp = quantize_weight(table.T, per_channel=o.per_channel, symmetric=True, reduce_range=False)
    qt = run.init(base + "_table_quantized", np.ascontiguousarray(q.T))
    ids = node.inputs[1]
    g = ir.Node(
        "",
        "Gather",
        [qt, ids],
        attributes=[ir.AttrInt64("axis", 0)],
        num_outputs=1,
        name=run.name(base + "_quant"),
    )
    g.outputs[0].name = run.name(base + "_rows_int8")
    nodes = [g]
    if o.per_channel:
        st = run.init(base + "_row_scale", scale.reshape(-1, 1))
        gs = ir.Node(
            "",
            "Gather",
            [st, ids],
            attributes=[ir.AttrInt64("axis", 0)],
            num_outputs=1,
            name=run.name(base + "_scale_gather"),
        )
        gs.outputs[0].name = run.name(base + "_row_scales")
        cast = ir.Node(
            "",
            "Cast",
            [g.outputs[0]],
            attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)],
            num_outputs=1,
            name=run.name(base + "_cast"),
        )
        cast.outputs[0].name = run.name(base + "_rows_float")
        last = ir.Node(
            "", "Mul", [cast.outputs[0], gs.outputs[0]], num_outputs=1, name=run.name(base + "_dequant")
        )
        nodes += [gs, cast, last]
    else:
        last = ir.Node(
            "",
            "DequantizeLinear",
            [g.outputs[0], run.init(base + "_scale", scale), run.init(base + "_zero_point", zp)],
            num_outputs=1,
            name=run.name(base + "_dequant"),
        )
        nodes.append(last)
    for n in nodes:
        graph.insert_before(node, n)
    run.replace_node(node, last.outputs[0], base + "_dequant_out", "Gather")

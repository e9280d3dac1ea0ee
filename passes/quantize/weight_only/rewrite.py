"""Rewrites of ``quantize-weight-only``: a MatMul-like site becomes ``com.microsoft.MatMulNBits``
(bias as its bias input) and an embedding Gather ``GatherBlockQuantized`` (uint8 data packed along
hidden, ``quantize_axis=1``); the float weights they replaced go when nothing else reads them.

The two ops take the same bytes: MatMulNBits' levels ``[N, k_blocks, blob]`` are, row by row,
GatherBlockQuantized's ``[N, k_blocks * blob]``, and both read scales ``[N, k_blocks]``, packed
zero points ``[N, ceil(k_blocks * bits / 8)]`` and, without zero points, level ``2^(bits-1)`` as
zero. So a table tied to an LM head is stored once: the Gather reads the LM head's levels through
a Reshape (as onnxruntime-genai's model builder does)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from ...ir_helpers import MS_DOMAIN, new_initializer, unique_name
from .blocks import QuantizedWeight, dequantize, pack_blocks
from .sites import Site

__all__ = ["Inits", "drop_unused", "error_row", "initializers", "rewrite_gather", "rewrite_matmul"]

#: A quantized weight's initializers: packed levels, scales, packed zero points (asymmetric).
Inits = tuple[ir.Value, ir.Value, ir.Value | None]


def initializers(
    graph: ir.Graph, qw: QuantizedWeight, base: str, taken: set[str], *, rows: bool = False
) -> Inits:
    """The packed levels, scales and (asymmetric) packed zero points of ``qw`` as initializers:
    levels as MatMulNBits reads them, ``[N, k_blocks, blob]``, or with ``rows`` as
    GatherBlockQuantized does, ``[N, k_blocks * blob]`` (the same bytes: a block is whole bytes)."""
    n, nb, _ = qw.q.shape
    packed = pack_blocks(qw.q, qw.bits)
    if rows:
        packed = packed.reshape(n, -1)
    b = new_initializer(graph, f"{base}_q{qw.bits}", packed, taken)
    s = new_initializer(graph, f"{base}_scales", qw.scales.reshape(n, nb), taken)
    z = None
    if qw.zero_points is not None:
        z = new_initializer(graph, f"{base}_zero_points", pack_blocks(qw.zero_points, qw.bits), taken)
    return b, s, z


def rewrite_matmul(
    graph: ir.Graph,
    site: Site,
    qw: QuantizedWeight,
    inits: Inits,
    taken: set[str],
    accuracy_level: int,
) -> None:
    """Replace ``site.node`` by MatMulNBits on the weight's initializers ``inits``."""
    node = site.node
    b, s, z = inits
    inputs: list[ir.Value | None] = [node.inputs[0], b, s, z]
    if site.bias is not None:
        bias = new_initializer(graph, f"{site.weight.name or 'weight'}_bias", site.bias, taken)
        inputs += [None, bias]
    while inputs and inputs[-1] is None:
        inputs.pop()
    n, k = site.w.shape
    new = ir.Node(
        MS_DOMAIN,
        "MatMulNBits",
        inputs,
        attributes=[
            ir.AttrInt64("K", k),
            ir.AttrInt64("N", n),
            ir.AttrInt64("bits", qw.bits),
            ir.AttrInt64("block_size", qw.block_size),
            ir.AttrInt64("accuracy_level", accuracy_level),
        ],
        num_outputs=1,
        name=node.name,
        version=1,
    )
    _replace(graph, node, [new])


def rewrite_gather(
    graph: ir.Graph,
    node: ir.Node,
    qw: QuantizedWeight,
    inits: Inits,
    taken: set[str],
) -> None:
    """Replace an embedding Gather by GatherBlockQuantized on the quantized table ``qw`` stored in
    ``inits`` (see :func:`initializers`). Levels stored for MatMulNBits (a table tied to an LM
    head, stored once) are read through a Reshape to rows; a hidden size that is not a multiple of
    the block size is gathered padded and sliced back."""
    data, scales, zero_points = inits
    v, nb, bs = qw.q.shape
    new: list[ir.Node] = []
    if data.shape is not None and data.shape.rank() == 3:
        row_bytes = nb * bs * qw.bits // 8
        shape = new_initializer(graph, f"{data.name}_rows_shape", np.array([v, row_bytes], np.int64), taken)
        reshape = ir.Node("", "Reshape", [data, shape], name=f"{node.name}/Reshape")
        reshape.outputs[0].name = unique_name(graph, f"{data.name}_rows", taken)
        reshape.outputs[0].type = ir.TensorType(ir.DataType.UINT8)
        reshape.outputs[0].shape = ir.Shape([v, row_bytes])
        new.append(reshape)
        data = reshape.outputs[0]
    inputs: list[ir.Value | None] = [data, node.inputs[1], scales]
    if zero_points is not None:
        inputs.append(zero_points)
    gather = ir.Node(
        MS_DOMAIN,
        "GatherBlockQuantized",
        inputs,
        attributes=[
            ir.AttrInt64("bits", qw.bits),
            ir.AttrInt64("block_size", bs),
            ir.AttrInt64("gather_axis", 0),
            ir.AttrInt64("quantize_axis", 1),
        ],
        num_outputs=1,
        name=node.name,
        version=1,
    )
    new.append(gather)
    if qw.k != nb * bs:  # padded rows: keep the first k values of each
        out = node.outputs[0]
        gather.outputs[0].name = unique_name(graph, f"{out.name or 'embedding'}_padded", taken)
        gather.outputs[0].type = out.type
        if out.shape is not None:
            gather.outputs[0].shape = ir.Shape([*list(out.shape)[:-1], nb * bs])
        bounds = [
            new_initializer(graph, f"{node.name or 'embedding'}_{what}", np.array([x], np.int64), taken)
            for what, x in (("start", 0), ("end", qw.k), ("axis", -1))
        ]
        new.append(ir.Node("", "Slice", [gather.outputs[0], *bounds], name=f"{node.name}/Slice"))
    _replace(graph, node, new)


def drop_unused(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Remove the float weights the pass replaced, where nothing else reads them (and the
    Transpose an unfused transposed weight was read through, then its input)."""
    outputs = {id(v) for v in graph.outputs}
    seen: set[int] = set()
    pending = list(values)
    while pending:
        v = pending.pop(0)
        if id(v) in seen or v.uses() or id(v) in outputs or v.is_graph_input():
            continue
        seen.add(id(v))
        p = v.producer()
        if v.name and graph.initializers.get(v.name) is v:
            graph.initializers.pop(v.name)
        elif p is not None and p.graph is graph and p.domain == "" and p.op_type in ("Constant", "Transpose"):
            inputs = [i for i in p.inputs if i is not None]
            graph.remove(p, safe=True)
            pending.extend(inputs)


def error_row(site: Site, qw: QuantizedWeight, h: np.ndarray | None) -> dict[str, Any]:
    """Report row of one quantized weight: relative squared error of the weight and, with
    calibration data, weighted by the input's per-channel energy ``diag(H)`` (an output-error proxy)."""
    n, k = site.w.shape
    w = site.w.astype(np.float64)
    d = dequantize(qw).astype(np.float64) - w
    row: dict[str, Any] = {
        "weight": site.weight.name or "",
        "K": int(k),
        "N": int(n),
        "nodes": len(site.weight.uses()),
        "rel_error": round(float(np.sum(d * d) / max(np.sum(w * w), 1e-30)), 8),
    }
    if h is not None:
        e = np.diag(h)
        row["act_weighted_error"] = round(
            float(np.sum(e * np.sum(d * d, axis=0)) / max(float(np.sum(e * np.sum(w * w, axis=0))), 1e-30)), 8
        )
    return row


def _replace(graph: ir.Graph, old: ir.Node, new: list[ir.Node]) -> None:
    """Replace ``old`` by the chain ``new`` (the last node's output takes ``old``'s place)."""
    out, new_out = old.outputs[0], new[-1].outputs[0]
    new_out.shape, new_out.type = out.shape, out.type
    ir.convenience.replace_nodes_and_values(graph, old, [old], new, [out], [new_out])

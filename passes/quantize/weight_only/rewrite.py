"""Rewrites of ``quantize-weight-only``: a MatMul-like site becomes ``com.microsoft.MatMulNBits``
(bias as its bias input) and an embedding Gather ``GatherBlockQuantized`` (uint8 data packed along
hidden, ``quantize_axis=1``); the float weights they replaced go when nothing else reads them.

The two ops take the same bytes: MatMulNBits' levels ``[N, k_blocks, blob]`` are, row by row,
GatherBlockQuantized's ``[N, k_blocks * blob]``, and both read scales ``[N, k_blocks]``, packed
zero points ``[N, ceil(k_blocks * bits / 8)]`` and, without zero points, level ``2^(bits-1)`` as
zero. So a table tied to an LM head is stored once: the Gather reads the LM head's levels through
a Reshape (as onnxruntime-genai's model builder does).

A weight with float block offsets (:func:`.blocks.quantize_offset`) reads its input with the
input's block sums appended (Reshape, ReduceSum, Concat; made once per input, so the weights that
share an input still share it and ``lower-ort-cpu`` can pack them)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from ...ir_helpers import MS_DOMAIN, new_initializer, unique_name
from .blocks import QuantizedWeight, dequantize, pack_blocks, with_offset_columns
from .sites import Site

__all__ = [
    "Inits",
    "drop_unused",
    "error_row",
    "initializers",
    "rewrite_gather",
    "rewrite_matmul",
    "with_block_sums",
]

#: A quantized weight's initializers: packed levels, scales, packed zero points (asymmetric).
Inits = tuple[ir.Value, ir.Value, ir.Value | None]


def initializers(
    graph: ir.Graph, qw: QuantizedWeight, base: str, taken: set[str], *, rows: bool = False
) -> Inits:
    """The packed levels, scales and (asymmetric) packed zero points of ``qw`` as initializers:
    levels as MatMulNBits reads them, ``[N, k_blocks, blob]``, or with ``rows`` as
    GatherBlockQuantized does, ``[N, k_blocks * blob]`` (the same bytes: a block is whole bytes).
    A weight with offsets is stored as :func:`.blocks.with_offset_columns` makes it."""
    if qw.offsets is not None:
        qw = with_offset_columns(qw)
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


def with_block_sums(
    graph: ir.Graph, x: ir.Value, k: int, block_size: int, taken: set[str], made: dict[int, ir.Value]
) -> ir.Value:
    """``Concat(x, block sums of x)`` along the last axis (``[..., K + K / block_size]``), built
    once per ``x`` (``made``) right after its producer. ``x`` has a known rank and a last
    dimension ``k`` (the weight's K) that is a multiple of ``block_size``."""
    if id(x) in made:
        return made[id(x)]
    assert x.shape is not None and k % block_size == 0
    rank = x.shape.rank()
    base = x.name or "input"
    shape = new_initializer(
        graph,
        f"{base}_blocks_shape",
        np.array([0] * (rank - 1) + [k // block_size, block_size], np.int64),
        taken,
    )
    reshape = ir.Node("", "Reshape", [x, shape], name=unique_name(graph, f"{base}/blocks", taken))
    opset = int(graph.opset_imports.get("", 13) or 13)
    if opset >= 13:
        axes = new_initializer(graph, f"{base}_blocks_axis", np.array([-1], np.int64), taken)
        total = ir.Node("", "ReduceSum", [reshape.outputs[0], axes], attributes=[ir.AttrInt64("keepdims", 0)])
    else:
        total = ir.Node(
            "",
            "ReduceSum",
            [reshape.outputs[0]],
            attributes=[ir.AttrInt64s("axes", [-1]), ir.AttrInt64("keepdims", 0)],
        )
    total.name = unique_name(graph, f"{base}/block_sums", taken)
    concat = ir.Node("", "Concat", [x, total.outputs[0]], attributes=[ir.AttrInt64("axis", -1)])
    concat.name = unique_name(graph, f"{base}/with_block_sums", taken)
    dims = list(x.shape)
    for node, suffix, out_shape in (
        (reshape, "blocks", [*dims[:-1], k // block_size, block_size]),
        (total, "block_sums", [*dims[:-1], k // block_size]),
        (concat, "with_block_sums", [*dims[:-1], k + k // block_size]),
    ):
        node.outputs[0].name = unique_name(graph, f"{base}_{suffix}", taken)
        node.outputs[0].type = x.type
        node.outputs[0].shape = ir.Shape(out_shape)
    producer = x.producer()
    chain = [reshape, total, concat]
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, chain)
    else:
        graph.insert_before(next(iter(graph)), chain)
    made[id(x)] = concat.outputs[0]
    return concat.outputs[0]


def rewrite_matmul(
    graph: ir.Graph,
    site: Site,
    qw: QuantizedWeight,
    inits: Inits,
    taken: set[str],
    accuracy_level: int,
    block_sums: dict[int, ir.Value] | None = None,
) -> None:
    """Replace ``site.node`` by MatMulNBits on the weight's initializers ``inits`` (with offsets:
    those of :func:`.blocks.with_offset_columns`, read against the input with its block sums;
    ``block_sums`` holds the inputs made so far)."""
    node = site.node
    b, s, z = inits
    x = node.inputs[0]
    n, k = site.w.shape
    if qw.offsets is not None:
        assert x is not None
        x = with_block_sums(graph, x, k, qw.block_size, taken, {} if block_sums is None else block_sums)
        k += k // qw.block_size
    inputs: list[ir.Value | None] = [x, b, s, z]
    if site.bias is not None:
        bias = new_initializer(graph, f"{site.weight.name or 'weight'}_bias", site.bias, taken)
        inputs += [None, bias]
    while inputs and inputs[-1] is None:
        inputs.pop()
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

"""Rewrites of ``quantize-weight-only``: a MatMul/Gemm becomes ``com.microsoft.MatMulNBits`` (bias
as its bias input) and an embedding Gather ``GatherBlockQuantized`` (uint8 data packed along
hidden, ``quantize_axis=1``); the float weights they replaced go when nothing else reads them."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from ...ir_helpers import MS_DOMAIN, new_initializer
from .blocks import QuantizedWeight, dequantize, pack_blocks, quantize_rtn
from .options import WeightOnlyOptions
from .sites import Site

__all__ = ["drop_unused", "error_row", "initializers", "rewrite_gather", "rewrite_matmul"]


def initializers(
    graph: ir.Graph, qw: QuantizedWeight, base: str, taken: set[str]
) -> tuple[ir.Value, ir.Value, ir.Value | None]:
    """The packed levels, scales and (asymmetric) packed zero points of ``qw`` as initializers."""
    n, nb, _ = qw.q.shape
    packed = pack_blocks(qw.q, qw.bits)
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
    inits: tuple[ir.Value, ir.Value, ir.Value | None],
    taken: set[str],
    accuracy_level: int,
) -> None:
    """Replace ``site.node`` by MatMulNBits on the weight's initializers ``inits``."""
    node = site.node
    b, s, z = inits
    inputs: list[ir.Value | None] = [node.inputs[0], b, s, z]
    if site.bias is not None:
        bias = new_initializer(graph, f"{node.inputs[1].name or 'weight'}_bias", site.bias, taken)
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
    _replace(graph, node, new)


def rewrite_gather(
    graph: ir.Graph, node: ir.Node, w: np.ndarray, taken: set[str], o: WeightOnlyOptions
) -> None:
    """Replace an embedding Gather by GatherBlockQuantized on the RTN-quantized table ``w``."""
    qw = quantize_rtn(w, o.bits, o.block_size, o.symmetric, w.dtype.type, o.scale_search)
    v, h = w.shape
    base = node.inputs[0].name or "embedding"
    data = new_initializer(graph, f"{base}_q{o.bits}", pack_blocks(qw.q.reshape(v, h), o.bits), taken)
    scales = new_initializer(graph, f"{base}_scales", qw.scales, taken)
    inputs: list[ir.Value | None] = [data, node.inputs[1], scales]
    if qw.zero_points is not None:
        inputs.append(
            new_initializer(graph, f"{base}_zero_points", pack_blocks(qw.zero_points, o.bits), taken)
        )
    new = ir.Node(
        MS_DOMAIN,
        "GatherBlockQuantized",
        inputs,
        attributes=[
            ir.AttrInt64("bits", o.bits),
            ir.AttrInt64("block_size", o.block_size),
            ir.AttrInt64("gather_axis", 0),
            ir.AttrInt64("quantize_axis", 1),
        ],
        num_outputs=1,
        name=node.name,
        version=1,
    )
    _replace(graph, node, new)


def drop_unused(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Remove the float weights the pass replaced, where nothing else reads them."""
    outputs = {id(v) for v in graph.outputs}
    seen: set[int] = set()
    for v in values:
        if id(v) in seen or v.uses() or id(v) in outputs or v.is_graph_input():
            continue
        seen.add(id(v))
        if v.name and graph.initializers.get(v.name) is v:
            graph.initializers.pop(v.name)
        elif (p := v.producer()) is not None and p.op_type == "Constant" and p.graph is graph:
            graph.remove(p, safe=True)


def error_row(site: Site, qw: QuantizedWeight, h: np.ndarray | None) -> dict[str, Any]:
    """Report row of one quantized weight: relative squared error of the weight and, with
    calibration data, weighted by the input's per-channel energy ``diag(H)`` (an output-error proxy)."""
    n, k = site.w.shape
    w = site.w.astype(np.float64)
    d = dequantize(qw).astype(np.float64) - w
    row: dict[str, Any] = {
        "weight": site.node.inputs[1].name or "",
        "K": int(k),
        "N": int(n),
        "nodes": len(site.node.inputs[1].uses()),
        "rel_error": round(float(np.sum(d * d) / max(np.sum(w * w), 1e-30)), 8),
    }
    if h is not None:
        e = np.diag(h)
        row["act_weighted_error"] = round(
            float(np.sum(e * np.sum(d * d, axis=0)) / max(float(np.sum(e * np.sum(w * w, axis=0))), 1e-30)), 8
        )
    return row


def _replace(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    out, new_out = old.outputs[0], new.outputs[0]
    new_out.shape, new_out.type = out.shape, out.type
    ir.convenience.replace_nodes_and_values(graph, old, [old], [new], [out], [new_out])

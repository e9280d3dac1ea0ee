"""``pack-sibling-matmulnbits``: MatMulNBits nodes that read the same input (a decoder layer's Q, K
and V projections; its gate and up projections) become one MatMulNBits over their weights stacked
along N, then a ``Split`` back into the original outputs.

Why: at one token per step (LLM decode) each MatMulNBits is a small, memory-bound product whose
fixed cost (a thread-pool dispatch, the activation's int8 quantization under
``accuracy_level=4``) is a large share of its time; one product over the stacked weights pays that
cost once and reads the same bytes. onnxruntime-genai's builder packs these projections when it
writes the graph; here the packing is a rewrite of whatever the quantizer produced, so it applies
to any model.

Safe because the stacked weight is the same blocks, scales (and zero points, and bias) row for
row: output column ``j`` of the packed product is computed exactly as before. Only siblings with
equal ``K``, ``bits``, ``block_size``, ``accuracy_level``, input dtype and the same optional inputs
are packed, each of whose weight tensors has no other reader (so nothing is stored twice).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..ir_helpers import MS_DOMAIN, constant_array, model_opset, take_place, unique_name

__all__ = ["pack_sibling_nbits"]

#: Attributes MatMulNBits siblings must agree on (any other attribute: not packed).
_SAME = ("K", "bits", "block_size", "accuracy_level")


def _signature(node: ir.Node) -> tuple | None:
    """What siblings must share to be packed, or None when the node cannot take part."""
    if node.domain != MS_DOMAIN or node.op_type != "MatMulNBits" or len(node.outputs) != 1:
        return None
    if set(node.attributes) - {*_SAME, "N"}:
        return None
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    a, b, scales, zp, g_idx, bias = inputs[:6]
    if a is None or b is None or scales is None or g_idx is not None:
        return None
    for v in (b, scales, zp, bias):
        if v is None:
            continue
        if constant_array(v) is None or len(v.uses()) != 1 or v.is_graph_output():
            return None  # shared (e.g. a tied table) or not constant: packing would copy it
    if zp is not None and zp.dtype != ir.DataType.UINT8:
        return None
    attrs = tuple(node.attributes.get_int(k, 0) for k in _SAME)
    return (id(a), attrs, zp is not None, bias is not None, scales.dtype)


def _stack(node_arrays: list[np.ndarray], rows: list[int]) -> np.ndarray:
    """Stack per-node arrays along N: each reshaped to ``[N, -1]`` first (scales may be flat)."""
    flat = node_arrays[0].ndim == 1
    parts = [a.reshape(n, -1) for a, n in zip(node_arrays, rows)]
    out = np.concatenate(parts, axis=0)
    return out.reshape(-1) if flat else out.reshape((-1, *node_arrays[0].shape[1:]))


def pack_sibling_nbits(model: ir.Model) -> int:
    """Pack each group of MatMulNBits siblings in the main graph; the number of groups packed."""
    graph = model.graph
    opset = model_opset(model)
    groups: dict[tuple, list[ir.Node]] = {}
    for node in graph:
        sig = _signature(node)
        if sig is not None:
            groups.setdefault(sig, []).append(node)
    taken: set[str] = set()
    count = 0
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        first = nodes[0]
        rows = [n.attributes.get_int("N") for n in nodes]
        packed_inputs: list[ir.Value | None] = [first.inputs[0], None, None, None, None, None]
        base = first.name or "matmulnbits"
        old_consts = [v for n in nodes for v in list(n.inputs)[1:] if v is not None]
        for idx, label in ((1, "B"), (2, "scales"), (3, "zero_points"), (5, "bias")):
            if idx >= len(first.inputs) or first.inputs[idx] is None:
                continue
            arrays = [constant_array(n.inputs[idx]) for n in nodes]
            stacked = _stack([a for a in arrays if a is not None], rows)
            name = unique_name(graph, f"{base}_packed_{label}", taken)
            value = ir.Value(
                name=name,
                shape=ir.Shape(stacked.shape),
                type=first.inputs[idx].type,
                const_value=ir.tensor(stacked, name=name),
            )
            graph.register_initializer(value)
            packed_inputs[idx] = value
        while packed_inputs[-1] is None:
            packed_inputs.pop()
        attrs = [ir.AttrInt64(k, first.attributes.get_int(k, 0)) for k in _SAME if k in first.attributes]
        attrs.append(ir.AttrInt64("N", int(sum(rows))))
        packed = ir.Node(MS_DOMAIN, "MatMulNBits", packed_inputs, attributes=attrs, name=f"{base}_packed")
        y = packed.outputs[0]
        y.name = unique_name(graph, f"{base}_packed_out", taken)
        y.type = first.outputs[0].type
        sizes_name = unique_name(graph, f"{base}_packed_sizes", taken)
        sizes = ir.Value(
            name=sizes_name,
            shape=ir.Shape([len(rows)]),
            type=ir.TensorType(ir.DataType.INT64),
            const_value=ir.tensor(np.array(rows, np.int64), name=sizes_name),
        )
        if opset >= 13:
            graph.register_initializer(sizes)
            split = ir.Node(
                "", "Split", [y, sizes], attributes=[ir.AttrInt64("axis", -1)], num_outputs=len(rows)
            )
        else:
            split = ir.Node(
                "",
                "Split",
                [y],
                attributes=[ir.AttrInt64("axis", -1), ir.AttrInt64s("split", rows)],
                num_outputs=len(rows),
            )
        split.name = f"{base}_packed_split"
        graph.insert_before(first, [packed, split])
        for node, out in zip(nodes, split.outputs):
            old = node.outputs[0]
            out.name = unique_name(graph, f"{old.name or base}_part", taken)
            out.type, out.shape = old.type, old.shape
            take_place(old, out)
        for node in nodes:
            graph.remove(node, safe=True)
        for v in old_consts:
            if v.name in graph.initializers and not v.uses():
                graph.initializers.pop(v.name)
        count += 1
    return count

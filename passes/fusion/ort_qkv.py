"""GroupQueryAttention's packed-QKV input form: one projection instead of three.

GroupQueryAttention takes ``query`` as ``[B, S, (H + 2·Hkv)·Dh]`` with key and value absent. Two
forms feed it that way:

* three ``MatMul``s of one input with constant weights (``[+ Add(constant bias)]`` on all three,
  Qwen2's QKV bias): the weights (and biases) are concatenated into one initializer, one MatMul
  (+ one Add) replaces them; the projections must feed nothing else;
* three last-axis ``Slice``s of one tensor that hold q, k and v in that order, back to back
  (Phi-3's ``qkv_proj``): the tensor itself is the packed input.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from ..ir_helpers import MS_DOMAIN, constant_array, graph_nodes, rank, unique_name
from .matching import is_op, single_use

logger = logging.getLogger("graphopt.passes.fusion")

__all__ = ["fuse_packed_qkv"]


def _projection(value: ir.Value) -> tuple[ir.Value, np.ndarray, np.ndarray | None, list[ir.Node]] | None:
    """``MatMul(x, W) [+ b]`` with constant 2-D W (and 1-D b): (x, W, b, nodes)."""
    node = value.producer()
    bias = None
    nodes = []
    if is_op(node, "Add"):
        for a, c in (node.inputs, node.inputs[::-1]):  # type: ignore[union-attr]
            arr = constant_array(c)
            if arr is not None and arr.ndim == 1 and a is not None and single_use(a):
                bias, nodes, node = arr, [node], a.producer()  # type: ignore[list-item]
                break
        else:
            return None
    if not is_op(node, "MatMul"):
        return None
    x, w = node.inputs  # type: ignore[union-attr]
    warr = constant_array(w)
    if x is None or warr is None or warr.ndim != 2:
        return None
    if bias is not None and (bias.shape[0] != warr.shape[1] or bias.dtype != warr.dtype):
        return None
    return x, warr, bias, [node, *nodes]  # type: ignore[list-item]


def _pack_matmuls(model: ir.Model, gqa: ir.Node, names: set[str]) -> bool:
    q, k, v = gqa.inputs[:3]
    if q is None or k is None or v is None or not all(single_use(t) for t in (q, k, v)):
        return False
    parts = [_projection(t) for t in (q, k, v)]
    if any(p is None for p in parts):
        return False
    xs = {id(p[0]) for p in parts}  # type: ignore[index]
    biases = [p[2] for p in parts]  # type: ignore[index]
    has_bias = [b is not None for b in biases]
    if len(xs) != 1 or len({p[1].dtype for p in parts}) != 1 or len(set(has_bias)) != 1:  # type: ignore[index]
        return False
    if len({p[1].shape[0] for p in parts}) != 1:  # type: ignore[index]
        return False
    graph = model.graph
    x = parts[0][0]  # type: ignore[index]
    weight = np.concatenate([p[1] for p in parts], axis=1)  # type: ignore[index]
    new_nodes = []
    w_name = unique_name(graph, "qkv_proj.weight", names)
    w_val = ir.Value(
        name=w_name,
        shape=ir.Shape(weight.shape),
        type=ir.TensorType(ir.DataType.from_numpy(weight.dtype)),
        const_value=ir.tensor(weight, name=w_name),
    )
    graph.register_initializer(w_val)
    mm = ir.node("MatMul", [x, w_val])
    new_nodes.append(mm)
    packed = mm.outputs[0]
    if biases[0] is not None:
        bias = np.concatenate(biases)  # type: ignore[arg-type]
        b_name = unique_name(graph, "qkv_proj.bias", names)
        b_val = ir.Value(
            name=b_name,
            shape=ir.Shape(bias.shape),
            type=ir.TensorType(ir.DataType.from_numpy(bias.dtype)),
            const_value=ir.tensor(bias, name=b_name),
        )
        graph.register_initializer(b_val)
        add = ir.node("Add", [packed, b_val])
        new_nodes.append(add)
        packed = add.outputs[0]
    for n in new_nodes:
        n.outputs[0].name = unique_name(graph, "qkv_proj", names)
        n.outputs[0].dtype = q.dtype
        n.outputs[0].shape = ir.Shape([*list(q.shape)[:-1], weight.shape[1]]) if q.shape is not None else None  # type: ignore[misc]
    graph.insert_before(gqa, new_nodes)
    _set_packed(gqa, packed)
    return True


def _slices(gqa: ir.Node) -> ir.Value | None:
    """The tensor q, k, v are consecutive last-axis slices of (in that order), else None."""
    src = None
    pos = 0
    for t in gqa.inputs[:3]:
        node = t.producer() if t is not None else None
        if not is_op(node, "Slice") or len(node.inputs) < 4:  # type: ignore[union-attr]
            return None
        data = node.inputs[0]  # type: ignore[union-attr]
        if src is None:
            src = data
        if data is not src or rank(data) != 3 or t.shape is None:  # type: ignore[union-attr]
            return None
        starts, ends, axes = (constant_array(node.inputs[i]) for i in (1, 2, 3))  # type: ignore[union-attr]
        steps = constant_array(node.inputs[4]) if len(node.inputs) > 4 else np.array([1])  # type: ignore[union-attr]
        width = t.shape[-1]  # type: ignore[union-attr]
        if starts is None or ends is None or axes is None or steps is None or not isinstance(width, int):
            return None
        if (
            starts.size != 1
            or axes.size != 1
            or int(axes.reshape(-1)[0]) not in (-1, 2)
            or int(steps.reshape(-1)[0]) != 1
        ):
            return None
        if int(starts.reshape(-1)[0]) != pos or int(ends.reshape(-1)[0]) < pos + width:
            return None
        pos += width
    if src is None or src.shape is None or src.shape[-1] != pos:
        return None
    return src


def _set_packed(gqa: ir.Node, packed: ir.Value) -> None:
    gqa.replace_input_with(0, packed)
    gqa.replace_input_with(1, None)
    gqa.replace_input_with(2, None)


def fuse_packed_qkv(model: ir.Model) -> int:
    """Give every GroupQueryAttention with separate q, k, v projections the packed form."""
    names: set[str] = set()
    count = 0
    for node in list(graph_nodes(model)):
        if node.domain != MS_DOMAIN or node.op_type != "GroupQueryAttention" or node.graph is not model.graph:
            continue
        if len(node.inputs) < 3 or node.inputs[1] is None or node.inputs[2] is None:
            continue
        src = _slices(node)
        if src is not None:
            _set_packed(node, src)
            count += 1
        elif _pack_matmuls(model, node, names):
            count += 1
        else:
            logger.debug(
                "gqa-packed-projection: %s skipped (not one input's constant projections)", node.name
            )
    return count

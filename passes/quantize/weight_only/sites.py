"""Candidate checks of ``quantize-weight-only``: which MatMul/Gemm weights and embedding tables it
can rewrite, and why the others stay float.

Only constant 2-D float weights whose consumer's input dtype and rank are known are rewritten,
Gemm only with ``transA=0``, ``alpha=beta=1`` and a constant bias broadcastable to ``[N]``."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from ...ir_helpers import constant_array
from .options import WeightOnlyOptions

__all__ = ["FLOAT_DTYPES", "Site", "gather_table", "matmul_site"]

#: Weight dtypes the pass quantizes, with their numpy types (the scales keep the weight's dtype).
FLOAT_DTYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


@dataclasses.dataclass
class Site:
    """A MatMul/Gemm to rewrite: its weight (as ``W [N, K]``), bias and where the weight comes from."""

    node: ir.Node
    key: tuple[int, bool]  # (id of the weight value, transposed)
    w: np.ndarray
    dtype: ir.DataType
    bias: np.ndarray | None


def matmul_site(o: WeightOnlyOptions, node: ir.Node, graph_outputs: set[int]) -> tuple[Site | None, str]:
    """The site of a MatMul/Gemm, or None and why it stays float."""
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None, "missing inputs"
    a, b = node.inputs[0], node.inputs[1]
    w = constant_array(b)
    if w is None or b.is_graph_input():
        return None, "weight not constant"
    if b.dtype not in FLOAT_DTYPES or w.dtype != FLOAT_DTYPES[b.dtype]:
        return None, f"weight dtype {b.dtype} not float32/float16"
    if a.dtype is None:
        return None, "input dtype unknown"
    if a.dtype != b.dtype:
        return None, f"input dtype {a.dtype} differs from the weight's"
    if w.ndim != 2:
        return None, f"weight is {w.ndim}-D, not 2-D"
    if a.shape is None:
        return None, "input rank unknown"
    trans = False
    bias = None
    if node.op_type == "MatMul":
        if a.shape.rank() < 2:
            return None, "input is 1-D"
    else:  # Gemm
        attrs = node.attributes
        if attrs.get_int("transA", 0) != 0:
            return None, "Gemm transA=1"
        if attrs.get_float("alpha", 1.0) != 1.0:
            return None, "Gemm alpha != 1"
        trans = attrs.get_int("transB", 0) != 0
        n = w.shape[0] if trans else w.shape[1]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = constant_array(node.inputs[2])
            if c is None or node.inputs[2].is_graph_input():
                return None, "Gemm bias not constant"
            if attrs.get_float("beta", 1.0) != 1.0:
                return None, "Gemm beta != 1"
            if c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2:
                return None, f"Gemm bias {c.shape} is not broadcast over rows"
            bias = np.broadcast_to(c.reshape(-1), (n,)).astype(w.dtype)
    wt = w if trans else w.T  # [N, K]
    n, k = wt.shape
    if k < 16:
        return None, f"K={k} < 16"
    if k * n < o.min_size:
        return None, f"too small ({k}x{n} < min_size {o.min_size})"
    if not o.lm_head and any(id(v) in graph_outputs for v in node.outputs):
        return None, "lm_head kept float"
    return Site(node, (id(b), trans), wt, b.dtype, bias), ""


def gather_table(o: WeightOnlyOptions, node: ir.Node) -> tuple[np.ndarray | None, str]:
    """The embedding table of a Gather, or None and why it stays float."""
    data = node.inputs[0] if node.inputs else None
    w = constant_array(data)
    if w is None or data is None or data.is_graph_input():
        return None, "data not constant"
    if data.dtype not in FLOAT_DTYPES or w.dtype != FLOAT_DTYPES[data.dtype]:
        return None, f"data dtype {data.dtype} not float32/float16"
    if w.ndim != 2:
        return None, f"data is {w.ndim}-D, not a [vocab, hidden] table"
    if node.attributes.get_int("axis", 0) not in (0, -2):
        return None, "gather axis is not 0"
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None, "missing indices"
    if w.shape[1] % o.block_size:
        return None, f"hidden {w.shape[1]} not a multiple of block_size {o.block_size}"
    if w.size < o.min_size:
        return None, f"too small ({w.shape[0]}x{w.shape[1]} < min_size {o.min_size})"
    return w, ""

"""Candidate checks of ``quantize-weight-only``: which MatMul-like weights and embedding tables it
can rewrite, and why the others stay float.

A site is a product ``x @ W^T`` with ``W [N, K]`` a constant 2-D float: a ``MatMul`` on a constant
(or on ``Transpose(constant, perm=[1, 0])``, the unfused tied LM head), a ``Gemm`` with ``transA=0``,
``alpha=beta=1`` and a constant bias broadcastable to ``[N]``, or a ``com.microsoft`` ``FusedMatMul``
that is a plain product (``alpha=1``, ``transA=0``, no batch transposes; ``fuse-ort`` makes one of
a tied LM head ``x @ E^T``). The consumer's input dtype and rank must be known.

:func:`tied_tables` pairs an embedding Gather with the site whose weight is the same table, so the
table is quantized once for both."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from ...ir_helpers import MS_DOMAIN, constant_array
from .options import WeightOnlyOptions

__all__ = ["FLOAT_DTYPES", "Site", "gather_table", "matmul_site", "tied_tables", "weight_source"]

#: Weight dtypes the pass quantizes, with their numpy types (the scales keep the weight's dtype).
FLOAT_DTYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


@dataclasses.dataclass
class Site:
    """A MatMul-like node to rewrite: its weight (as ``W [N, K]``), bias and where the weight
    comes from (``source``: the constant value; ``key``: its id and whether the node reads it
    transposed, so that sites with the same key share one quantized weight)."""

    node: ir.Node
    key: tuple[int, bool]  # (id of the weight value, transposed)
    w: np.ndarray
    dtype: ir.DataType
    bias: np.ndarray | None
    source: ir.Value | None = None

    @property
    def weight(self) -> ir.Value:
        """The constant value the weight is read from (through a Transpose for an unfused one)."""
        return self.source if self.source is not None else self.node.inputs[1]  # type: ignore[return-value]


def is_site_op(node: ir.Node) -> bool:
    """MatMul / Gemm (default domain) or com.microsoft FusedMatMul."""
    if node.domain == "":
        return node.op_type in ("MatMul", "Gemm")
    return node.domain == MS_DOMAIN and node.op_type == "FusedMatMul"


def weight_source(node: ir.Node) -> tuple[ir.Value, np.ndarray, bool] | None:
    """The constant second operand of a MatMul-like node, its array and whether it is reached
    through a default-domain ``Transpose(perm=[1, 0])`` of a 2-D constant; None when neither."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    b = node.inputs[1]
    w = constant_array(b)
    if w is not None:
        return b, w, False
    t = b.producer()
    if node.op_type != "MatMul" or t is None or t.op_type != "Transpose" or t.domain != "" or not t.inputs:
        return None
    src = t.inputs[0]
    w = constant_array(src)
    if src is None or w is None or w.ndim != 2:
        return None
    perm = t.attributes.get_ints("perm", None)
    if perm is not None and list(perm) != [1, 0]:
        return None
    return src, w, True


def matmul_site(o: WeightOnlyOptions, node: ir.Node, graph_outputs: set[int]) -> tuple[Site | None, str]:
    """The site of a MatMul/Gemm/FusedMatMul, or None and why it stays float."""
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None, "missing inputs"
    a = node.inputs[0]
    found = weight_source(node)
    if found is None or found[0].is_graph_input():
        return None, "weight not constant"
    b, w, via_transpose = found
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
    trans = via_transpose
    bias = None
    attrs = node.attributes
    if node.op_type in ("MatMul", "FusedMatMul"):
        if a.shape.rank() < 2:
            return None, "input is 1-D"
        if node.op_type == "FusedMatMul":
            if attrs.get_float("alpha", 1.0) != 1.0:
                return None, "FusedMatMul alpha != 1"
            if attrs.get_int("transA", 0) != 0:
                return None, "FusedMatMul transA=1"
            if attrs.get_int("transBatchA", 0) != 0 or attrs.get_int("transBatchB", 0) != 0:
                return None, "FusedMatMul transBatchA/B=1"
            trans = attrs.get_int("transB", 0) != 0
    else:  # Gemm
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
    return Site(node, (id(b), trans), wt, b.dtype, bias, b if via_transpose else None), ""


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
    if w.shape[1] < 16:
        return None, f"hidden {w.shape[1]} < 16"
    if w.size < o.min_size:
        return None, f"too small ({w.shape[0]}x{w.shape[1]} < min_size {o.min_size})"
    return w, ""


def tied_tables(gathers: list[tuple[ir.Node, np.ndarray]], sites: list[Site]) -> dict[int, tuple[int, bool]]:
    """``{id(gather node): site key}`` for each embedding Gather whose table is the weight of a
    site read as ``x @ table^T`` (a tied LM head): the same value, or a copy equal to it element
    for element (constant folding may have materialized ``Transpose(table)`` as a new constant)."""
    by_shape: dict[tuple[tuple[int, ...], str], list[Site]] = {}
    for s in sites:
        by_shape.setdefault((s.w.shape, s.w.dtype.str), []).append(s)
    tied: dict[int, tuple[int, bool]] = {}
    for node, table in gathers:
        data = node.inputs[0]
        candidates = by_shape.get((table.shape, table.dtype.str), [])
        same = [s for s in candidates if s.key == (id(data), True)]
        if not same:
            same = [s for s in candidates if np.array_equal(s.w, table)]
        if same:
            tied[id(node)] = same[0].key
    return tied

"""FusedMatMul (com.microsoft) with a constant weight back to a MatMul the pass can quantize.

Why: ``fuse-ort`` turns ``Transpose → MatMul`` and ``MatMul · c`` into ``FusedMatMul``, which has no
int8 kernel; on an OCR recognizer (SVTR) that hid the classifier (a 120×18710 weight, nearly half
of the model's bytes) from quantize-dynamic without a line in the report. Here, before planning,
each such node whose weight the pass would quantize becomes ``[Transpose →] MatMul`` with
``alpha`` and ``transB`` folded into a new weight constant; the MatMul keeps the node's name, so
``include``/``exclude`` and the report rows name it as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from ...ir_helpers import MS_DOMAIN, take_place
from .plan import const_weight, weight_problem

if TYPE_CHECKING:
    from .run import Run

__all__ = ["unfuse_matmuls"]


def unfuse_matmuls(run: Run, selected: Callable[[ir.Node], bool]) -> int:
    """Rewrite every FusedMatMul with a constant 2-D float32 weight that ``selected`` (given the
    MatMul it would become) lets through; returns how many were rewritten."""
    done = 0
    for node in list(run.graph):
        if node.op_type != "FusedMatMul" or node.domain != MS_DOMAIN or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        attrs = node.attributes
        batch_transposed = attrs.get_int("transBatchA", 0) != 0 or attrs.get_int("transBatchB", 0) != 0
        if a is None or batch_transposed:
            continue
        w = const_weight(b)
        if w is None or w.ndim != 2 or w.dtype != np.float32:
            continue
        trans_a = attrs.get_int("transA", 0)
        if trans_a and (a.shape is None or len(a.shape) < 2):
            continue  # the Transpose needs the rank
        if attrs.get_int("transB", 0):
            w = np.ascontiguousarray(w.T)
        alpha = attrs.get_float("alpha", 1.0)
        if alpha != 1.0:
            w = (w * np.float32(alpha)).astype(np.float32)
        if weight_problem(run, w, "weight") or not selected(ir.Node("", "MatMul", [], name=node.name)):
            continue
        base = node.name or "fused_matmul"
        x = a
        if trans_a:
            assert a.shape is not None
            r = len(a.shape)
            perm = [*range(r - 2), r - 1, r - 2]
            t = ir.Node(
                "",
                "Transpose",
                [a],
                attributes=[ir.AttrInt64s("perm", perm)],
                name=run.name(base + "_transA"),
            )
            x = t.outputs[0]
            x.name, x.type = run.name(base + "_transposed"), a.type
            x.shape = ir.Shape([a.shape[i] for i in perm])
            run.graph.insert_before(node, t)
        mm = ir.Node("", "MatMul", [x, run.init(base + "_W", w)])
        run.graph.insert_before(node, mm)
        out = node.outputs[0]
        y = mm.outputs[0]
        y.name, y.shape, y.type = run.name(base + "_out"), out.shape, out.type
        take_place(out, y)
        run.graph.remove(node, safe=True)
        mm.name = node.name or run.name(base)
        run.count("unfused:FusedMatMul")
        done += 1
    return done

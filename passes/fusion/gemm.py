"""Gemm formation: ``MatMul + Add(bias)`` → Gemm, Transpose folded into ``transA``/``transB``, and
a Transpose of a constant weight folded into the weight. Standard ONNX, for every backend.

onnxscript's MatMul+Add rules with the bias and dtype checks they lack, and two own rules
(see :func:`_rules`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import _matmul_add_to_gemm as osgemm

from ..ir_helpers import fresh_name, infer_shapes
from ._base import STANDARD, FusionPass, FusionRule, from_onnxscript
from .matching import is_op, same_dim

__all__ = ["FuseGemmPass", "GEMM_RULES"]

_GEMM_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})


def bias_reason(c: ir.Value | None, m: Any, n: Any) -> str | None:
    """Why ``c`` does not broadcast unidirectionally to ``[m, n]`` (None when it does)."""
    if c is None or c.shape is None:
        return "bias shape unknown"
    dims = list(c.shape)
    if len(dims) > 2:
        return f"bias {c.shape} has rank > 2: the Add output is not [M, N]"
    for d, target in zip(reversed(dims), (n, m)):
        if not (d == 1 or same_dim(d, target)):
            return f"bias {c.shape} does not broadcast to [{m}, {n}]"
    return None


class _CheckedGemm:
    """onnxscript's check (A and B 2-D) plus the bias shape and dtype checks it lacks."""

    trans_a: ClassVar[bool]
    trans_b: ClassVar[bool]

    def check(self, context, input_a, input_b, input_c=None, **kw):
        result = super().check(context, input_a, input_b, **kw)  # type: ignore[misc]
        if not result:
            return result
        if input_a.dtype not in _GEMM_TYPES or input_a.dtype != input_b.dtype:
            return result.fail(f"dtype {input_a.dtype} has no Gemm kernel")
        if input_c is None or input_c.dtype != input_a.dtype:
            return result.fail("bias dtype differs")
        m = input_a.shape[1 if self.trans_a else 0]
        n = input_b.shape[0 if self.trans_b else 1]
        if (reason := bias_reason(input_c, m, n)) is not None:
            return result.fail(reason)
        return result


class _MatMulAdd(_CheckedGemm, osgemm.MatMulAddToGemm):
    pass


class _TransAMatMulAdd(_CheckedGemm, osgemm.TransAMatMulAddToGemm):
    pass


class _TransBMatMulAdd(_CheckedGemm, osgemm.TransBMatMulAddToGemm):
    pass


class _TransABMatMulAdd(_CheckedGemm, osgemm.TransABMatMulAddToGemm):
    pass


def _transpose_perm(node: ir.Node, rank: int | None) -> list[int] | None:
    attr = node.attributes.get("perm")
    if attr is not None:
        return list(attr.as_ints())
    return None if rank is None else list(reversed(range(rank)))


def fold_transpose_into_gemm(model: ir.Model) -> int:
    """``Gemm(Transpose(A), Transpose(B))`` → ``Gemm(A, B)`` with transA/transB flipped."""
    count = 0
    for graph in model.graphs():
        for node in list(graph):
            if not is_op(node, "Gemm") or len(node.inputs) < 2:
                continue
            inputs = list(node.inputs)
            attrs = dict(node.attributes)
            absorbed = []
            for slot, key in ((0, "transA"), (1, "transB")):
                t = inputs[slot].producer() if inputs[slot] is not None else None
                # A Gemm input is 2-D, so a Transpose without perm is the 2-D swap.
                if not is_op(t, "Transpose") or t.graph is not graph or _transpose_perm(t, 2) != [1, 0]:
                    continue
                inputs[slot] = t.inputs[0]
                attrs[key] = ir.AttrInt64(key, 1 - node.attributes.get_int(key, 0))
                absorbed.append(t)
            if not absorbed:
                continue
            new = ir.Node(
                node.domain,
                "Gemm",
                inputs,
                attributes=list(attrs.values()),
                name=node.name,
                version=node.version,
            )
            ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)
            for t in dict.fromkeys(absorbed):
                if t.graph is graph and not any(o.uses() or o.is_graph_output() for o in t.outputs):
                    graph.remove(t, safe=True)
            count += 1
    return count


def fold_transposed_weights(model: ir.Model) -> int:
    """``MatMul/Gemm(·, Transpose(W))`` with W an initializer used only there → ``Wᵀ``."""
    count = 0
    for graph in model.graphs():
        for node in list(graph):
            if not is_op(node, "Transpose") or not node.inputs or node.inputs[0] is None:
                continue
            w, out = node.inputs[0], node.outputs[0]
            if (
                w.name is None
                or graph.initializers.get(w.name) is not w
                or w.const_value is None
                or w.is_graph_input()
                or w.is_graph_output()
                or len(w.uses()) != 1
                or out.is_graph_output()
                or not out.uses()
                or not all(is_op(u, "MatMul") or is_op(u, "Gemm") for u, _ in out.uses())
            ):
                continue
            try:
                arr = w.const_value.numpy()
            except Exception:  # unreadable external data
                continue
            perm = _transpose_perm(node, arr.ndim)
            if perm is None or sorted(perm) != list(range(arr.ndim)):
                continue
            name = fresh_name(graph, f"{w.name}_transposed")
            tensor = ir.tensor(np.ascontiguousarray(arr.transpose(perm)), name=name)
            new = ir.Value(
                name=name, type=ir.TensorType(w.dtype), shape=ir.Shape(tensor.shape), const_value=tensor
            )
            graph.register_initializer(new)
            out.replace_all_uses_with(new)
            graph.remove(node, safe=True)
            del graph.initializers[w.name]
            count += 1
    return count


def _rules() -> list[FusionRule]:
    """The rules in order, and why each is ours or checked:

    * ``matmul-add``: onnxscript's ``matmul_add_to_gemm_rule`` and its ``transpose_a/b/ab`` variants
      (``rules.common._matmul_add_to_gemm``). They check that A and B are 2-D but not the bias: Add
      broadcasts both ways, Gemm's C only one way to ``[M, N]``, so ``MatMul([M,K],[K,N]) + c[B,M,N]``
      (or ``c[1,1,N]``) would become a Gemm of the wrong rank. We add that check (C of rank ≤ 2 whose
      dims are 1 or provably equal to M/N), a dtype check (float, float16, double: what the Gemm
      kernels implement), and apply them with Add's operands in either order.
    * ``transpose-into-gemm`` (own): ``Gemm(Transpose(A))`` → ``Gemm(A, transA=1-transA)``, the same
      for B. Over onnx_ir nodes rather than a pattern, because it only rewires one Gemm input: the
      Transpose may keep other consumers (the pattern matcher would refuse those), and is deleted
      when none is left.
    * ``transpose-weight`` (own): ``MatMul(x, Transpose(W))`` with W a constant initializer whose
      only use is that Transpose → ``MatMul(x, Wᵀ)`` with a transposed copy of W. Only then: a W used
      elsewhere would have to be kept too, doubling its memory.
    """
    matmul_add = pattern.RewriteRuleSet(
        [_TransABMatMulAdd.rule(), _TransAMatMulAdd.rule(), _TransBMatMulAdd.rule(), _MatMulAdd.rule()],
        commute=True,
    )
    return [
        # Gemm's C broadcasts unidirectionally since opset 7 (opset 6 needs a broadcast attribute).
        FusionRule(
            "matmul-add",
            "MatMul (2-D, optionally of 2-D Transposes) + Add(bias) → Gemm",
            from_onnxscript(matmul_add),
            STANDARD,
            min_opset=7,
        ),
        FusionRule(
            "transpose-into-gemm",
            "Gemm(Transpose(A), Transpose(B)) → Gemm with transA/transB",
            fold_transpose_into_gemm,
            STANDARD,
        ),
        FusionRule(
            "transpose-weight",
            "Transpose of a constant weight of MatMul/Gemm → transposed weight",
            fold_transposed_weights,
            STANDARD,
        ),
    ]


class FuseGemmPass(FusionPass):
    """Form Gemm from 2-D MatMul + bias Add and fold Transposes into Gemm flags or constant weights.

    Safe because Gemm is formed only when A and B are 2-D and the bias broadcasts to ``[M, N]``
    one way, intermediates with other consumers are kept, and a weight is transposed in place only
    when nothing else uses it. Standard ONNX, so it suits every backend. Needs shapes (runs shape
    inference). The order matters: ``matmul-add`` absorbs 2-D Transposes into Gemm flags for free
    before ``transpose-weight`` would copy a weight.
    """

    name = "fuse-gemm"
    RULES: ClassVar = tuple(_rules())

    def prepare(self, model: ir.Model) -> bool:
        return infer_shapes(model)


GEMM_RULES = FuseGemmPass.rule_list

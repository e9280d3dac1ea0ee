"""``lower-ort-cpu``: contrib forms that ONNX Runtime's CPU provider runs slower than the plain
ops they fuse, rewritten back into those ops, and quantized products packed; run by the ort-cpu
backend after fusion and quantization.

* ``pack-sibling-matmulnbits``: see :mod:`.pack_nbits`.

* ``skip-norm-to-sum``: ``SkipLayerNormalization(x, skip, gamma, beta, bias)`` →
  ``Sum(x, skip, bias)`` + ``LayerNormalization(gamma, beta)`` (and the RMS variant
  ``SkipSimplifiedLayerNormalization`` → ``Sum`` + ``SimplifiedLayerNormalization``).

  Why: ONNX Runtime 1.32's CPU ``SkipLayerNormalization`` kernel is slower than its
  ``LayerNormalization`` plus the element-wise add (measurements in
  ``benchmarks/results/lower_ort_cpu.md``). ``Sum`` rather than ``Add`` because ONNX Runtime's
  session-level ``SkipLayerNormFusion`` matches ``Add`` + ``LayerNormalization`` and would undo
  the rewrite at load time; ``Sum`` of two or three inputs is the same computation
  (multidirectional broadcasting, float32 adds) and is left alone.

  The fused op stays the intermediate form for everything before this pass (quantization folds
  SmoothQuant scales into its gamma/beta) and for ort-cuda, whose SkipLayerNormalization kernel is
  the fast one. A node is left fused when its mean / inverse-std outputs are used, when its
  attributes or inputs are not the plain float32 form, or when the model's opset has no
  ``LayerNormalization`` (< 17).
"""

from __future__ import annotations

from typing import ClassVar

import onnx_ir as ir

from ..fusion._base import CONTRIB, FusionPass, FusionRule
from ..ir_helpers import MS_DOMAIN, graph_nodes, model_opset, take_place
from .pack_nbits import pack_sibling_nbits

__all__ = ["LowerOrtCpuPass"]

#: The contrib ops' default epsilon when the attribute is absent (contrib_defs.cc).
_SKIP_EPSILON = 1e-12
#: (fused op, plain norm op, its domain, number of params after the two data inputs)
_SKIP_NORMS = {
    "SkipLayerNormalization": ("LayerNormalization", "", 2),
    # ORT registers SimplifiedLayerNormalization in the ONNX domain (see onnxscript's rms rules).
    "SkipSimplifiedLayerNormalization": ("SimplifiedLayerNormalization", "", 1),
}


def _float32(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def lower_skip_norms(model: ir.Model) -> int:
    """Rewrite each eligible skip-normalization node into ``Sum`` + the plain normalization."""
    if model_opset(model) < 17:
        return 0
    count = 0
    for node in graph_nodes(model):
        spec = _SKIP_NORMS.get(node.op_type)
        if spec is None or node.domain != MS_DOMAIN:
            continue
        norm_op, norm_domain, n_params = spec
        outs = list(node.outputs)
        if any(i < len(outs) and outs[i].uses() for i in (1, 2)) or any(
            i < len(outs) and outs[i].is_graph_output() for i in (1, 2)
        ):
            continue  # mean / inv_std_var are used: the plain op does not produce them
        if set(node.attributes) - {"epsilon"}:
            continue
        inputs = list(node.inputs)
        x, skip = inputs[0], inputs[1] if len(inputs) > 1 else None
        params = inputs[2 : 2 + n_params]
        bias = inputs[2 + n_params] if len(inputs) > 2 + n_params else None
        if skip is None or len(params) < 1 or params[0] is None:
            continue
        if not all(
            _float32(v)
            for v in (x, skip, *[p for p in params if p is not None], *([bias] if bias is not None else []))
        ):
            continue
        eps = node.attributes.get("epsilon")
        epsilon = float(eps.as_float()) if eps is not None else _SKIP_EPSILON
        graph = node.graph
        if graph is None:
            continue
        base = node.name or node.op_type
        terms = [x, skip] + ([bias] if bias is not None else [])
        total = ir.Node("", "Sum", terms, num_outputs=1, name=f"{base}_sum")
        s = total.outputs[0]
        s.name, s.type = f"{outs[0].name}_skip_sum", x.type
        s.shape = outs[0].shape if outs[0].shape is not None else x.shape
        norm_inputs = [s, *[p for p in params if p is not None]]
        norm = ir.Node(
            norm_domain,
            norm_op,
            norm_inputs,
            num_outputs=1,
            name=f"{base}_norm",
            attributes=[ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", epsilon)],
        )
        graph.insert_before(node, [total, norm])
        y = norm.outputs[0]
        y.type, y.shape = outs[0].type, outs[0].shape
        take_place(outs[0], y)
        if len(outs) > 3 and (outs[3].uses() or outs[3].is_graph_output()):
            take_place(outs[3], s)
        graph.remove(node, safe=True)
        count += 1
    return count


class LowerOrtCpuPass(FusionPass):
    """ONNX Runtime CPU lowering of contrib forms that its CPU kernels run slower than the plain
    ops (see the module docstring for why). Run after fusion and quantization.

    Reuses the fusion pass machinery (``FusionPass``/``FusionRule``) for rule selection,
    provenance stamps and the per-rule counts in the report.
    """

    name = "lower-ort-cpu"
    RULES: ClassVar = (
        FusionRule(
            "skip-norm-to-sum",
            "SkipLayerNormalization → Sum + LayerNormalization (ORT CPU's fused "
            "kernel is slower; Sum keeps ORT from re-fusing)",
            lower_skip_norms,
            CONTRIB,
            min_opset=17,
        ),
        FusionRule(
            "pack-sibling-matmulnbits",
            "MatMulNBits siblings on one input (Q/K/V, gate/up) → one MatMulNBits + Split "
            "(one dispatch per decode step instead of several)",
            pack_sibling_nbits,
            CONTRIB,
        ),
    )

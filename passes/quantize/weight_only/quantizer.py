"""The ``quantize-weight-only`` pass: find the candidate weights and tables, pick the method,
then quantize weight by weight (GPTQ groups in calibration order) and rewrite."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from graphopt.errors import PipelineError

from ...ir_helpers import MS_DOMAIN, constant_array
from ..base import QuantizePassBase
from .awq import awq
from .blocks import gptq_quantize, quantize_rtn
from .calibrate import hessian_groups
from .options import WeightOnlyOptions, check_options
from .rewrite import drop_unused, error_row, initializers, rewrite_gather, rewrite_matmul
from .sites import FLOAT_DTYPES, Site, gather_table, matmul_site

__all__ = ["QuantizeWeightOnlyPass"]


class QuantizeWeightOnlyPass(QuantizePassBase):
    """Block-wise int4/int8 weight-only quantization of MatMul/Gemm weights (and embeddings) for
    ONNX Runtime (``com.microsoft`` MatMulNBits / GatherBlockQuantized; ORT CPU/CUDA only).

    Safe because only constant 2-D float weights whose consumer's input dtype and rank are known are
    rewritten, Gemm only with ``transA=0``, ``alpha=beta=1`` and a constant bias broadcastable to
    ``[N]``; anything else stays float with the reason in the report. A weight shared by several
    MatMuls is quantized once. ``method=gptq`` (or ``auto`` with calibration data) needs
    calibration batches and runs the model on ONNX Runtime to collect ``X^T X`` per weight.
    """

    name = "quantize-weight-only"
    modes: ClassVar[dict[str, dict[str, Any]]] = {"int4": {"bits": 4}, "int8-weight": {"bits": 8}}
    Options: ClassVar[type] = WeightOnlyOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        check_options(self.options)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # One BLAS thread: the same bytes on every machine (a thread count changes summation order),
        # and OpenBLAS's spin-waiting made GPTQ's many small factorizations much slower on a busy CPU.
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # optional (scikit-learn's dependency)
            return self._call(model)
        with threadpool_limits(1, user_api="blas"):
            return self._call(model)

    def _candidates(self, graph: ir.Graph) -> tuple[list[Site], list[tuple[ir.Node, np.ndarray]]]:
        """The MatMul/Gemm sites and embedding tables to quantize (a decision for the others)."""
        o = self.options
        graph_outputs = {id(v) for v in graph.outputs}
        sites: list[Site] = []
        gathers: list[tuple[ir.Node, np.ndarray]] = []
        for node in list(graph):
            if node.domain == "" and node.op_type in ("MatMul", "Gemm"):
                if len(node.inputs) < 2 or constant_array(node.inputs[1]) is None:
                    continue  # activation x activation MatMul: not a candidate
                ok, reason = self.selected(node)
                site = None
                if ok:
                    site, reason = matmul_site(o, node, graph_outputs)
                if site is None:
                    self.decide(node, False, reason)
                else:
                    sites.append(site)
            elif node.domain == MS_DOMAIN and node.op_type == "Attention":
                if len(node.inputs) > 1 and node.inputs[1] is not None:
                    self.decide(node, False, "packed QKV weight inside fused Attention")
            elif node.domain == "" and node.op_type == "Gather" and o.quantize_embeddings:
                table = constant_array(node.inputs[0]) if node.inputs else None
                if table is None or table.ndim != 2 or table.dtype.kind != "f":
                    continue  # not an embedding table (index arithmetic on constants)
                ok, reason = self.selected(node)
                w = None
                if ok:
                    w, reason = gather_table(o, node)
                if w is None:
                    self.decide(node, False, reason)
                else:
                    gathers.append((node, w))
        return sites, gathers

    def _method(self, has_sites: bool) -> tuple[str, Any]:
        """The method to run (``auto`` resolved) and the calibration data it uses."""
        method = self.options.method
        data = self.calibration_data() if method != "rtn" and has_sites else None
        if method != "auto" and method != "rtn" and data is None:
            raise PipelineError(
                f"quantize-weight-only: method={method} needs calibration data; pass "
                "calibration=... (an .npz or a list of feed dicts) or use method=rtn"
            )
        if method == "auto":
            method = "gptq" if data is not None else "rtn"
        return method, data

    def _call(self, model: ir.Model) -> ir.passes.PassResult:
        o = self.options
        graph = model.graph
        sites, gathers = self._candidates(graph)
        if not sites and not gathers:
            return ir.passes.PassResult(model, False)
        method, data = self._method(bool(sites))
        self.details["method"] = method
        taken: set[str] = set()
        by_key: dict[tuple[int, bool], list[Site]] = {}
        for s in sites:
            by_key.setdefault(s.key, []).append(s)
        if method.startswith("awq"):
            awq(model, sites, by_key, data, taken, o, self.details)
        replaced: list[ir.Value] = []
        weights: list[dict[str, Any]] = []
        self.details["weights"] = weights
        if model.opset_imports.get(MS_DOMAIN) is None:
            model.opset_imports[MS_DOMAIN] = 1
        gptq = method in ("gptq", "awq-gptq")
        for group, hessians, tokens in hessian_groups(model, by_key, data if gptq else None, o, self.details):
            for key in group:
                first = by_key[key][0]
                sdt = FLOAT_DTYPES[first.dtype]
                h = hessians.pop(key, None)
                how = method
                k = first.w.shape[1]
                if h is not None and tokens < o.gptq_min_tokens * k:
                    # H has rank <= tokens < K: GPTQ would fit the calibration rows, not the data.
                    h, how = None, f"rtn (gptq: {tokens} calibration tokens < {o.gptq_min_tokens:g}*K={k})"
                    self.count("gptq_fallback_rtn")
                if h is not None:
                    qw = gptq_quantize(
                        first.w,
                        h,
                        o.bits,
                        o.block_size,
                        o.symmetric,
                        damp=o.damp,
                        act_order=o.act_order,
                        scale_dtype=sdt,
                        search=o.scale_search,
                    )
                else:
                    qw = quantize_rtn(first.w, o.bits, o.block_size, o.symmetric, sdt, o.scale_search)
                weights.append(error_row(first, qw, h))
                made = initializers(graph, qw, first.node.inputs[1].name or "weight", taken)
                for site in by_key[key]:
                    replaced.append(site.node.inputs[1])
                    rewrite_matmul(graph, site, qw, made, taken, o.accuracy_level)
                    self.decide(site.node, True, f"{how} {o.bits}-bit")
        for node, w in gathers:
            replaced.append(node.inputs[0])
            rewrite_gather(graph, node, w, taken, o)
            self.decide(node, True, f"rtn {o.bits}-bit embedding")
        drop_unused(graph, replaced)
        return ir.passes.PassResult(model, True)

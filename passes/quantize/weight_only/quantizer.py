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
from .blocks import QuantizedWeight, gptq_quantize, on_grid, quantize_offset, quantize_rtn
from .calibrate import hessian_groups
from .mixed import choose_bits, offset_extra_bytes
from .options import WeightOnlyOptions, check_options
from .rewrite import Inits, drop_unused, error_row, initializers, rewrite_gather, rewrite_matmul
from .sites import FLOAT_DTYPES, Site, gather_table, is_site_op, matmul_site, tied_tables, weight_source

__all__ = ["QuantizeWeightOnlyPass"]


class QuantizeWeightOnlyPass(QuantizePassBase):
    """Block-wise int4/int8 weight-only quantization of MatMul/Gemm/FusedMatMul weights (and
    embeddings) for ONNX Runtime (``com.microsoft`` MatMulNBits / GatherBlockQuantized; ORT CPU/CUDA
    only).

    Safe because only constant 2-D float weights whose consumer's input dtype and rank are known are
    rewritten, Gemm only with ``transA=0``, ``alpha=beta=1`` and a constant bias broadcastable to
    ``[N]``, FusedMatMul only as a plain product (see :mod:`.sites`); anything else stays float
    with the reason in the report. A weight shared by several MatMuls is quantized once, and an
    embedding table that is also the LM head's weight (tied) is stored once for both.
    ``method=gptq`` (or ``auto`` with calibration data) needs calibration batches and runs the
    model on ONNX Runtime to collect ``X^T X`` per weight.
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
        """The MatMul-like sites and embedding tables to quantize (a decision for the others)."""
        o = self.options
        graph_outputs = {id(v) for v in graph.outputs}
        opset = int(graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 0)) or 0)
        sites: list[Site] = []
        gathers: list[tuple[ir.Node, np.ndarray]] = []
        for node in list(graph):
            if is_site_op(node):
                if weight_source(node) is None:
                    continue  # activation x activation product: not a candidate
                ok, reason = self.selected(node)
                site = None
                if ok:
                    site, reason = matmul_site(o, node, graph_outputs)
                if site is None:
                    self.decide(node, False, reason)
                    continue
                sites.append(site)
                if node.op_type == "FusedMatMul":
                    self.count("sites:FusedMatMul")
                elif site.source is not None:
                    self.count("sites:MatMul(Transpose(weight))")
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
                if w is not None and w.shape[1] % o.block_size and opset < 10:
                    reason = f"hidden {w.shape[1]} not a multiple of block_size (padding needs opset >= 10)"
                    w = None
                if w is None:
                    self.decide(node, False, reason)
                else:
                    gathers.append((node, w))
        return sites, gathers

    def _method(self, has_sites: bool) -> tuple[str, Any]:
        """The method to run (``auto`` resolved) and the calibration data it uses."""
        method = self.options.method
        wants = method != "rtn" or self.options.int8_budget > 0  # mixed precision measures on data
        data = self.calibration_data() if wants and has_sites else None
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
        # Before AWQ: a tied table must keep its unscaled values (the embedding reads them too).
        tied = tied_tables(gathers, sites)
        tied_keys = set(tied.values())
        if method.startswith("awq"):
            awq(model, sites, by_key, data, taken, o, self.details, frozen=tied_keys)
        replaced: list[ir.Value] = []
        weights: list[dict[str, Any]] = []
        self.details["weights"] = weights
        if model.opset_imports.get(MS_DOMAIN) is None:
            model.opset_imports[MS_DOMAIN] = 1
        gptq = method in ("gptq", "awq-gptq")
        # The quantized weights a Gather reuses: {key: (weight, initializers, how, LM head name)}.
        kept: dict[tuple[int, bool], tuple[QuantizedWeight, Inits, str, str]] = {}
        # A tied table is also the embedding: GPTQ fits it to the LM head's input alone.
        rtn_keys = tied_keys if gptq and not o.tied_gptq else set()
        tables = {id(node): node.inputs[0] for node, _ in gathers if node.inputs[0] is not None}
        offsets = self._offsets(by_key, tied_keys)
        bits_of = choose_bits(model, by_key, tied, tables, data, o, self.details, offsets)
        groups = hessian_groups(
            model, by_key, data if gptq else None, o, self.details, skip=rtn_keys | offsets
        )
        block_sums: dict[int, ir.Value] = {}
        for group, hessians, tokens in groups:
            for key in group:
                first = by_key[key][0]
                bits = bits_of.get(key, o.bits)
                h = hessians.pop(key, None)
                how = "rtn (tied to an embedding)" if key in rtn_keys else method
                low = None  # an exact weight stays at o.bits (choose_bits never promotes one)
                if key in offsets:
                    low = quantize_offset(first.w, bits, o.block_size, FLOAT_DTYPES[first.dtype])
                qw, h, how = self._quantize(first, bits, h, tokens, how, low)
                weights.append(error_row(first, qw, h))
                made = initializers(graph, qw, first.weight.name or "weight", taken)
                if key in tied_keys:
                    kept[key] = (qw, made, how, first.node.name or "")
                for site in by_key[key]:
                    replaced.append(site.weight)
                    if site.source is not None and (t := site.node.inputs[1]) is not None:
                        replaced.append(t)  # the Transpose it was read through goes too
                    rewrite_matmul(graph, site, qw, made, taken, o.accuracy_level, block_sums)
                    self.decide(site.node, True, f"{how} {bits}-bit")
        self._gathers(graph, gathers, tied, kept, taken, replaced)
        drop_unused(graph, replaced)
        return ir.passes.PassResult(model, True)

    def _quantize(
        self, site: Site, bits: int, h: np.ndarray | None, tokens: int, how: str, low: QuantizedWeight | None
    ) -> tuple[QuantizedWeight, np.ndarray | None, str]:
        """One weight quantized: ``low`` (its form with block offsets) when given, else GPTQ with
        ``h`` or RTN; returns it with the Hessian used and how it was made."""
        o = self.options
        if low is not None:
            return low, None, "rtn with block offsets"
        k = site.w.shape[1]
        if h is not None and tokens < o.gptq_min_tokens * k:
            # H has rank <= tokens < K: GPTQ would fit the calibration rows, not the data.
            h, how = None, f"rtn (gptq: {tokens} calibration tokens < {o.gptq_min_tokens:g}*K={k})"
            self.count("gptq_fallback_rtn")
        sdt = FLOAT_DTYPES[site.dtype]
        if h is None:
            return quantize_rtn(site.w, bits, o.block_size, o.symmetric, sdt, o.scale_search), None, how
        qw = gptq_quantize(
            site.w,
            h,
            bits,
            o.block_size,
            o.symmetric,
            damp=o.damp,
            act_order=o.act_order,
            scale_dtype=sdt,
            search=o.scale_search,
        )
        return qw, h, how

    def _offsets(
        self, by_key: dict[tuple[int, bool], list[Site]], tied_keys: set[tuple[int, bool]]
    ) -> set[tuple[int, bool]]:
        """The weights to quantize with float block offsets (option ``block_offsets=on-grid``):
        the ones their offsets reproduce exactly, except a table an embedding Gather also reads
        (it reads the levels alone) or a K that is not a multiple of the block size. Keys only:
        the levels are made again when the weight is written, not held for the whole model.

        Only exact weights: on a float model (all-MiniLM-L6-v2) least-squares offsets for every
        weight measured worse than plain asymmetric int4, since an outlier channel makes a block's
        sum a poor stand-in for its activations."""
        o = self.options
        chosen: set[tuple[int, bool]] = set()
        if o.block_offsets == "off":
            return chosen
        for key, sites in by_key.items():
            w = sites[0].w
            if key in tied_keys or w.shape[1] % o.block_size:
                continue
            if on_grid(w, quantize_offset(w, o.bits, o.block_size, FLOAT_DTYPES[sites[0].dtype])):
                chosen.add(key)
        extra = offset_extra_bytes([by_key[k][0].w for k in chosen], o)
        self.details["block_offsets"] = {
            "mode": o.block_offsets,
            "weights": len(chosen),
            "extra_bytes": extra,
        }
        self.count("block_offsets", len(chosen))
        return chosen

    def _gathers(
        self,
        graph: ir.Graph,
        gathers: list[tuple[ir.Node, np.ndarray]],
        tied: dict[int, tuple[int, bool]],
        kept: dict[tuple[int, bool], tuple[QuantizedWeight, Inits, str, str]],
        taken: set[str],
        replaced: list[ir.Value],
    ) -> None:
        """Rewrite the embedding Gathers: a tied one on its LM head's quantized weight (one copy),
        the others on their table quantized by RTN (once per table)."""
        o = self.options
        tables: dict[int, tuple[QuantizedWeight, Inits]] = {}
        for node, w in gathers:
            data = node.inputs[0]
            assert data is not None
            replaced.append(data)
            key = tied.get(id(node))
            if key is not None and key in kept:
                qw, made, how, head = kept[key]
                rewrite_gather(graph, node, qw, made, taken)
                self.decide(node, True, f"{how} {qw.bits}-bit embedding, stored once with {head}")
                self.count("tied_embeddings")
                continue
            if id(data) not in tables:
                qw = quantize_rtn(w, o.bits, o.block_size, o.symmetric, w.dtype.type, o.scale_search)
                tables[id(data)] = (qw, initializers(graph, qw, data.name or "embedding", taken, rows=True))
            qw, made = tables[id(data)]
            rewrite_gather(graph, node, qw, made, taken)
            self.decide(node, True, f"rtn {o.bits}-bit embedding")

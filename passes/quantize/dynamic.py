"""Dynamic int8 quantization for ONNX Runtime CPU: int8 weights, activations quantized at run time.

Lowering (the fastest forms ORT's CPU kernels offer):

* ``MatMul`` with a constant 2-D weight (and a following ``Add`` of a constant bias, fused) and
  ``Gemm`` with a constant weight → ``com.microsoft.DynamicQuantizeMatMul`` (one kernel: quantize
  the activation to uint8, integer GEMM, rescale, bias).
* ``com.microsoft.Attention`` (packed QKV, made by the ``fuse`` pass) → ``DynamicQuantizeLinear`` +
  ``com.microsoft.QAttention``, as ORT's own quantizer does. A float additive ``attention_bias``
  made by ``Where(keep, 0, -big)`` becomes QAttention's raw ``mask_index`` (QAttention has no bias
  input); any other attention bias keeps the node in float.
* A MatMul whose two operands are activations is never quantized.

Weights are int8, per output channel and symmetric by default. Activations get one uint8 scale
per tensor per run (all ORT's fast kernels offer), and that is where the error comes from on
trained transformers. Measured on all-MiniLM-L6-v2 (real sentences): int8 weights alone cost
little (min cosine 0.9974), per-tensor activations cost 10x more, spread over every layer (no
single MatMul is worth leaving in float: leaving any one out gains < 0.002), and largest where an
input has outlier channels: the FFN input projection (LayerNorm output: a few hidden channels reach
15x the median channel) and the FFN output projection (GELU output: a few neurons fire 10-20x
higher). Two data-free fixes, each from a probe run of the float model on generated inputs (or on
calibration data when the pipeline has it):

* ``smooth``: inputs made by a normalization (LayerNorm, SkipLayerNorm, RMSNorm) are divided per
  channel by ``s = max|x|^a / max|w|^(1-a)`` (one Mul) and ``s`` is folded into the weights
  (SmoothQuant). The channel profile of a norm output comes from its scale and the residual
  stream, so generated inputs reproduce it.
* ``outlier_channels``: for other inputs (GELU/ReLU outputs), the few channels whose probed maximum
  exceeds that many times the median channel's are masked out of the int8 kernel and multiplied in
  float on their own (Gather + a thin MatMul), LLM.int8()-style.

Together they take MiniLM's min cosine from 0.967 to 0.994 (ORT's quantize_dynamic: 0.970 at its
best setting) at no latency cost worth measuring. ``outlier_ratio`` (off by default) instead keeps in
float the MatMuls whose input has such outliers. Every candidate node's decision and the reason are
in the report (``details["nodes"]``), with the smoothed inputs and the float outlier channels.

``reduce_range`` uses 7-bit weights: on x86 CPUs without VNNI, ORT's u8×s8 kernels add pairs of
products in int16 (``vpmaddubsw``) and can saturate; 7-bit weights avoid that at some accuracy
cost. With VNNI (or AVX-512 VNNI / AMX) full 8-bit weights are exact, so the default is off.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from graphopt.errors import PipelineError

from .base import CommonOptions, QuantizePassBase, constant_array, unique_name

logger = logging.getLogger("graphopt.passes.quantize.dynamic")

__all__ = ["QuantizeDynamicPass", "quantize_weight"]

_MS = "com.microsoft"
_OP_TYPES = ("MatMul", "Gemm", "Attention", "Gather")
#: Inputs of each normalization that scale its output per channel: (scale, shift).
_NORM_PARAMS = {"LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3), "RMSNormalization": (1, None),
                "SimplifiedLayerNormalization": (1, None), "SkipSimplifiedLayerNormalization": (2, None)}
#: Attention attributes that QAttention has too (qkv_hidden_sizes only when the three are equal).
_ATTENTION_ATTRS = frozenset({"num_heads", "unidirectional", "mask_filter_value", "scale", "do_rotary",
                              "qkv_hidden_sizes"})
#: Gather (embedding tables) is opt-in: it shrinks the file (the MiniLM vocabulary table is 47 of its
#: 86 MB) but costs accuracy (MiniLM min cosine 0.9936 -> 0.9928) and no latency.
_DEFAULT_OP_TYPES = ("MatMul", "Gemm", "Attention")
_NORMS = frozenset({"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
                    "SkipSimplifiedLayerNormalization", "RMSNormalization"})


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclasses.dataclass
class DynamicOptions(CommonOptions):
    per_channel: bool = dataclasses.field(
        default=True, metadata=_doc("one weight scale per output channel (else one per tensor)"))
    symmetric: bool = dataclasses.field(
        default=True, metadata=_doc("symmetric int8 weights (zero point 0); else asymmetric"))
    reduce_range: bool = dataclasses.field(
        default=False, metadata=_doc("7-bit weights: avoids int16 saturation on x86 CPUs without VNNI"))
    op_types: list[str] = dataclasses.field(
        default_factory=lambda: list(_DEFAULT_OP_TYPES), metadata=_doc("op types to quantize: MatMul, Gemm, Attention, Gather (embedding tables)"))
    min_size: int = dataclasses.field(
        default=1024, metadata=_doc("leave weights with fewer elements than this in float"))
    smooth: float = dataclasses.field(
        default=0.5, metadata=_doc("SmoothQuant migration strength alpha in [0, 1): divide each input channel by "
                                    "s = max|x|^a / max|w|^(1-a) (probed) and fold s into the weight; 0 = off"))
    outlier_channels: float = dataclasses.field(
        default=6.0, metadata=_doc("input channels (of inputs that are not norm outputs) whose probed max exceeds "
                                    "this many times the median channel's are computed in float; 0 = off"))
    max_outlier_channels: int = dataclasses.field(
        default=16, metadata=_doc("at most this many float outlier channels per input"))
    outlier_ratio: float = dataclasses.field(
        default=0.0, metadata=_doc("keep in float MatMuls whose input range / typical magnitude exceeds this "
                                    "(probe run); 0 turns the check off"))
    probe_batches: int = dataclasses.field(
        default=2, metadata=_doc("batches of generated (or calibration) inputs for the outlier probe"))


# ---------------------------------------------------------------------------------------------
# Weight quantization


def quantize_weight(
    w: np.ndarray, *, per_channel: bool = True, symmetric: bool = True, reduce_range: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize a (K, N) float weight to int8 along K, one scale per column N (or one in all).

    Returns ``(q int8 (K, N), scale float32, zero_point int8)``; scale/zero point have shape (N,)
    when ``per_channel`` else shape ().
    """
    w = np.asarray(w, dtype=np.float64)
    axis = 0 if per_channel else None
    if symmetric:
        qmax = 63 if reduce_range else 127
        absmax = np.max(np.abs(w), axis=axis)
        scale = np.where(absmax > 0, absmax / qmax, 1.0)
        zp = np.zeros_like(scale)
        q = np.clip(np.rint(w / scale), -qmax, qmax)
    else:
        qmin, qmax = (-64, 63) if reduce_range else (-128, 127)
        rmin = np.minimum(np.min(w, axis=axis), 0.0)
        rmax = np.maximum(np.max(w, axis=axis), 0.0)
        span = rmax - rmin
        scale = np.where(span > 0, span / (qmax - qmin), 1.0)
        zp = np.clip(np.rint(qmin - rmin / scale), qmin, qmax)
        q = np.clip(np.rint(w / scale) + zp, qmin, qmax)
    return q.astype(np.int8), np.asarray(scale, np.float32), np.asarray(zp, np.int8)


def _const(value: ir.Value | None) -> np.ndarray | None:
    """A value's constant array, looking through a Concat of constants (the fuse pass packs the
    Q/K/V weights so; cleanup's folder leaves large results unfolded)."""
    arr = constant_array(value)
    if arr is not None or value is None:
        return arr
    node = value.producer()
    if node is not None and node.op_type == "Concat" and node.domain == "":
        parts = [constant_array(v) for v in node.inputs]
        if parts and all(p is not None for p in parts):
            return np.concatenate(parts, axis=node.attributes.get_int("axis", 0))
    return None


def _float32(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


# ---------------------------------------------------------------------------------------------
# The pass


class QuantizeDynamicPass(QuantizePassBase):
    """Dynamic int8 quantization (ORT CPU): int8 per-channel weights, uint8 activations at run time.

    MatMul/Gemm with constant weights → DynamicQuantizeMatMul (bias fused); packed-QKV Attention →
    QAttention. Safe on any model: nodes whose weight is not constant, not float32 or whose shapes
    are unknown stay in float, with the reason in the report. Run it after ``fuse`` on ort-cpu.
    """

    name: ClassVar[str] = "quantize-dynamic"
    modes: ClassVar[tuple[str, ...]] = ("dynamic",)
    Options: ClassVar[type] = DynamicOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        bad = sorted(set(o.op_types) - set(_OP_TYPES))
        if bad:
            raise PipelineError(f"quantize-dynamic: unknown op_types {bad}; use some of {list(_OP_TYPES)}")
        if o.min_size < 0:
            raise PipelineError("quantize-dynamic: min_size must be >= 0")
        if o.outlier_ratio < 0:
            raise PipelineError("quantize-dynamic: outlier_ratio must be >= 0 (0 turns the check off)")
        if not 0 <= o.smooth < 1:
            raise PipelineError("quantize-dynamic: smooth must be in [0, 1) (0 turns smoothing off)")
        if o.outlier_channels < 0 or o.max_outlier_channels < 0:
            raise PipelineError("quantize-dynamic: outlier_channels and max_outlier_channels must be >= 0 (0 = off)")
        if o.probe_batches < 1:
            raise PipelineError("quantize-dynamic: probe_batches must be >= 1")

    # --- candidates ------------------------------------------------------------------------
    def _candidates(self, graph: ir.Graph) -> list[ir.Node]:
        out = []
        for node in graph:
            if node.op_type not in self.options.op_types:
                continue
            if node.op_type == "Attention" and node.domain == _MS:
                out.append(node)
            elif node.op_type in ("MatMul", "Gemm", "Gather") and node.domain in ("", "ai.onnx"):
                out.append(node)
        return out

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self._taken: set[str] = set()
        candidates = self._candidates(graph)
        plans: list[_Plan] = []
        for node in candidates:
            ok, reason = self.selected(node)
            if not ok:
                self.decide(node, False, reason)
                continue
            plan, reason = self._plan(node)
            if plan is None:
                self.decide(node, False, reason)
                continue
            plans.append(plan)
        o = self.options
        if plans and (o.outlier_ratio > 0 or o.smooth > 0 or o.outlier_channels > 0):
            stats = _probe(model, sorted({p.node.inputs[0].name for p in plans if p.node.op_type != "Gather"}), self.calibration_data(),
                           self.options.probe_batches)
            if stats is None:
                self.count("probe:failed")
            else:
                if self.options.outlier_ratio > 0:
                    plans = self._drop_outliers(plans, stats)
                if self.options.smooth > 0:
                    self._smooth(graph, plans, stats)
                if self.options.outlier_channels > 0:
                    self._split(graph, plans, stats)
        modified = False
        for plan in plans:
            plan.rewrite(graph, plan)
            self.decide(plan.node, True, "")
            modified = True
        if modified:
            _ensure_opset(model, _MS, 1)
        return ir.passes.PassResult(model, modified)

    # --- planning: check everything first, rewrite later -----------------------------------
    def _weight_ok(self, w: np.ndarray | None, what: str) -> str:
        if w is None:
            return f"{what} is not a constant"
        if w.dtype != np.float32:
            return f"{what} is {w.dtype}, not float32"
        if w.ndim != 2:
            return f"{what} is {w.ndim}-D, not 2-D"
        if w.size < self.options.min_size:
            return f"weight smaller than min_size ({w.size} < {self.options.min_size})"
        return ""

    def _plan(self, node: ir.Node) -> tuple[Any, str]:
        if node.op_type == "MatMul":
            return self._plan_matmul(node)
        if node.op_type == "Gemm":
            return self._plan_gemm(node)
        if node.op_type == "Gather":
            return self._plan_gather(node)
        return self._plan_attention(node)

    def _plan_gather(self, node: ir.Node) -> tuple[Any, str]:
        """An embedding lookup in a constant 2-D table: int8 table with one scale per row (per
        table when per_channel is off); the gathered rows are dequantized (a few KB per token)."""
        table = constant_array(node.inputs[0])
        if table is None:
            return None, "table is not a constant"
        why = self._weight_ok(table, "table")
        if why:
            return None, why
        if node.attributes.get_int("axis", 0) != 0:
            return None, "Gather along an axis other than 0"
        if len(node.inputs[0].uses()) != 1:
            return None, "table shared with other nodes"

        def rewrite(graph: ir.Graph, plan: _Plan) -> None:
            self._emit_gather(graph, node, table)

        return _Plan(node, rewrite, table), ""

    def _plan_matmul(self, node: ir.Node) -> tuple[Any, str]:
        a, b = node.inputs[0], node.inputs[1]
        w = _const(b)
        if w is None:
            return None, "weight is an activation (activation x activation)" if b is not None else "no weight"
        why = self._weight_ok(w, "weight")
        if why:
            return None, why
        if not _float32(a) or a.shape is None or len(a.shape) < 2:
            return None, "input dtype or rank unknown (need float32, rank >= 2)"
        bias, add = self._bias_after(node, w.shape[1])

        def rewrite(graph: ir.Graph, plan: _Plan) -> None:
            out = add.outputs[0] if add is not None else node.outputs[0]
            self._emit_dqmm(graph, plan, bias, out, remove=[add] if add is not None else [])

        return _Plan(node, rewrite, w), ""

    def _plan_gemm(self, node: ir.Node) -> tuple[Any, str]:
        attrs = node.attributes
        if attrs.get_int("transA", 0) != 0:
            return None, "Gemm with transA"
        alpha, beta = attrs.get_float("alpha", 1.0), attrs.get_float("beta", 1.0)
        a, b = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        w = _const(b)
        if w is None:
            return None, "weight is an activation (activation x activation)" if b is not None else "no weight"
        if attrs.get_int("transB", 0):
            w = np.ascontiguousarray(w.T) if w.ndim == 2 else w
        why = self._weight_ok(w, "weight")
        if why:
            return None, why
        if not _float32(a):
            return None, "input dtype unknown (need float32)"
        w = (w * np.float32(alpha)).astype(np.float32) if alpha != 1.0 else w
        bias = None
        if c is not None:
            cb = _const(c)
            if cb is None or cb.dtype != np.float32 or cb.size not in (1, w.shape[1]) or cb.ndim > 2:
                return None, "Gemm C is not a constant vector"
            bias = np.broadcast_to(cb.reshape(-1) * np.float32(beta), (w.shape[1],)).astype(np.float32)

        def rewrite(graph: ir.Graph, plan: _Plan) -> None:
            self._emit_dqmm(graph, plan, bias, node.outputs[0], remove=[])

        return _Plan(node, rewrite, w), ""

    def _bias_after(self, node: ir.Node, n: int) -> tuple[np.ndarray | None, ir.Node | None]:
        """The constant bias of an ``Add`` that is the MatMul's only consumer (fused into the kernel)."""
        out = node.outputs[0]
        if out.is_graph_output() or len(out.uses()) != 1:
            return None, None
        user = out.uses()[0].node
        if user.op_type != "Add" or user.domain not in ("", "ai.onnx") or len(user.inputs) != 2:
            return None, None
        other = user.inputs[1] if user.inputs[0] is out else user.inputs[0]
        bias = _const(other)
        if bias is None or bias.dtype != np.float32 or bias.shape not in ((n,), (1, n)):
            return None, None
        if user.outputs[0].shape is not None and node.outputs[0].shape is not None:
            if list(user.outputs[0].shape) != list(node.outputs[0].shape):
                return None, None
        return bias.reshape(n), user

    def _plan_attention(self, node: ir.Node) -> tuple[Any, str]:
        ins = list(node.inputs) + [None] * (7 - len(node.inputs))
        x, wv, bv, mask, past, attn_bias = ins[0], ins[1], ins[2], ins[3], ins[4], ins[5]
        if len(node.outputs) > 1 and any(o is not None and o.uses() for o in node.outputs[1:]):
            return None, "Attention with present output (KV cache)"
        if past is not None or (len(ins) > 6 and ins[6] is not None):
            return None, "Attention with past state"
        w = _const(wv)
        why = self._weight_ok(w, "packed QKV weight")
        if why:
            return None, why
        b = _const(bv)
        if b is None or b.dtype != np.float32 or b.shape != (w.shape[1],):
            return None, "packed QKV bias is not a constant vector"
        if not _float32(x):
            return None, "input dtype unknown (need float32)"
        unknown = sorted(set(node.attributes) - _ATTENTION_ATTRS)
        if unknown or node.attributes.get_int("do_rotary", 0):
            return None, f"Attention attributes QAttention lacks: {unknown or ['do_rotary']}"
        sizes = node.attributes.get_ints("qkv_hidden_sizes", None)
        if sizes is not None and len(set(sizes)) != 1:
            return None, "different Q/K/V hidden sizes (QAttention needs equal sizes)"
        mask_plan = None
        if attn_bias is not None:
            if mask is not None:
                return None, "Attention with both mask_index and attention_bias"
            mask_plan = _raw_mask(attn_bias)
            if mask_plan is None:
                return None, "attention_bias is not Where(mask, 0, -big) (QAttention has no bias input)"
        elif mask is not None and mask.dtype != ir.DataType.INT32:
            return None, "mask_index is not int32"

        def rewrite(graph: ir.Graph, plan: _Plan) -> None:
            self._emit_qattention(graph, node, node.inputs[0], plan.weight, b, mask, mask_plan)

        return _Plan(node, rewrite, w), ""

    # --- probe-driven choices --------------------------------------------------------------
    def _drop_outliers(self, plans: list[_Plan], stats: dict[str, np.ndarray]) -> list[_Plan]:
        kept = []
        ratios = {}
        for plan in plans:
            name = plan.node.inputs[0].name
            absmax = stats.get(name)
            if absmax is None or plan.node.op_type == "Gather":
                kept.append(plan)
                continue
            ratio = float(absmax.max() / max(float(np.median(absmax)), 1e-12))
            ratios[name] = round(ratio, 2)
            if ratio > self.options.outlier_ratio:
                self.decide(plan.node, False, f"input channel outliers: max/median {ratio:.0f} > "
                                              f"{self.options.outlier_ratio:g}")
                continue
            kept.append(plan)
        self.details["input_outlier_ratio"] = dict(sorted(ratios.items()))
        return kept

    def _split(self, graph: ir.Graph, plans: list[_Plan], stats: dict[str, np.ndarray]) -> None:
        """Outlier channels of inputs that are not normalization outputs (GELU/ReLU outputs feeding
        an FFN's second projection): a few neurons reach 10-100x the typical channel maximum and
        set the one per-tensor activation scale. They are masked to zero before the int8 kernel
        and multiplied in float on their own (LLM.int8()-style decomposition, channels from the probe).
        """
        o = self.options
        groups: dict[str, list[_Plan]] = {}
        for plan in plans:
            if plan.node.op_type in ("MatMul", "Gemm"):
                groups.setdefault(plan.node.inputs[0].name, []).append(plan)
        order = {id(n): i for i, n in enumerate(graph)}
        for name, group in groups.items():
            x = group[0].node.inputs[0]
            producer = _source(x)
            if producer is not None and producer.op_type in _NORMS and o.smooth > 0:
                continue  # smoothed instead
            act = stats.get(name)
            k = group[0].weight.shape[0]
            if act is None or act.shape != (k,) or any(p.weight.shape[0] != k for p in group):
                continue
            typical = float(np.median(act))
            if typical <= 0:
                continue
            idx = np.nonzero(act > o.outlier_channels * typical)[0]
            if idx.size == 0:
                continue
            idx = idx[np.argsort(-act[idx], kind="stable")][: o.max_outlier_channels]
            idx = np.sort(idx).astype(np.int64)
            first = min(group, key=lambda p: order[id(p.node)]).node
            base = first.name or "split"
            mask = np.ones(k, np.float32)
            mask[idx] = 0.0
            mul = ir.Node("", "Mul", [x, self._init(graph, base + "_inlier_mask", mask)], num_outputs=1,
                          name=unique_name(graph, base + "_inliers", self._taken))
            y = mul.outputs[0]
            y.name, y.shape, y.type = unique_name(graph, f"{name}_inliers", self._taken), x.shape, x.type
            gather = ir.Node("", "Gather", [x, self._init(graph, base + "_outlier_index", idx)],
                             attributes=[ir.AttrInt64("axis", -1)], num_outputs=1,
                             name=unique_name(graph, base + "_outlier_gather", self._taken))
            g = gather.outputs[0]
            g.name, g.type = unique_name(graph, f"{name}_outliers", self._taken), x.type
            graph.insert_before(first, mul)
            graph.insert_before(first, gather)
            for plan in group:
                plan.node.replace_input_with(0, y)
                plan.side = (g, idx)
            self.details.setdefault("outlier_channels", {})[name] = [int(i) for i in idx]

    def _fold_into_norm(self, graph: ir.Graph, norm: ir.Node, x: ir.Value, group: list[_Plan],
                        inv: np.ndarray) -> bool:
        """Fold the per-channel ``1 / s`` into the norm's scale (and shift) when the norm's output
        reaches only the smoothed nodes (pre-LN models: GPT-2, Llama), so smoothing costs nothing
        at run time. Post-LN models (BERT) also feed the norm output to the residual: a Mul there."""
        slots = _NORM_PARAMS.get(norm.op_type)
        if slots is None or norm.domain not in ("", "ai.onnx", _MS):
            return False
        value, members = x, {id(p.node) for p in group}
        if value.is_graph_output() or {id(u.node) for u in value.uses()} != members:
            return False
        while value.producer() is not norm:  # the reshape chain found by _source
            node = value.producer()
            value = node.inputs[0]
            if value.is_graph_output() or len(value.uses()) != 1:
                return False
        if norm.outputs.index(value) != 0:
            return False
        params = []
        for i in slots:
            if i is None or i >= len(norm.inputs) or norm.inputs[i] is None:
                continue
            arr = constant_array(norm.inputs[i])
            if arr is None or arr.shape != inv.shape:
                return False
            params.append((i, arr))
        if not params:
            return False
        for i, arr in params:
            new = self._init(graph, f"{norm.name or 'norm'}_smoothed_param{i}",
                             (arr.astype(np.float64) * inv).astype(arr.dtype))
            norm.replace_input_with(i, new)
        return True

    def _smooth(self, graph: ir.Graph, plans: list[_Plan], stats: dict[str, np.ndarray]) -> None:
        """SmoothQuant: move activation outliers into the weights, per input channel.

        ``X W = (X / s)(s W)``; ``X / s`` is one Mul shared by the consumers of X, ``s W`` is folded
        into the constant weights before they are quantized per output channel.
        """
        alpha = self.options.smooth
        groups: dict[str, list[_Plan]] = {}
        for plan in plans:
            groups.setdefault(plan.node.inputs[0].name, []).append(plan)
        order = {id(n): i for i, n in enumerate(graph)}
        for name, group in groups.items():
            x = group[0].node.inputs[0]
            producer = _source(x)
            is_norm = producer is not None and producer.op_type in _NORMS
            if not is_norm:
                # Only normalization outputs have a per-channel profile that generated inputs
                # reproduce (it comes from the norm's scale and the residual stream's outlier
                # channels). Elsewhere (GELU, attention outputs) per-channel maxima come from a few
                # tokens, and smoothing by them made MiniLM worse even with real calibration data.
                continue
            act = stats.get(name)
            k = group[0].weight.shape[0]
            if act is None or act.shape != (k,) or any(p.weight.shape[0] != k for p in group):
                self.count("smooth:skipped")
                continue
            wmax = np.max(np.stack([np.abs(p.weight).max(axis=1) for p in group]), axis=0).astype(np.float64)
            act = act.astype(np.float64)
            ok = (act > 0) & (wmax > 0)
            s = np.ones(k)
            s[ok] = act[ok] ** alpha / wmax[ok] ** (1 - alpha)
            s = np.clip(s, 1e-5, 1e5)
            first = min(group, key=lambda p: order[id(p.node)]).node
            if self._fold_into_norm(graph, producer, x, group, 1.0 / s):
                self.count("smooth:folded")
            else:
                inv = self._init(graph, f"{first.name or 'smooth'}_smooth_scale", (1.0 / s).astype(np.float32))
                mul = ir.Node("", "Mul", [x, inv], num_outputs=1,
                              name=unique_name(graph, f"{name}_smooth", self._taken))
                y = mul.outputs[0]
                y.name, y.shape, y.type = unique_name(graph, f"{name}_smoothed", self._taken), x.shape, x.type
                graph.insert_before(first, mul)
                for plan in group:
                    plan.node.replace_input_with(0, y)
            for plan in group:
                plan.weight = (plan.weight.astype(np.float64) * s[:, None]).astype(np.float32)
            self.count("smooth")
            self.details.setdefault("smoothed_inputs", []).append(name)

    # --- rewriting -------------------------------------------------------------------------
    def _init(self, graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
        name = unique_name(graph, base, self._taken)
        v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
        graph.register_initializer(v)
        return v

    def _qweight(self, graph: ir.Graph, base: str, w: np.ndarray) -> tuple[ir.Value, ir.Value, ir.Value]:
        o = self.options
        q, scale, zp = quantize_weight(w, per_channel=o.per_channel, symmetric=o.symmetric,
                                       reduce_range=o.reduce_range)
        return (self._init(graph, f"{base}_quantized", q), self._init(graph, f"{base}_scale", scale),
                self._init(graph, f"{base}_zero_point", zp))

    def _emit_dqmm(self, graph: ir.Graph, plan: _Plan, bias: np.ndarray | None, out: ir.Value,
                   remove: list[ir.Node]) -> None:
        node, a, w = plan.node, plan.node.inputs[0], plan.weight
        base = node.name or "matmul"
        if plan.side is not None:
            # Outlier channels: they are zero in ``a`` (masked), so their weight rows leave the
            # int8 weight and are multiplied in float on the gathered channels.
            w = w.copy()
            w[plan.side[1]] = 0.0
        qw, scale, zp = self._qweight(graph, base + "_W", w)
        inputs = [a, qw, scale, zp]
        if bias is not None:
            inputs.append(self._init(graph, base + "_bias", bias.astype(np.float32)))
        new = ir.Node(_MS, "DynamicQuantizeMatMul", inputs, num_outputs=1,
                      name=unique_name(graph, base + "_quant", self._taken))
        graph.insert_before(node, new)
        y = new.outputs[0]
        y.name, y.shape, y.type = unique_name(graph, base + "_quant_out", self._taken), out.shape, out.type
        if plan.side is not None:
            gathered, idx = plan.side
            w_side = self._init(graph, base + "_outlier_W", np.ascontiguousarray(plan.weight[idx]))
            mm = ir.Node("", "MatMul", [gathered, w_side], num_outputs=1,
                         name=unique_name(graph, base + "_outliers", self._taken))
            mm.outputs[0].name = unique_name(graph, base + "_outliers_out", self._taken)
            add = ir.Node("", "Add", [y, mm.outputs[0]], num_outputs=1,
                          name=unique_name(graph, base + "_outliers_add", self._taken))
            graph.insert_before(node, mm)
            graph.insert_before(node, add)
            y = add.outputs[0]
            y.name, y.shape, y.type = unique_name(graph, base + "_quant_sum", self._taken), out.shape, out.type
            self.count("outlier_split")
        _swap_output(graph, out, y)
        for n in [*remove, node]:
            graph.remove(n, safe=True)
        self.count("DynamicQuantizeMatMul")

    def _emit_gather(self, graph: ir.Graph, node: ir.Node, table: np.ndarray) -> None:
        base = node.name or "gather"
        o = self.options
        # Rows are the channels here: quantize the transposed table per column.
        q, scale, zp = quantize_weight(table.T, per_channel=o.per_channel, symmetric=True, reduce_range=False)
        qt = self._init(graph, base + "_table_quantized", np.ascontiguousarray(q.T))
        ids = node.inputs[1]
        g = ir.Node("", "Gather", [qt, ids], attributes=[ir.AttrInt64("axis", 0)], num_outputs=1,
                    name=unique_name(graph, base + "_quant", self._taken))
        g.outputs[0].name = unique_name(graph, base + "_rows_int8", self._taken)
        nodes = [g]
        if o.per_channel:
            st = self._init(graph, base + "_row_scale", scale.reshape(-1, 1))
            gs = ir.Node("", "Gather", [st, ids], attributes=[ir.AttrInt64("axis", 0)], num_outputs=1,
                         name=unique_name(graph, base + "_scale_gather", self._taken))
            gs.outputs[0].name = unique_name(graph, base + "_row_scales", self._taken)
            cast = ir.Node("", "Cast", [g.outputs[0]], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)],
                           num_outputs=1, name=unique_name(graph, base + "_cast", self._taken))
            cast.outputs[0].name = unique_name(graph, base + "_rows_float", self._taken)
            last = ir.Node("", "Mul", [cast.outputs[0], gs.outputs[0]], num_outputs=1,
                           name=unique_name(graph, base + "_dequant", self._taken))
            nodes += [gs, cast, last]
        else:
            last = ir.Node("", "DequantizeLinear", [g.outputs[0], self._init(graph, base + "_scale", scale),
                                                    self._init(graph, base + "_zero_point", zp)],
                           num_outputs=1, name=unique_name(graph, base + "_dequant", self._taken))
            nodes.append(last)
        for n in nodes:
            graph.insert_before(node, n)
        out = node.outputs[0]
        y = last.outputs[0]
        y.name, y.shape, y.type = unique_name(graph, base + "_dequant_out", self._taken), out.shape, out.type
        _swap_output(graph, out, y)
        graph.remove(node, safe=True)
        self.count("Gather")

    def _emit_qattention(self, graph: ir.Graph, node: ir.Node, x: ir.Value, w: np.ndarray, b: np.ndarray,
                         mask: ir.Value | None, mask_plan: Any) -> None:
        base = node.name or "attention"
        qw, scale, zp = self._qweight(graph, base + "_W", w)
        dql = ir.Node("", "DynamicQuantizeLinear", [x], num_outputs=3,
                      name=unique_name(graph, base + "_input_quant", self._taken))
        for i, suffix in enumerate(("quantized", "scale", "zero_point")):
            dql.outputs[i].name = unique_name(graph, f"{base}_input_{suffix}", self._taken)
        graph.insert_before(node, dql)
        nodes = [dql]
        if mask_plan is not None:
            mask, extra = mask_plan(graph, self._taken, base)
            for n in extra:
                graph.insert_before(node, n)
        bias = self._init(graph, base + "_bias", b)
        inputs = [dql.outputs[0], qw, bias, dql.outputs[1], scale, mask, dql.outputs[2], zp]
        attrs = [a for k, a in node.attributes.items() if k in _ATTENTION_ATTRS and k != "qkv_hidden_sizes"]
        qa = ir.Node(_MS, "QAttention", inputs, attributes=attrs, num_outputs=1,
                     name=unique_name(graph, base + "_quant", self._taken))
        graph.insert_before(node, qa)
        nodes.append(qa)
        out = node.outputs[0]
        y = qa.outputs[0]
        y.name, y.shape, y.type = unique_name(graph, base + "_quant_out", self._taken), out.shape, out.type
        _swap_output(graph, out, y)
        graph.remove(node, safe=True)
        self.count("QAttention")


@dataclasses.dataclass
class _Plan:
    """A checked candidate: its node, the rewrite to run, and its (K, N) float weight."""

    node: ir.Node
    rewrite: Any
    weight: np.ndarray
    #: (gathered outlier channels of the input, their indices) when the input is split.
    side: tuple[ir.Value, np.ndarray] | None = None


def _swap_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Make ``new`` take ``old``'s place: its consumers, and its graph-output slot and name."""
    name = old.name if old.is_graph_output() else None
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if name is not None:
        old.name = None
        new.name = name


def _source(value: ir.Value) -> ir.Node | None:
    """The node that made ``value``'s channels, looking through reshapes that keep the last axis
    (GPT-2's Conv1D flattens the LayerNorm output to 2-D before its MatMul)."""
    node = value.producer()
    for _ in range(4):
        if node is None or node.op_type not in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"):
            break
        src = node.inputs[0]
        if src is None or src.shape is None or value.shape is None or not src.shape or not value.shape:
            break
        if src.shape[-1] != value.shape[-1] or not isinstance(src.shape[-1], int):
            break
        node = src.producer()
    return node


def _raw_mask(attn_bias: ir.Value) -> Any:
    """If ``attn_bias`` is ``Where(keep, 0, -big)`` with ``keep`` of shape (B, 1, S|1, T), a plan
    that makes QAttention's int32 raw mask: 3-D (B, S, T) or 2-D (B, T)."""
    node = attn_bias.producer()
    if node is None or node.op_type != "Where" or node.domain not in ("", "ai.onnx"):
        return None
    keep, zero, neg = node.inputs
    z, n = constant_array(zero), constant_array(neg)
    if z is None or n is None or z.size != 1 or n.size != 1 or float(z.reshape(())) != 0.0:
        return None
    if not float(n.reshape(())) <= -1e4:
        return None
    shape = keep.shape
    if keep.dtype != ir.DataType.BOOL or shape is None or len(shape) != 4 or shape[1] != 1:
        return None
    two_d = shape[2] == 1

    def plan(graph: ir.Graph, taken: set[str], base: str) -> tuple[ir.Value, list[ir.Node]]:
        axes = np.array([1, 2] if two_d else [1], np.int64)
        name = unique_name(graph, base + "_mask_axes", taken)
        av = ir.Value(name=name, shape=ir.Shape(axes.shape), type=ir.TensorType(ir.DataType.INT64),
                      const_value=ir.tensor(axes, name=name))
        graph.register_initializer(av)
        sq = ir.Node("", "Squeeze", [keep, av], num_outputs=1, name=unique_name(graph, base + "_mask_squeeze", taken))
        sq.outputs[0].name = unique_name(graph, base + "_mask_bool", taken)
        cast = ir.Node("", "Cast", [sq.outputs[0]], attributes=[ir.AttrInt64("to", ir.DataType.INT32)],
                       num_outputs=1, name=unique_name(graph, base + "_mask_cast", taken))
        out = cast.outputs[0]
        out.name = unique_name(graph, base + "_mask_index", taken)
        out.dtype = ir.DataType.INT32
        return out, [sq, cast]

    return plan


def _ensure_opset(model: ir.Model, domain: str, version: int) -> None:
    if domain not in model.opset_imports:
        model.opset_imports[domain] = version
    if domain not in model.graph.opset_imports:
        model.graph.opset_imports[domain] = version


def _probe(model: ir.Model, names: list[str], calibration: Any, batches: int) -> dict[str, np.ndarray] | None:
    """Per-channel (last axis) max |x| of the named values over a few batches of the float model:
    calibration data when given, else generated inputs (outlier channels of trained transformers
    come from their weights and norms, so random tokens show them too)."""
    from graphopt.calibration import CalibrationData, stream_tensors

    if calibration is None:
        try:
            from graphopt.verify import generate_inputs

            data = CalibrationData.from_any([generate_inputs(model, seed=i) for i in range(batches)])
        except Exception as exc:  # noqa: BLE001 - the probe is optional; the report counts the failure
            logger.warning("quantize-dynamic probe: cannot generate inputs (%s)", exc)
            return None
    else:
        data = calibration
    out: dict[str, np.ndarray] = {}
    try:
        for tensors in stream_tensors(model, names, data, limit=batches):
            for k, arr in tensors.items():
                a = np.asarray(arr)
                if a.ndim == 0 or a.size == 0:
                    continue
                m = np.abs(a.reshape(-1, a.shape[-1]).astype(np.float64)).max(axis=0)
                out[k] = m if k not in out or out[k].shape != m.shape else np.maximum(out[k], m)
    except Exception as exc:  # noqa: BLE001
        logger.warning("quantize-dynamic probe failed (%s)", exc)
        return None
    return out

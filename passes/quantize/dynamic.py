"""Dynamic int8 quantization for ONNX Runtime CPU: int8 weights, activations quantized at run time.

Lowering (the fastest forms ORT's CPU kernels offer), per activation:

* **per token** (one scale per row, where a few tokens would otherwise set the range): the input is
  quantized in the graph and shared by its consumers. A norm's output gets 255 levels over its
  row's own range with zero a level, ``q = round(255·x / (hi − lo)) + z`` per row: x is padded with
  a few zero columns (``Pad``), ``ReduceMin``/``ReduceMax`` give ``lo``/``hi`` and a few row-sized
  ops the integer zero point ``z``, ``QuantizeLinear`` the uint8 levels (the padding becomes ``z``).
  The int8 weight gains matching rows that sum to ``−ΣW_q`` per column, so
  ``com.microsoft.MatMulIntegerToFloat`` computes ``Σ(q − z)·W_q`` exactly in int32 and only the
  row-range ``Mul`` runs over its output (see ``_plan_zero_columns``). Rows reaching further below
  zero than above are quantized mirrored (levels of ``−x``, range negated), so every zero point is
  ≤ 128 and those rows may reach ±127 without int16 overflow on CPUs without VNNI. ORT has no kernel with a
  per-row activation scale or zero point (``MatMulIntegerToFloat`` and ``DynamicQuantizeMatMul``
  take scalars), hence the extra nodes. Asymmetric weights or opsets below 18 add ``lo ⊗ ΣW``
  back after the kernel instead. Inputs bounded below by ``-c`` (GELU, SiLU, ReLU) need no row
  minimum: ``q = round(255·(x + c) / max(x + c))``, ``c·ΣW`` comes back through the bias.
  ``asymmetric=false`` and attention outputs: ``q = round(127·x / max|x|) + 128`` after centering
  (fewer nodes).
  Packed-QKV ``Attention`` becomes a per-token QKV projection + ``Split`` + ``MultiHeadAttention``
  (ORT's CPU MultiHeadAttention has no packed-QKV form; QAttention takes one input scale).
* **per tensor** (elsewhere): ``MatMul`` + bias and ``Gemm`` → ``DynamicQuantizeMatMul``;
  ``Attention`` → ``DynamicQuantizeLinear`` + ``QAttention`` (a ``Where(keep, 0, -big)`` attention
  bias becomes its raw mask index), as ORT's own quantizer does.
* ``activations=auto`` (default) picks per input from a probe run: per token when the largest token
  maximum exceeds ``token_outlier_ratio`` times the median token's. Trained transformers' norm
  outputs carry a few massive-activation tokens ([CLS], [SEP], punctuation: 3-10x the median
  token); random-weight models have none and keep the cheaper per-tensor form.
* A MatMul whose two operands are activations is never quantized.

Weights are int8, per output channel and symmetric by default: round-to-nearest, or GPTQ (error
compensation with the Hessian ``XᵀX`` of the input, columns in decreasing-activation order) when the
pipeline has calibration data. Probe-driven transforms shrink the activation error (a probe run
of the float model on the calibration data, else on ``probe_batches`` generated inputs of
``probe_length`` tokens: the first token's massive activations show once per input, and 16 tokens
in all, the old default, left MiniLM's worst sentence at 0.9969 instead of 0.998):

* ``smooth``: inputs made by a normalization are divided per channel by ``s = max|x|^a /
  max|w|^(1-a)`` and ``s`` is folded into the weights (SmoothQuant); folded into the norm's scale
  and shift when the norm feeds only these nodes (pre-LN), else one Mul.
* ``center`` (with ``asymmetric=false``): per-token inputs made by a norm or an attention op are
  shifted per channel to the middle of their probed range (Outlier Suppression+-style): symmetric
  levels, a norm's output is not. The shift returns exactly through the bias (``δ·W`` with W as the kernel
  sees it); it is folded into the norm's shift, or the attention's V bias (attention rows are convex
  combinations of V rows), else one Add.
* ``outlier_channels``: for other inputs (GELU/ReLU outputs), the few channels whose probed maximum
  exceeds that many times the median channel's are masked out of the int8 kernel and multiplied in
  float on their own (Gather + a thin MatMul), LLM.int8()-style.
* ``channel_copies`` (with calibration data): a norm output's massive channel is divided by c and
  appended c−1 more times, its weight row repeated (outlier channel splitting).

Measured on all-MiniLM-L6-v2 (72 real sentences, min cosine of the mean-pooled embeddings, see
benchmarks/results/quantize_dynamic.md): per-tensor with smoothing and outlier channels 0.9936;
per-token, symmetric with centering 0.996; asymmetric with the zero point in the kernel 0.998
data-free (0.9975-0.9982 over other seeds of the probe's generated inputs) and 0.9985 with
calibration text (GPTQ weights, split massive channel); ORT's quantize_dynamic 0.970 at its best
setting. The extra per-token nodes put MiniLM at about ORT's per-channel latency.
Extra bias terms go into the bias input of the consumer where it has one (SkipLayerNormalization,
BiasGelu, FastGelu) instead of an Add. Every candidate node's decision and the reason are in the
report (``details["nodes"]``), with the smoothed inputs, the float outlier channels and the probed
token ratios.

``reduce_range`` uses 7-bit weights: on x86 CPUs without VNNI, ORT's u8×s8 kernels add pairs of
products in int16 (``vpmaddubsw``) and can saturate; 7-bit weights avoid that at some accuracy
cost. With VNNI (or AVX-512 VNNI / AMX) full 8-bit weights are exact, so the default is off.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from graphopt.errors import PipelineError

from ..ir_helpers import MS_DOMAIN as _MS
from ..ir_helpers import constant_array, take_place, unique_name
from .base import CommonOptions, QuantizePassBase
from .weight_only import gptq_inverse_factor, gptq_sweep

logger = logging.getLogger("graphopt.passes.quantize.dynamic")

__all__ = ["QuantizeDynamicPass", "gptq_int8", "quantize_weight"]

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
        default=32, metadata=_doc("without calibration data: how many generated inputs the probe runs (it sets "
                                  "smoothing, centering, outlier channels and per-token choices)"))
    probe_length: int = dataclasses.field(
        default=64, metadata=_doc("without calibration data: the size given to the generated inputs' symbolic "
                                  "non-batch dims (sequence length); all-MiniLM-L6-v2's worst sentence: "
                                  "0.9969 with 2 inputs of 8 tokens, 0.9975-0.9982 with 32 of 64 "
                                  "(5 generator seeds)"))
    activations: Literal["auto", "per-token", "per-tensor"] = dataclasses.field(
        default="auto", metadata=_doc(
            "per-token: one 8-bit scale per row (token) of each activation, computed in the graph (ReduceMax, "
            "Div, QuantizeLinear → MatMulIntegerToFloat → Mul; attention as int8 QKV + MultiHeadAttention); "
            "per-tensor: one scale per tensor (DynamicQuantizeMatMul / QAttention: fewer nodes, much less "
            "accurate on trained transformers); auto: per-token where the probe finds a few tokens setting "
            "the range (see token_outlier_ratio), per-tensor elsewhere"))
    asymmetric: bool = dataclasses.field(
        default=True, metadata=_doc(
            "per-token inputs made by a normalization get asymmetric levels (the row's own range, "
            "a zero point per row that the int8 kernel takes as a few extra columns); false: "
            "symmetric levels after per-channel centering (fewer nodes, about twice the activation error)"))
    token_outlier_ratio: float = dataclasses.field(
        default=2.0, metadata=_doc(
            "activations=auto: an input is quantized per token when its probed largest token maximum "
            "exceeds this many times the median token's (probe of 32 generated inputs of 64 tokens: "
            "all-MiniLM-L6-v2's inputs 1.8-14, the lowest one's choice does not matter; random-weight "
            "BERT-base 1.0-1.8, GPT-2 1.2-2.0 and one input at 6.1; text: MiniLM 3.2-9.6)"))
    center: bool = dataclasses.field(
        default=True, metadata=_doc(
            "per-token inputs made by a normalization or an attention op are shifted per channel to the "
            "middle of their probed range before quantization, so each token's values are about "
            "symmetric (int8 levels are symmetric); the shift comes back exactly through the bias "
            "(folded into the norm's shift or the attention's V bias where possible, else one Add)"))
    channel_copies: int = dataclasses.field(
        default=16, metadata=_doc(
            "asymmetric per-token inputs: a channel whose (smoothed) probed maximum exceeds 1.5x the "
            "8th largest is divided by c and appended c−1 more times, its weight row repeated "
            "(outlier channel splitting: the same product, a c times smaller row range for tokens "
            "where that channel is massive); with calibration data only; at most this many extra "
            "columns per input, 0 = off"))
    method: Literal["auto", "rtn", "gptq"] = dataclasses.field(
        default="auto", metadata=_doc("weight rounding: rtn (round to nearest) or gptq (error compensation "
                                      "from the calibration data's activations); auto = gptq when the "
                                      "pipeline has calibration data"))
    damp: float = dataclasses.field(
        default=0.01, metadata=_doc("GPTQ dampening, as a fraction of the Hessian's mean diagonal"))
    hessian_memory_mb: int = dataclasses.field(
        default=1024, metadata=_doc("GPTQ: most memory for the Hessians held at once (more: more calibration runs)"))


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
    modes: ClassVar[dict[str, dict[str, Any]]] = {"dynamic": {}}
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
        if o.probe_length < 1:
            raise PipelineError("quantize-dynamic: probe_length must be >= 1")
        if o.method == "gptq" and not (o.per_channel and o.symmetric):
            raise PipelineError("quantize-dynamic: method=gptq needs per_channel=true and symmetric=true")
        if o.damp <= 0 or o.hessian_memory_mb < 1:
            raise PipelineError("quantize-dynamic: damp must be > 0 and hessian_memory_mb >= 1")

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
        self._opset = int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)) or 0)
        #: per-token quantized inputs, shared by their consumers: id(value) → (levels, row max)
        self._per_token: dict[int, tuple[ir.Value, ir.Value]] = {}
        self._consts: dict[str, ir.Value] = {}
        #: per-token inputs: id(value) → (zero-point columns appended to asymmetric levels, the
        #: split channels appended before them (_decide_copies) or None)
        self._zero_columns: dict[int, tuple[int, np.ndarray | None]] = {}
        o = self.options
        calibration = self.calibration_data()
        if o.method == "gptq" and calibration is None:
            raise PipelineError("quantize-dynamic: method=gptq needs calibration data (calibration=...); "
                                "use method=rtn or auto without it")
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
        for plan in plans:  # decided on the float graph, before smoothing and splitting edit it
            if plan.node.op_type in ("MatMul", "Gemm"):
                plan.per_token = self._per_token_for(plan.node.inputs[0])
        ranges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        token_ratio: dict[str, float] = {}
        if plans and (o.outlier_ratio > 0 or o.smooth > 0 or o.outlier_channels > 0 or o.center
                      or o.activations == "auto"):
            names = sorted({p.node.inputs[0].name for p in plans if p.node.op_type != "Gather"})
            probe: dict[str, Any] = {}
            stats = _probe(model, names, calibration, self.options.probe_batches, ranges, token_ratio,
                           self.options.probe_length, probe)
            self.details["probe"] = probe
            if o.activations == "auto" and stats is not None:
                self._decide_per_token(plans, token_ratio)
            if stats is None:
                self.count("probe:failed")
            else:
                if self.options.outlier_ratio > 0:
                    plans = self._drop_outliers(plans, stats)
                if self.options.smooth > 0:
                    self._decide_smooth(graph, plans, stats)
                if self.options.outlier_channels > 0:
                    self._decide_split(graph, plans, stats)
                if o.activations != "per-tensor":
                    self._decide_levels(graph, plans, ranges)
                    if calibration is not None:
                        # Generated tokens do not make the massive activations real text does
                        # (token ratios 1.7-5.4 vs 3.2-9.6 on all-MiniLM-L6-v2): the split would be
                        # sized for the wrong tokens (measured: no gain without calibration data).
                        self._decide_copies(graph, plans, stats)
        use_gptq = o.method == "gptq" or (o.method == "auto" and calibration is not None
                                           and o.per_channel and o.symmetric)
        self.details["weights"] = "gptq" if use_gptq and plans else "rtn"
        self.details["activations"] = o.activations
        if use_gptq and plans:
            self._gptq(model, plans, calibration)  # on the float graph, before it is edited
        self._apply_smooth(graph, plans)
        self._apply_center(graph, plans)
        self._apply_split(graph, plans)
        self._zero_columns = self._plan_zero_columns(plans)
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

        return _Plan(node, rewrite, table, source=node.inputs[0].name or ""), ""

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

        return _Plan(node, rewrite, w, source=a.name or ""), ""

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

        return _Plan(node, rewrite, w, source=a.name or ""), ""

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

        per_token = self.options.activations != "per-tensor"
        if per_token and mask is not None:
            per_token = False  # MultiHeadAttention's key_padding_mask is not Attention's mask_index
            self.count("per-tensor:attention mask_index")

        def rewrite(graph: ir.Graph, plan: _Plan) -> None:
            if plan.per_token:
                self._emit_mha(graph, node, plan, b, attn_bias)
            else:
                self._emit_qattention(graph, node, node.inputs[0], plan, b, mask, mask_plan)

        return _Plan(node, rewrite, w, source=x.name or "", per_token=per_token, can_per_token=per_token), ""

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

    def _groups(self, graph: ir.Graph, plans: list[_Plan], op_types: tuple[str, ...] | None = None
                ) -> list[tuple[ir.Value, list[_Plan], ir.Node]]:
        """Plans grouped by their input, with the group's first node in graph order."""
        groups: dict[str, list[_Plan]] = {}
        for plan in plans:
            if op_types is None or plan.node.op_type in op_types:
                groups.setdefault(plan.node.inputs[0].name, []).append(plan)
        order = {id(n): i for i, n in enumerate(graph)}
        return [(g[0].node.inputs[0], g, min(g, key=lambda p: order[id(p.node)]).node) for g in groups.values()]

    def _decide_split(self, graph: ir.Graph, plans: list[_Plan], stats: dict[str, np.ndarray]) -> None:
        """Outlier channels of inputs that are not normalization outputs (GELU/ReLU outputs feeding
        an FFN's second projection): a few neurons reach 10-100x the typical channel maximum and
        set the activation scale. They are masked to zero before the int8 kernel and multiplied in
        float on their own (LLM.int8()-style decomposition, channels from the probe). This decides
        (``plan.outliers``); :meth:`_apply_split` edits the graph."""
        o = self.options
        for x, group, _first in self._groups(graph, plans, ("MatMul", "Gemm")):
            producer = _source(x)
            if producer is not None and producer.op_type in _NORMS and o.smooth > 0:
                continue  # smoothed instead
            act = stats.get(x.name)
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
            for plan in group:
                plan.outliers = idx

    def _apply_split(self, graph: ir.Graph, plans: list[_Plan]) -> None:
        for x, group, first in self._groups(graph, [p for p in plans if p.outliers is not None]):
            name, idx = x.name, group[0].outliers
            k = group[0].weight.shape[0]
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

    def _decide_levels(self, graph: ir.Graph, plans: list[_Plan],
                       ranges: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """How two-sided per-token inputs get their levels.

        Attention outputs: symmetric levels after per-channel centering (Outlier Suppression+-
        style shifting) through the V bias (each output row is a convex combination of V rows), which
        costs nothing at run time. Other inputs, norm outputs above all (their shift β and the
        residual stream's outlier channels put a channel's values mostly on one side, and massive
        tokens make rows lopsided): asymmetric levels from each row's own range (``asymmetric``),
        else symmetric levels after centering folded into the norm's shift or one Add. Either way
        ``x·W = (x − δ)·W + δ·W`` and ``δ·W`` (W as the kernel sees it) goes into the bias."""
        o = self.options
        by_node = {id(p.node): p for p in plans}
        for x, group, _first in self._groups(graph, plans, ("MatMul", "Gemm", "Attention")):
            if any(not p.per_token or p.outliers is not None for p in group):
                continue
            for p in group:
                p.asymmetric = o.asymmetric
            r = ranges.get(x.name)
            k = group[0].weight.shape[0]
            producer = _source(x)
            if (not o.center or producer is None or r is None or r[0].shape != (k,)
                    or any(p.weight.shape[0] != k for p in group)):
                continue
            delta = (r[0] + r[1]) / 2.0
            if producer.op_type == "Attention" and id(producer) in by_node and x.producer() is producer:
                if x.is_graph_output() or {id(u.node) for u in x.uses()} != {id(p.node) for p in group}:
                    continue
                if producer.outputs.index(x) != 0:
                    continue
                by_node[id(producer)].v_shift = delta
                for p in group:
                    p.center, p.asymmetric = delta, False
            elif producer.op_type in _NORMS and not o.asymmetric:
                for p in group:
                    p.center = delta / (p.smooth if p.smooth is not None else 1.0)
                    p.center_in_graph = True
            else:
                continue
            self.count("center")

    def _decide_copies(self, graph: ir.Graph, plans: list[_Plan], stats: dict[str, np.ndarray]) -> None:
        """Outlier channel splitting for asymmetric per-token inputs (norm outputs): the residual
        stream's massive channel (all-MiniLM-L6-v2: channel 99 at [CLS]/[SEP]-like tokens, 3-5x
        the next channel after smoothing) sets those tokens' row range, so every other channel
        of those rows gets coarse levels. Divided by c and present c times (weight row repeated),
        it contributes the same product and the row range shrinks; the copies cost c−1 columns
        of K and no pass over the output. Decides ``plan.copies``; the smoothing divides."""
        o = self.options
        if o.channel_copies <= 0 or not o.symmetric or self._opset < 18:
            return
        for x, group, _first in self._groups(graph, plans, ("MatMul", "Gemm", "Attention")):
            if any(not p.per_token or not p.asymmetric or p.outliers is not None or p.smooth is None
                   or p.center is not None for p in group) or _lower_bound(x) is not None:
                continue
            act = stats.get(x.name)
            k = group[0].weight.shape[0]
            if act is None or act.shape != (k,) or k < 16:
                continue
            act = act / group[0].smooth
            target = float(np.sort(act)[-_COPY_RANK])
            if target <= 0:
                continue
            counts = np.ones(k, np.int64)
            budget = o.channel_copies
            for j in np.argsort(-act, kind="stable"):
                if act[j] <= _COPY_RATIO * target or budget <= 0:
                    break
                c = min(int(np.ceil(act[j] / target)), budget + 1)
                counts[j] = c
                budget -= c - 1
            if budget == o.channel_copies:
                continue
            copies = np.repeat(np.arange(k), counts - 1).astype(np.int64)
            for p in group:
                p.copies, p.copy_counts = copies, counts
            self.count("channel_copies", int(copies.size))

    def _apply_center(self, graph: ir.Graph, plans: list[_Plan]) -> None:
        """Subtract the centers of norm-fed inputs in the graph: folded into the norm's shift when
        the norm feeds only these nodes, else one Add shared by them."""
        for x, group, first in self._groups(graph, [p for p in plans if p.center_in_graph]):
            producer = _source(x)
            c = group[0].center
            if producer is not None and producer.op_type in _NORMS and self._fold_into_norm(
                    graph, producer, x, group, None, shift=-c):
                self.count("center:folded")
                continue
            add = ir.Node("", "Add", [x, self._init(graph, f"{first.name or 'center'}_center", (-c).astype(np.float32))],
                          num_outputs=1, name=unique_name(graph, f"{x.name}_center", self._taken))
            y = add.outputs[0]
            y.name, y.shape, y.type = unique_name(graph, f"{x.name}_centered", self._taken), x.shape, x.type
            graph.insert_before(first, add)
            for plan in group:
                plan.node.replace_input_with(0, y)

    def _fold_into_norm(self, graph: ir.Graph, norm: ir.Node, x: ir.Value, group: list[_Plan],
                        inv: np.ndarray | None, shift: np.ndarray | None = None) -> bool:
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
        for j, i in enumerate(slots):
            if shift is not None and j == 0:
                continue  # a shift changes the norm's shift parameter only
            if i is None or i >= len(norm.inputs) or norm.inputs[i] is None:
                if shift is not None:
                    return False  # no shift parameter to fold into (RMSNorm)
                continue
            arr = constant_array(norm.inputs[i])
            size = (inv if inv is not None else shift).shape
            if arr is None or arr.shape != size:
                return False
            params.append((i, arr))
        if not params:
            return False
        for i, arr in params:
            value = arr.astype(np.float64) * inv if inv is not None else arr.astype(np.float64) + shift
            new = self._init(graph, f"{norm.name or 'norm'}_smoothed_param{i}", value.astype(arr.dtype))
            norm.replace_input_with(i, new)
        return True

    def _decide_smooth(self, graph: ir.Graph, plans: list[_Plan], stats: dict[str, np.ndarray]) -> None:
        """SmoothQuant: move activation outliers into the weights, per input channel.

        ``X W = (X / s)(s W)`` with ``s = max|x|^a / max|w|^(1-a)``. This decides ``plan.smooth``;
        :meth:`_apply_smooth` divides the input (folded into the norm, or one Mul shared by the
        consumers of X) and scales the weights, before they are quantized per output channel.
        """
        alpha = self.options.smooth
        for x, group, _first in self._groups(graph, plans):
            producer = _source(x)
            is_norm = producer is not None and producer.op_type in _NORMS
            if not is_norm:
                # Only normalization outputs have a per-channel profile that generated inputs
                # reproduce (it comes from the norm's scale and the residual stream's outlier
                # channels). Elsewhere (GELU, attention outputs) per-channel maxima come from a few
                # tokens, and smoothing by them made MiniLM worse even with real calibration data.
                continue
            act = stats.get(x.name)
            k = group[0].weight.shape[0]
            if act is None or act.shape != (k,) or any(p.weight.shape[0] != k for p in group):
                self.count("smooth:skipped")
                continue
            wmax = np.max(np.stack([np.abs(p.weight).max(axis=1) for p in group]), axis=0).astype(np.float64)
            act = act.astype(np.float64)
            ok = (act > 0) & (wmax > 0)
            scale = np.ones(k)
            scale[ok] = act[ok] ** alpha / wmax[ok] ** (1 - alpha)
            scale = np.clip(scale, 1e-5, 1e5)
            for plan in group:
                plan.smooth = scale

    def _apply_smooth(self, graph: ir.Graph, plans: list[_Plan]) -> None:
        for x, group, first in self._groups(graph, [p for p in plans if p.smooth is not None]):
            name, s = x.name, group[0].smooth
            producer = _source(x)
            # Split channels (see _decide_copies) are divided by their count too; their weight
            # rows are not scaled by it: the c copies add up to the whole product.
            divisor = s * group[0].copy_counts if group[0].copy_counts is not None else s
            if self._fold_into_norm(graph, producer, x, group, 1.0 / divisor):
                self.count("smooth:folded")
            else:
                inv = self._init(graph, f"{first.name or 'smooth'}_smooth_scale", (1.0 / divisor).astype(np.float32))
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

    def _qweight(self, graph: ir.Graph, base: str, w: np.ndarray,
                 quantized: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                 ) -> tuple[ir.Value, ir.Value, ir.Value]:
        o = self.options
        q, scale, zp = quantized if quantized is not None else quantize_weight(
            w, per_channel=o.per_channel, symmetric=o.symmetric, reduce_range=o.reduce_range)
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
        qw, scale, zp = self._qweight(graph, base + "_W", w, plan.quantized)
        if plan.per_token:
            y, bias = self._per_token_matmul(graph, node, a, qw, scale, zp, base, bias, plan.center,
                                             plan.asymmetric)
            y.shape, y.type = out.shape, out.type
            if bias is not None and self._absorb_bias(graph, out, bias, base):
                bias = None
            if bias is not None:
                add = ir.Node("", "Add", [y, self._init(graph, base + "_bias", bias.astype(np.float32))],
                              num_outputs=1, name=unique_name(graph, base + "_bias_add", self._taken))
                graph.insert_before(node, add)
                y = add.outputs[0]
                y.name = unique_name(graph, base + "_quant_out", self._taken)
            self.count("MatMulIntegerToFloat")
        else:
            inputs = [a, qw, scale, zp]
            if bias is not None:
                inputs.append(self._init(graph, base + "_bias", bias.astype(np.float32)))
            new = ir.Node(_MS, "DynamicQuantizeMatMul", inputs, num_outputs=1,
                          name=unique_name(graph, base + "_quant", self._taken))
            graph.insert_before(node, new)
            y = new.outputs[0]
            y.name = unique_name(graph, base + "_quant_out", self._taken)
            self.count("DynamicQuantizeMatMul")
        y.shape, y.type = out.shape, out.type
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
        take_place(out, y)
        for n in [*remove, node]:
            graph.remove(n, safe=True)

    def _absorb_bias(self, graph: ir.Graph, out: ir.Value, bias: np.ndarray, base: str) -> bool:
        """Add ``bias`` to the bias input of the op that is ``out``'s only consumer (through
        reshapes that keep the last axis): a skip-normalization (BERT/GPT-2 output projections) or
        BiasGelu/FastGelu (FFN input projections). Saves an Add over the whole output; False when
        there is no such consumer."""
        value = out
        for _ in range(4):
            uses = value.uses()
            if value.is_graph_output() or len(uses) != 1:
                return False
            user, index = uses[0].node, uses[0].idx
            if user.op_type not in ("Reshape", "Squeeze", "Unsqueeze") or user.domain not in ("", "ai.onnx"):
                break
            nxt = user.outputs[0]
            if index != 0 or nxt.shape is None or len(nxt.shape) == 0 or nxt.shape[-1] != bias.shape[0]:
                return False  # a reshape that moves the last axis would misplace the bias
            value = nxt
        else:
            return False
        slots = {"SkipLayerNormalization": (4, (0, 1)), "SkipSimplifiedLayerNormalization": (3, (0, 1)),
                 "BiasGelu": (1, (0,)), "FastGelu": (1, (0,))}
        if user.domain != _MS or user.op_type not in slots:
            return False
        slot, data_inputs = slots[user.op_type]
        if index not in data_inputs or len(user.inputs) < slot:
            return False
        current = user.inputs[slot] if slot < len(user.inputs) else None
        old = np.zeros(bias.shape) if current is None else constant_array(current)
        if old is None or old.shape != bias.shape:
            return False
        new = self._init(graph, base + "_folded_bias", (old.astype(np.float64) + bias).astype(np.float32))
        if current is None:
            user.resize_inputs(slot + 1)
        user.replace_input_with(slot, new)
        self.count("bias:absorbed")
        return True

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
        self._take_place(graph, node, last.outputs[0], base + "_dequant_out", "Gather")

    def _emit_qattention(self, graph: ir.Graph, node: ir.Node, x: ir.Value, plan: _Plan, b: np.ndarray,
                         mask: ir.Value | None, mask_plan: Any) -> None:
        base = node.name or "attention"
        qw, scale, zp = self._qweight(graph, base + "_W", plan.weight, plan.quantized)
        if plan.v_shift is not None:
            b = b.astype(np.float64).copy()
            b[2 * (b.shape[0] // 3):] -= plan.v_shift
            b = b.astype(np.float32)
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
        self._take_place(graph, node, qa.outputs[0], base + "_quant_out", "QAttention")

    def _take_place(self, graph: ir.Graph, node: ir.Node, y: ir.Value, name: str, counter: str) -> None:
        """``y`` replaces ``node``'s output (its consumers, graph-output slot and name); ``node`` goes."""
        out = node.outputs[0]
        y.name, y.shape, y.type = unique_name(graph, name, self._taken), out.shape, out.type
        take_place(out, y)
        graph.remove(node, safe=True)
        self.count(counter)

    # --- per-token activations ---------------------------------------------------------------
    def _shared_const(self, graph: ir.Graph, key: str, array: np.ndarray) -> ir.Value:
        if key not in self._consts:
            self._consts[key] = self._init(graph, key, array)
        return self._consts[key]

    def _decide_per_token(self, plans: list[_Plan], token_ratio: dict[str, float]) -> None:
        """``activations=auto``: per token where a few tokens set the range (the probed largest
        token maximum exceeds ``token_outlier_ratio`` times the median token's: trained transformers'
        norm outputs, where [CLS]/[SEP]-like tokens carry massive activations), per tensor elsewhere
        (fewer nodes; models without such tokens lose nothing)."""
        limit = self.options.token_outlier_ratio
        for plan in plans:
            ratio = token_ratio.get(plan.node.inputs[0].name)
            if plan.node.op_type == "Gather" or ratio is None:
                continue
            plan.per_token = plan.can_per_token and ratio > limit
            self.details.setdefault("token_ratio", {})[plan.node.inputs[0].name] = round(ratio, 2)

    def _plan_zero_columns(self, plans: list[_Plan]) -> dict[int, tuple[int, np.ndarray | None]]:
        """How many zero-point columns each per-token input needs: enough that every consumer's
        ``-ΣW_q`` per output column splits into int8 rows of magnitude ≤ 127 (zero points ≤ 128,
        see :meth:`_per_token_input`: u8·s8 pairs of padding columns then stay
        inside int16 on CPUs without VNNI, where x86 kernels add products in pairs with
        saturation), a multiple of 4 (the kernels pack K by 4). Weights are quantized here (and
        kept) because their column sums decide it. Returns, per input, the column count and the
        input's split channels (the same for all its consumers: decided per input). ORT's MatMulIntegerToFloat takes one scalar
        zero point for A; the columns stand in for a per-row one. Asymmetric weights (a zero point
        per column) keep the rowmin ⊗ ΣW term after the kernel instead."""
        o = self.options
        need: dict[int, tuple[int, np.ndarray | None]] = {}
        if not o.symmetric:
            return need
        for p in plans:
            if not p.per_token or p.node.op_type == "Gather":
                continue
            x = p.node.inputs[0]
            if p.quantized is None:
                w = p.weight
                if p.side is not None:
                    w = w.copy()
                    w[p.side[1]] = 0.0
                p.quantized = quantize_weight(w, per_channel=o.per_channel, symmetric=True,
                                              reduce_range=o.reduce_range)
            q = p.quantized[0].astype(np.int64)
            if p.copies is not None:
                q = np.concatenate([q, q[p.copies]])
            total = int(np.abs(q.sum(axis=0)).max(initial=0))
            rows = -(-total // _ZERO_ROW_MAX)  # ceil
            columns = -(-rows // 4) * 4
            previous = need.get(id(x), (4, None))[0]  # ≥ 4: the padding holds 0
            need[id(x)] = (max(previous, columns), p.copies)
        return need

    def _per_token_for(self, a: ir.Value) -> bool:
        mode = self.options.activations
        if mode != "auto":
            return mode == "per-token"
        producer = a.producer()
        for _ in range(4):  # a heuristic only (both forms are exact): look through any reshape
            if producer is None or producer.op_type not in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
                break
            producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
        return producer is None or producer.op_type not in _ATTENTION_OPS

    def _per_token_input(self, graph: ir.Graph, x: ir.Value, before: ir.Node, asymmetric: bool) -> _TokenLevels:
        """``x`` quantized per row (token), made once per value and shared by its consumers; the
        levels are uint8 with one scalar zero point, so ORT runs its fast u8×s8 kernels.

        * ``asymmetric``: 255 levels over the row's own range with zero in it, an integer zero
          point per row carried into the kernel by extra columns (:meth:`_plan_zero_columns`);
          with asymmetric weights, ``q = round(255·(x − lo) / (hi − lo))`` from the row's minimum
          and ``lo ⊗ ΣW`` added back after the kernel (:meth:`_per_token_matmul`).
        * symmetric: ``q = round(127·x / max|x|) + 128``.
        * a known lower bound ``-c`` (GELU, SiLU, ReLU outputs, see :func:`_lower_bound`) overrides
          both: ``q = round(255·(x + c) / max(x + c))``, the shift back out of the bias (``c·ΣW``).

        A row of zeros (or a constant row, asymmetric) divides 0 by 0; its levels are then
        arbitrary but finite and are multiplied by a range of 0, so the row comes out exact."""
        hit = self._per_token.get(id(x))
        if hit is not None:
            return hit
        base = x.name or "activation"
        shift = _lower_bound(x)
        nodes: list[ir.Node] = []

        def node(op: str, inputs: list[ir.Value], suffix: str, attrs: list[ir.Attr] | None = None) -> ir.Value:
            n = ir.Node("", op, inputs, attributes=attrs or [], num_outputs=1,
                        name=unique_name(graph, f"{base}_{suffix}", self._taken))
            n.outputs[0].name = unique_name(graph, f"{base}_{suffix}", self._taken)
            n.outputs[0].type = x.type
            nodes.append(n)
            return n.outputs[0]

        def row(op: str, v: ir.Value, suffix: str) -> ir.Value:
            """ReduceMax/ReduceMin over the last axis, kept (axes an input from opset 18 on)."""
            if self._opset >= 18:
                axes = self._shared_const(graph, "per_token_axes", np.array([-1], np.int64))
                return node(op, [v, axes], suffix, [ir.AttrInt64("keepdims", 1)])
            return node(op, [v], suffix, [ir.AttrInt64s("axes", [-1]), ir.AttrInt64("keepdims", 1)])

        rmin = None
        columns, copies = self._zero_columns.get(id(x), (None, None))
        if shift is not None or not asymmetric or self._opset < 18:
            columns = None
        if columns is None and copies is not None:  # the smoothing divided split channels
            raise AssertionError(f"quantize-dynamic: split channels of '{x.name}' without zero-point columns")
        if columns is not None:
            # Integer zero point per row. x is padded with ``columns`` zeros first, so the row's
            # minimum and maximum include 0 (zero is a level) and the padding turns into the zero
            # point itself below. 255 levels over [lo, hi]: q = round(255·x / (hi − lo)) + z with
            # z = round(−255·lo / (hi − lo)) (mirrored rows: q = z − round(255·x / (hi − lo)),
            # z = round(255·hi / (hi − lo)), times −(hi − lo) after the kernel); in the padding
            # q = z. The extra columns of z meet rows of W summing to −ΣW (see
            # _plan_zero_columns), so nothing runs over the output but the row scale. A row of
            # zeros divides 0 by 0: its levels are garbage, times a range of 0.
            levels, zero = 255.0, 0
            if copies is None:
                padded = node("Pad", [x, self._shared_const(graph, f"per_token_pads_{columns}",
                                                            np.array([0, columns], np.int64)),
                                      None, self._shared_const(graph, "per_token_axes", np.array([-1], np.int64))],
                              "padded")
            else:  # split channels, then the zero columns (channel 0 times 0)
                index = np.concatenate([copies, np.zeros(columns, np.int64)])
                keep = np.concatenate([np.ones(copies.size, np.float32), np.zeros(columns, np.float32)])
                extra = node("Gather", [x, self._init(graph, f"{base}_copy_index", index)], "copies",
                             [ir.AttrInt64("axis", -1)])
                extra = node("Mul", [extra, self._init(graph, f"{base}_copy_keep", keep)], "copies_kept")
                padded = node("Concat", [x, extra], "padded", [ir.AttrInt64("axis", -1)])
            lo = row("ReduceMin", padded, "rowmin")
            hi = row("ReduceMax", padded, "rowmax")
            span = node("Sub", [hi, lo], "rowrange")
            # A row reaching further below zero than above is quantized mirrored (levels of −x,
            # range negated): every zero point is then ≤ 128, so a pair of padding columns
            # (z·r + z·r) stays inside int16 with rows up to ±127 (half the columns of ±64).
            flip = node("Less", [node("Add", [hi, lo], "row_balance"),
                                 self._shared_const(graph, "per_token_zero", np.array(0.0, np.float32))],
                        "row_mirrored")
            flip.type = ir.TensorType(ir.DataType.BOOL)
            rmax = node("Where", [flip, node("Neg", [span], "rowrange_negated"), span], "rowrange_signed")
            base = node("Where", [flip, hi, lo], "row_far_side")
            neg_inv = node("Div", [self._shared_const(graph, "per_token_minus_255", np.array(-255.0, np.float32)),
                                   rmax], "neg_inverse_step")
            z = node("Round", [node("Mul", [base, neg_inv], "zero_point_real")], "row_zero_point")
            v = node("Sub", [z, node("Mul", [padded, neg_inv], "scaled")], "shifted_levels")
            unit = self._shared_const(graph, "per_token_unit_step", np.array(1.0, np.float32))
            scale = self._shared_const(graph, f"per_token_scale_{levels:g}", np.array(1.0 / levels, np.float32))
            zp = self._shared_const(graph, f"per_token_zero_point_{zero}", np.array(zero, np.uint8))
            quant = node("QuantizeLinear", [v, unit, zp], "levels")
            quant.type = ir.TensorType(ir.DataType.UINT8)
            for n in nodes:
                graph.insert_before(before, n)
            hit = _TokenLevels(quant, rmax, scale, zp, 0.0, None, columns, copies)
            self._per_token[id(x)] = hit
            self.count("per_token_inputs")
            return hit
        if shift is None and asymmetric:
            # x = lo + range·q/255 per row: the row minimum comes back after the kernel as lo ⊗ ΣW
            # (MatMulIntegerToFloat takes one scalar zero point). Zero need not be a level: these
            # are MatMul inputs, not padded images. A constant row has range 0; its levels are
            # arbitrary, times 0, and lo ⊗ ΣW alone is its exact product.
            levels, zero = 255.0, 0
            rmin = row("ReduceMin", x, "rowmin")
            v = node("Sub", [x, rmin], "from_low")
            rmax = node("Sub", [row("ReduceMax", x, "rowmax"), rmin], "rowrange")
        elif shift is None:
            v, levels, zero = x, 127.0, 128
            rmax = row("ReduceMax", node("Abs", [x], "abs"), "rowmax")
        else:
            v, levels, zero = x, 255.0, 0
            if shift > 0:
                v = node("Add", [x, self._shared_const(graph, f"per_token_shift_{shift:g}",
                                                       np.array(shift, np.float32))], "shifted")
            rmax = row("ReduceMax", v, "rowmax")
        scale = self._shared_const(graph, f"per_token_scale_{levels:g}", np.array(1.0 / levels, np.float32))
        zp = self._shared_const(graph, f"per_token_zero_point_{zero}", np.array(zero, np.uint8))
        quant = node("QuantizeLinear", [node("Div", [v, rmax], "rownorm"), scale, zp], "levels")
        quant.type = ir.TensorType(ir.DataType.UINT8)
        for n in nodes:
            graph.insert_before(before, n)
        hit = _TokenLevels(quant, rmax, scale, zp, shift or 0.0, rmin)
        self._per_token[id(x)] = hit
        self.count("per_token_inputs")
        return hit

    def _per_token_matmul(self, graph: ir.Graph, node: ir.Node, a: ir.Value, qw: ir.Value, scale: ir.Value,
                          zp: ir.Value, base: str, bias: np.ndarray | None, center: np.ndarray | None = None,
                          asymmetric: bool = False) -> tuple[ir.Value, np.ndarray | None]:
        """``MatMulIntegerToFloat`` of the per-token levels, times the row scale (maximum or range);
        asymmetric levels: the weight gains the zero-point rows, or (asymmetric weights) the row
        minimum's term follows. Returns the output and the bias to add after it (input shift and
        centering folded in)."""
        t = self._per_token_input(graph, a, node, asymmetric)
        q = qw.const_value.numpy()
        if t.zero_columns is not None:
            # Σ(q_x − z)·W_q = [q_x, z, …, z]·[W_q; R] with the rows of R summing to −ΣW_q.
            body = q if t.copies is None else np.concatenate([q, q[t.copies]])
            aug = np.concatenate([body, _zero_point_rows(body, t.zero_columns)]).astype(q.dtype)
            qw.const_value = ir.tensor(aug, name=qw.name)
            qw.shape = ir.Shape(aug.shape)
        inputs: list[ir.Value | None] = [t.levels, qw, t.scale, scale, t.zero_point]
        if not self.options.symmetric:
            inputs.append(zp)
        mm = ir.Node(_MS, "MatMulIntegerToFloat", inputs, num_outputs=1,
                     name=unique_name(graph, base + "_quant", self._taken))
        mm.outputs[0].name = unique_name(graph, base + "_int_out", self._taken)
        mul = ir.Node("", "Mul", [mm.outputs[0], t.rowmax], num_outputs=1,
                      name=unique_name(graph, base + "_rowscale", self._taken))
        mul.outputs[0].name = unique_name(graph, base + "_quant_out", self._taken)
        graph.insert_before(node, mm)
        graph.insert_before(node, mul)
        result = mul.outputs[0]
        if t.rowmin is None and not t.shift and center is None:
            return result, bias
        # The weight as the kernel sees it: the terms below are exact against the int8 product.
        wd = (q.astype(np.float64) - zp.const_value.numpy().astype(np.float64)) \
            * scale.const_value.numpy().astype(np.float64)
        if t.rowmin is not None:  # x = lo + (x − lo): lo ⊗ ΣW after the kernel
            colsum = self._init(graph, base + "_colsum", wd.sum(axis=0).astype(np.float32))
            low = ir.Node("", "Mul", [t.rowmin, colsum], num_outputs=1,
                          name=unique_name(graph, base + "_low_term", self._taken))
            low.outputs[0].name = unique_name(graph, base + "_low_term", self._taken)
            add = ir.Node("", "Add", [result, low.outputs[0]], num_outputs=1,
                          name=unique_name(graph, base + "_low_add", self._taken))
            add.outputs[0].name = unique_name(graph, base + "_quant_asym", self._taken)
            graph.insert_before(node, low)
            graph.insert_before(node, add)
            result = add.outputs[0]
        if t.shift or center is not None:  # x·W = (x + c)·W − c·ΣW and (x − δ)·W + δ·W
            bias = np.zeros(wd.shape[1]) if bias is None else bias.astype(np.float64)
            if t.shift:
                bias = bias - t.shift * wd.sum(axis=0)
            if center is not None:
                bias = bias + center @ wd
        return result, bias

    def _emit_mha(self, graph: ir.Graph, node: ir.Node, plan: _Plan, b: np.ndarray,
                  attn_bias: ir.Value | None) -> None:
        """Packed-QKV ``Attention`` with per-token activations: the QKV projection as a per-token
        int8 MatMul, split into Q, K, V, then ``MultiHeadAttention`` with the QKV bias (ORT's CPU
        MultiHeadAttention has no packed-QKV form; QAttention takes one per-tensor input scale)."""
        base = node.name or "attention"
        x = node.inputs[0]
        qw, scale, zp = self._qweight(graph, base + "_W", plan.weight, plan.quantized)
        if plan.v_shift is not None:
            b = b.astype(np.float64).copy()
            b[2 * (b.shape[0] // 3):] -= plan.v_shift
        qkv, b = self._per_token_matmul(graph, node, x, qw, scale, zp, base, b, plan.center, plan.asymmetric)
        d = plan.weight.shape[1] // 3
        split = ir.Node("", "Split", [qkv, self._init(graph, base + "_qkv_split", np.array([d, d, d], np.int64))],
                        attributes=[ir.AttrInt64("axis", -1)], num_outputs=3,
                        name=unique_name(graph, base + "_qkv_split", self._taken))
        for v, part in zip(split.outputs, "qkv", strict=True):
            v.name, v.type = unique_name(graph, f"{base}_{part}", self._taken), x.type
        graph.insert_before(node, split)
        attrs = [a for k, a in node.attributes.items() if k in ("num_heads", "scale", "mask_filter_value",
                                                                  "unidirectional")]
        inputs = [*split.outputs, self._init(graph, base + "_bias", b.astype(np.float32)), None, attn_bias]
        while inputs[-1] is None:
            inputs.pop()
        mha = ir.Node(_MS, "MultiHeadAttention", inputs, attributes=attrs, num_outputs=1,
                      name=unique_name(graph, base + "_mha", self._taken))
        graph.insert_before(node, mha)
        self._take_place(graph, node, mha.outputs[0], base + "_quant_out", "MultiHeadAttention")

    # --- GPTQ --------------------------------------------------------------------------------
    def _gptq(self, model: ir.Model, plans: list[_Plan], data: Any) -> None:
        """Quantize each weight with GPTQ against its input's Hessian ``X^T X`` from the calibration
        data (float model), transformed as the input is: divided by the SmoothQuant scale, outlier
        channels removed. Weights whose input has no Hessian keep round-to-nearest."""
        o = self.options
        need: dict[str, int] = {}
        for p in plans:
            if p.node.op_type != "Gather" and p.source:
                need[p.source] = p.weight.shape[0]
        done = 0
        for hess in _hessians(model, need, data, o.hessian_memory_mb * 2**20, self.details):
            for p in plans:
                h = hess.get(p.source)
                if h is None or p.node.op_type == "Gather":
                    continue
                h = h.copy()
                if p.smooth is not None:
                    h /= np.outer(p.smooth, p.smooth)
                w = p.weight
                if p.smooth is not None:
                    w = (w.astype(np.float64) * p.smooth[:, None]).astype(np.float32)
                if p.outliers is not None:
                    w = w.copy()
                    w[p.outliers] = 0.0
                    h[p.outliers, :] = 0.0
                    h[:, p.outliers] = 0.0
                p.quantized = gptq_int8(w, h, damp=o.damp, reduce_range=o.reduce_range)
                done += 1
        self.count("gptq", done)


#: Channel splitting: a channel is split when its maximum exceeds _COPY_RATIO x the _COPY_RANK-th largest.
_COPY_RANK, _COPY_RATIO = 8, 1.5

#: Largest magnitude of a zero-point row entry (see QuantizeDynamicPass._plan_zero_columns).
_ZERO_ROW_MAX = 127


def _zero_point_rows(q: np.ndarray, rows: int) -> np.ndarray:
    """``rows`` int8 rows whose sum per column is ``-Σ_k q[k]``, spread evenly (entries ≤ 127)."""
    target = -q.astype(np.int64).sum(axis=0)
    if rows == 0:
        if target.any():
            raise AssertionError("zero-point rows: the weight's column sums need rows")
        return np.zeros((0, q.shape[1]), q.dtype)
    size, sign = np.abs(target), np.sign(target)
    base, extra = size // rows, size % rows
    out = base[None, :] + (np.arange(rows)[:, None] < extra[None, :])
    if out.max(initial=0) > _ZERO_ROW_MAX:
        raise AssertionError("zero-point rows: too few rows for the weight's column sums")
    return (out * sign[None, :]).astype(q.dtype)


@dataclasses.dataclass
class _TokenLevels:
    """A per-token quantized activation: uint8 levels, row maxima, the scalar scale and zero point
    the kernel dequantizes the levels with, and the shift added before quantizing."""

    levels: ir.Value
    rowmax: ir.Value
    scale: ir.Value
    zero_point: ir.Value
    shift: float
    #: Row minima (asymmetric levels): added back as rowmin ⊗ ΣW after the kernel.
    rowmin: ir.Value | None = None
    #: Integer per-row zero point carried into the kernel by this many extra columns of the
    #: levels (asymmetric levels with symmetric weights); None: not this scheme.
    zero_columns: int | None = None
    #: Split channels appended (once per extra copy) before the zero columns.
    copies: np.ndarray | None = None


#: Ops whose outputs have a lower bound -c (c = the shift that makes them non-negative). GELU:
#: min x·Φ(x) = -0.16997 (erf), -0.17004 (tanh form); x·σ(αx): -0.27846/α.
_LOWER_BOUNDS = {"Relu": 0.0, "Sigmoid": 0.0, "Softmax": 0.0, "Gelu": 0.1701, "BiasGelu": 0.1701,
                 "FastGelu": 0.1701}
_ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention", "QAttention"})


def _lower_bound(x: ir.Value) -> float | None:
    """``c`` such that ``x >= -c`` everywhere, from the op that made ``x`` (looking through
    reshapes and the outlier split's 0/1 mask), or None when nothing bounds it."""
    node = x.producer()
    for _ in range(6):
        if node is None:
            return None
        if node.op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"):
            node = node.inputs[0].producer() if node.inputs[0] is not None else None
            continue
        if node.op_type == "Mul" and len(node.inputs) == 2:
            mask = constant_array(node.inputs[1])
            if mask is not None and mask.size and float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0:
                node = node.inputs[0].producer() if node.inputs[0] is not None else None
                continue  # x·m with m in [0, 1] keeps x's lower bound
            return None
        if node.op_type == "QuickGelu" and node.domain == _MS:
            alpha = node.attributes.get_float("alpha", 1.702)
            return 0.27847 / alpha if alpha > 0 else None
        return _LOWER_BOUNDS.get(node.op_type)
    return None


@dataclasses.dataclass
class _Plan:
    """A checked candidate: its node, the rewrite to run, and its (K, N) float weight."""

    node: ir.Node
    rewrite: Any
    weight: np.ndarray
    #: (gathered outlier channels of the input, their indices) when the input is split.
    side: tuple[ir.Value, np.ndarray] | None = None
    #: Input channels computed in float (decided by the probe, applied by _apply_split).
    outliers: np.ndarray | None = None
    #: Whether the plan's activations are quantized per token.
    per_token: bool = True
    #: Whether they can be (an attention with a mask_index cannot).
    can_per_token: bool = True
    #: Per-token levels from the row's own range (norm outputs), else symmetric.
    asymmetric: bool = False
    #: Per-channel shift subtracted from the (smoothed) input, in the kernel's input units.
    center: np.ndarray | None = None
    #: The center is subtracted by a graph edit (norm-fed inputs), not through a V bias.
    center_in_graph: bool = False
    #: For an attention plan: shift to subtract from its V bias (the consumer centers its output).
    v_shift: np.ndarray | None = None
    #: The input's name in the float model (Hessians are collected there).
    source: str = ""
    #: SmoothQuant scale ``s`` folded into the weight (the input is divided by it).
    smooth: np.ndarray | None = None
    #: Split channels (_decide_copies): the input channels appended once more per extra copy,
    #: and each channel's count (the divisor of its values).
    copies: np.ndarray | None = None
    copy_counts: np.ndarray | None = None
    #: The weight already quantized by GPTQ: (int8 levels, scale, zero point).
    quantized: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


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


def _probe(model: ir.Model, names: list[str], calibration: Any, batches: int,
           ranges: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
           token_ratio: dict[str, float] | None = None, length: int = 64,
           used: dict[str, Any] | None = None) -> dict[str, np.ndarray] | None:
    """Per-channel (last axis) max |x| of the named values of the float model (and, into
    ``ranges``, per-channel (min, max), into ``token_ratio`` the largest row maximum over the
    median one): over all the calibration data when given, else over ``batches`` generated inputs
    of ``length`` tokens (outlier channels of trained transformers come from their weights and
    norms, so random tokens show them too; the first token's massive activations show once per
    input). If the model cannot run generated inputs of that size, the default sizes are tried.
    ``used`` receives what was run (for the report)."""
    from graphopt.calibration import CalibrationData

    if calibration is not None:
        if used is not None:
            used["data"] = "calibration"
        try:
            return _probe_stats(model, names, calibration, None, ranges, token_ratio)
        except Exception as exc:  # noqa: BLE001 - the probe is optional; the report counts the failure
            logger.warning("quantize-dynamic probe failed (%s)", exc)
            return None
    from graphopt.verify import generate_inputs

    failure: Exception | None = None
    for dims in (_probe_dims(model, length), None):
        part_ranges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        part_ratio: dict[str, float] = {}
        try:
            data = CalibrationData.from_any([generate_inputs(model, dims=dims, seed=i) for i in range(batches)])
            stats = _probe_stats(model, names, data, batches, part_ranges, part_ratio)
        except Exception as exc:  # noqa: BLE001 - the next sizes, else no probe (the report counts it)
            failure = exc
            continue
        if ranges is not None:
            ranges.update(part_ranges)
        if token_ratio is not None:
            token_ratio.update(part_ratio)
        if used is not None:
            used.update(data="generated", inputs=batches, dims=dims if dims is not None else "default")
        return stats
    logger.warning("quantize-dynamic probe failed on generated inputs (%s)", failure)
    return None


def _probe_dims(model: ir.Model, length: int) -> dict[str, int]:
    """Sizes for generated probe inputs: a symbolic dim that is some input's first axis or is
    named like a batch gets 1, every other symbolic dim (sequence, image side) gets ``length``."""
    dims: dict[str, int] = {}
    for value in model.graph.inputs:
        if value.shape is None:
            continue
        for axis, d in enumerate(value.shape):
            if not isinstance(d, ir.SymbolicDim) or d.value is None:
                continue
            batch = axis == 0 or "batch" in d.value.lower()
            if batch or d.value not in dims:
                dims[d.value] = 1 if batch else length
    return dims


def _probe_stats(model: ir.Model, names: list[str], data: Any, limit: int | None,
                 ranges: dict[str, tuple[np.ndarray, np.ndarray]] | None,
                 token_ratio: dict[str, float] | None) -> dict[str, np.ndarray]:
    """The statistics of :func:`_probe` over ``data``; raises when the model cannot run it."""
    from graphopt.calibration import stream_tensors

    out: dict[str, np.ndarray] = {}
    for tensors in stream_tensors(model, names, data, limit=limit):
        for k, arr in tensors.items():
            a = np.asarray(arr)
            if a.ndim == 0 or a.size == 0:
                continue
            a2 = a.reshape(-1, a.shape[-1]).astype(np.float64)
            lo, hi = a2.min(axis=0), a2.max(axis=0)
            if token_ratio is not None:
                rows = np.abs(a2).max(axis=1)
                med = float(np.median(rows))
                r = float(rows.max() / med) if med > 0 else 1.0
                token_ratio[k] = max(token_ratio.get(k, 0.0), r)
            m = np.maximum(-lo, hi)
            if k not in out or out[k].shape != m.shape:
                out[k] = m
                if ranges is not None:
                    ranges[k] = (lo, hi)
            else:
                out[k] = np.maximum(out[k], m)
                if ranges is not None:
                    ranges[k] = (np.minimum(ranges[k][0], lo), np.maximum(ranges[k][1], hi))
    return out


def gptq_int8(w: np.ndarray, h: np.ndarray, *, damp: float = 0.01, reduce_range: bool = False,
              act_order: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ for the int8 weights of the dynamic kernels: ``w (K, N)``, one symmetric scale per
    output channel (fixed from the weight's range, as round-to-nearest picks it), ``h = X^T X (K, K)``.

    Returns ``(q int8 (K, N), scale float32 (N,), zero_point int8 (N,))`` like
    :func:`quantize_weight`. An input channel that never fires (zero diagonal) gets a zero weight."""
    W = np.asarray(w, dtype=np.float64).T.copy()  # (N, K): one row per output channel
    H = np.asarray(h, dtype=np.float64).copy()
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    qmax = 63 if reduce_range else 127
    scale = (np.abs(W).max(axis=1) / qmax).astype(np.float32)
    scale[scale == 0] = 1.0
    s64 = scale.astype(np.float64)
    # The scales are fixed per output channel, so the columns can go in any order: the largest
    # activations first ("act order"), whose errors the most later columns can absorb.
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(H.shape[0])
    W, H = W[:, perm], H[perm][:, perm]
    levels = np.zeros_like(W)

    def quantize_column(col: int, window: np.ndarray, i: int) -> np.ndarray:
        q = np.clip(np.round(window[:, i] / s64), -qmax, qmax)
        levels[:, col] = q
        return q * s64

    gptq_sweep(W, gptq_inverse_factor(H, damp), quantize_column)
    levels = levels[:, np.argsort(perm)]
    return np.ascontiguousarray(levels.T).astype(np.int8), scale, np.zeros(scale.shape, np.int8)


def _hessians(model: ir.Model, need: dict[str, int], data: Any, budget: int, details: dict[str, Any]
              ) -> Any:
    """Yield ``{name: X^T X}`` (float64) for the named float-model values over the calibration
    data, in groups that fit ``budget`` bytes (one calibration run per group)."""
    from graphopt.calibration import stream_tensors

    groups: list[list[str]] = [[]]
    used = 0
    for name, k in need.items():
        size = k * k * 8
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    details["calibration_runs"] = len(groups)
    tokens = 0
    for names in groups:
        acc: dict[str, np.ndarray] = {}
        tokens = 0
        for values in stream_tensors(model, names, data, description="gptq"):
            for name in names:
                x = np.asarray(values[name], dtype=np.float64)
                x = x.reshape(-1, x.shape[-1])
                acc[name] = acc[name] + x.T @ x if name in acc else x.T @ x
            tokens += x.shape[0]
        details["calibration_tokens"] = tokens
        yield acc

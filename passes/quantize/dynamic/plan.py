"""Planning: which candidates ``quantize-dynamic`` can rewrite, checked on the float graph before
anything is edited, and the per-input choices that need no transform (per-token or per-tensor
activations, float for inputs with extreme outlier channels).

A node stays float when its weight is not a constant 2-D float32 array (a MatMul of two
activations among them), when its input is not float32 (MatMul and Gemm give it the weight's type,
so an unknown dtype is float32), or when it has a form the kernels lack; the reason goes into the
report. An input of unknown rank gets per-tensor activations (the kernel takes any rank)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from ...ir_helpers import MS_DOMAIN, constant_array
from .emit_attention import ATTENTION_ATTRS, MaskPlan, raw_mask

if TYPE_CHECKING:
    from .run import Run

__all__ = [
    "ATTENTION_OPS",
    "Plan",
    "candidates",
    "const_weight",
    "decide_per_token",
    "drop_outliers",
    "per_token_for",
    "plan_node",
    "weight_problem",
]

#: Ops whose outputs (attention rows) need not be quantized per token in ``activations=auto``.
ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention", "QAttention"})


@dataclasses.dataclass
class Plan:
    """A checked candidate: its node, its (K, N) float weight, what its lowering needs (fixed
    when planned), and the choices the probe-driven steps make for it."""

    node: ir.Node
    weight: np.ndarray
    #: The input's name in the float model (Hessians are collected there).
    source: str = ""
    #: The bias the kernel adds: a MatMul's following Add constant, a Gemm's ``beta·C``, an
    #: Attention's packed QKV bias.
    bias: np.ndarray | None = None
    #: The Add after a MatMul whose constant is ``bias`` (replaced together with the MatMul).
    bias_add: ir.Node | None = None
    #: Attention: its mask_index, the raw mask made from its attention_bias (QAttention), and
    #: the attention_bias itself (MultiHeadAttention).
    mask: ir.Value | None = None
    mask_plan: MaskPlan | None = None
    attention_bias: ir.Value | None = None
    #: (gathered outlier channels of the input, their indices) when the input is split.
    side: tuple[ir.Value, np.ndarray] | None = None
    #: Input channels computed in float (decided by the probe, applied by the split transform).
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
    #: SmoothQuant scale ``s`` folded into the weight (the input is divided by it).
    smooth: np.ndarray | None = None
    #: Split channels: the input channels appended once more per extra copy, and each channel's
    #: count (the divisor of its values).
    copies: np.ndarray | None = None
    copy_counts: np.ndarray | None = None
    #: The weight already quantized (GPTQ, or for the zero-point columns): (int8 levels, scale, zero point).
    quantized: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


def candidates(graph: ir.Graph, op_types: list[str]) -> list[ir.Node]:
    """The nodes of ``op_types`` the pass knows: standard MatMul/Gemm/Gather, ORT's Attention."""
    out = []
    for node in graph:
        if node.op_type not in op_types:
            continue
        if node.op_type == "Attention" and node.domain == MS_DOMAIN:
            out.append(node)
        elif node.op_type in ("MatMul", "Gemm", "Gather") and node.domain in ("", "ai.onnx"):
            out.append(node)
    return out


def plan_node(run: Run, node: ir.Node) -> tuple[Plan | None, str]:
    """The plan for a candidate, or None and why it stays float."""
    if node.op_type == "MatMul":
        return _plan_matmul(run, node)
    if node.op_type == "Gemm":
        return _plan_gemm(run, node)
    if node.op_type == "Gather":
        return _plan_gather(run, node)
    return _plan_attention(run, node)


def const_weight(value: ir.Value | None) -> np.ndarray | None:
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


def weight_problem(run: Run, w: np.ndarray | None, what: str) -> str:
    if w is None:
        return f"{what} is not a constant"
    if w.dtype != np.float32:
        return f"{what} is {w.dtype}, not float32"
    if w.ndim != 2:
        return f"{what} is {w.ndim}-D, not 2-D"
    if w.size < run.options.min_size:
        return f"weight smaller than min_size ({w.size} < {run.options.min_size})"
    return ""


def _plan_gather(run: Run, node: ir.Node) -> tuple[Plan | None, str]:
    """An embedding lookup in a constant 2-D table (see :mod:`.emit_gather`)."""
    table = constant_array(node.inputs[0])
    if table is None:
        return None, "table is not a constant"
    why = weight_problem(run, table, "table")
    if why:
        return None, why
    if node.attributes.get_int("axis", 0) != 0:
        return None, "Gather along an axis other than 0"
    if len(node.inputs[0].uses()) != 1:
        return None, "table shared with other nodes"
    return Plan(node, table, source=node.inputs[0].name or ""), ""


def _plan_matmul(run: Run, node: ir.Node) -> tuple[Plan | None, str]:
    a, b = node.inputs[0], node.inputs[1]
    w = const_weight(b)
    if w is None:
        return None, "weight is an activation (activation x activation)" if b is not None else "no weight"
    why = weight_problem(run, w, "weight")
    if why:
        return None, why
    if a is None or (a.dtype is not None and a.dtype != ir.DataType.FLOAT):
        return None, f"input is {a.dtype if a is not None else 'missing'}, not float32"
    # MatMul's schema gives A the weight's type (float32), so an unknown dtype is float32. An
    # unknown rank is fine for DynamicQuantizeMatMul (ORT broadcasts any rank >= 1 against a 2-D
    # weight); only the per-token lowering builds rank-dependent nodes (Pad), so it is ruled out.
    if a.shape is not None and len(a.shape) < 2:
        return None, "input is 1-D (need rank >= 2)"
    bias, add = _bias_after(node, w.shape[1])
    known = a.shape is not None
    if not known:
        run.count("per-tensor:input rank unknown")
    return Plan(
        node, w, source=a.name or "", bias=bias, bias_add=add, per_token=known, can_per_token=known
    ), ""


def _plan_gemm(run: Run, node: ir.Node) -> tuple[Plan | None, str]:
    attrs = node.attributes
    if attrs.get_int("transA", 0) != 0:
        return None, "Gemm with transA"
    alpha, beta = attrs.get_float("alpha", 1.0), attrs.get_float("beta", 1.0)
    a, b = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    w = const_weight(b)
    if w is None:
        return None, "weight is an activation (activation x activation)" if b is not None else "no weight"
    if attrs.get_int("transB", 0):
        w = np.ascontiguousarray(w.T) if w.ndim == 2 else w
    why = weight_problem(run, w, "weight")
    if why:
        return None, why
    if a is None or (a.dtype is not None and a.dtype != ir.DataType.FLOAT):
        return None, f"input is {a.dtype if a is not None else 'missing'}, not float32"
    w = (w * np.float32(alpha)).astype(np.float32) if alpha != 1.0 else w
    bias = None
    if c is not None:
        cb = const_weight(c)
        if cb is None or cb.dtype != np.float32 or cb.size not in (1, w.shape[1]) or cb.ndim > 2:
            return None, "Gemm C is not a constant vector"
        bias = np.broadcast_to(cb.reshape(-1) * np.float32(beta), (w.shape[1],)).astype(np.float32)
    return Plan(node, w, source=a.name or "", bias=bias), ""


def _bias_after(node: ir.Node, n: int) -> tuple[np.ndarray | None, ir.Node | None]:
    """The constant bias of an ``Add`` that is the MatMul's only consumer (fused into the kernel)."""
    out = node.outputs[0]
    if out.is_graph_output() or len(out.uses()) != 1:
        return None, None
    user = out.uses()[0].node
    if user.op_type != "Add" or user.domain not in ("", "ai.onnx") or len(user.inputs) != 2:
        return None, None
    other = user.inputs[1] if user.inputs[0] is out else user.inputs[0]
    bias = const_weight(other)
    if bias is None or bias.dtype != np.float32 or bias.shape not in ((n,), (1, n)):
        return None, None
    y, z = node.outputs[0].shape, user.outputs[0].shape
    if y is None or z is None:
        # Unknown ranks: only a 1-D bias surely keeps the MatMul output's shape (a (1, n) one
        # would add an axis to a 1-D result).
        if bias.shape != (n,):
            return None, None
    elif list(z) != list(y):
        return None, None
    return bias.reshape(n), user


def _plan_attention(run: Run, node: ir.Node) -> tuple[Plan | None, str]:
    ins = list(node.inputs) + [None] * (7 - len(node.inputs))
    x, wv, bv, mask, past, attn_bias = ins[0], ins[1], ins[2], ins[3], ins[4], ins[5]
    if len(node.outputs) > 1 and any(o is not None and o.uses() for o in node.outputs[1:]):
        return None, "Attention with present output (KV cache)"
    if past is not None or (len(ins) > 6 and ins[6] is not None):
        return None, "Attention with past state"
    w = const_weight(wv)
    why = weight_problem(run, w, "packed QKV weight")
    if why:
        return None, why
    b = const_weight(bv)
    if b is None or b.dtype != np.float32 or b.shape != (w.shape[1],):
        return None, "packed QKV bias is not a constant vector"
    if not _float32(x):
        return None, "input dtype unknown (need float32)"
    unknown = sorted(set(node.attributes) - ATTENTION_ATTRS)
    if unknown or node.attributes.get_int("do_rotary", 0):
        return None, f"Attention attributes QAttention lacks: {unknown or ['do_rotary']}"
    sizes = node.attributes.get_ints("qkv_hidden_sizes", None)
    if sizes is not None and len(set(sizes)) != 1:
        return None, "different Q/K/V hidden sizes (QAttention needs equal sizes)"
    mask_plan = None
    if attn_bias is not None:
        if mask is not None:
            return None, "Attention with both mask_index and attention_bias"
        mask_plan = raw_mask(attn_bias)
        if mask_plan is None:
            return None, "attention_bias is not Where(mask, 0, -big) (QAttention has no bias input)"
    elif mask is not None and mask.dtype != ir.DataType.INT32:
        return None, "mask_index is not int32"

    per_token = run.options.activations != "per-tensor"
    if per_token and mask is not None:
        per_token = False  # MultiHeadAttention's key_padding_mask is not Attention's mask_index
        run.count("per-tensor:attention mask_index")
    return Plan(
        node,
        w,
        source=x.name or "",
        bias=b,
        mask=mask,
        mask_plan=mask_plan,
        attention_bias=attn_bias,
        per_token=per_token,
        can_per_token=per_token,
    ), ""


# ---------------------------------------------------------------------------------------------
# Choices per input


def per_token_for(mode: str, a: ir.Value) -> bool:
    """Whether a MatMul/Gemm input starts out per token: as ``activations`` says, or (auto) for
    anything but attention outputs until the probe decides (:func:`decide_per_token`)."""
    if mode != "auto":
        return mode == "per-token"
    producer = a.producer()
    for _ in range(4):  # a heuristic only (both forms are exact): look through any reshape
        if producer is None or producer.op_type not in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            break
        producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    return producer is None or producer.op_type not in ATTENTION_OPS


def decide_per_token(run: Run) -> None:
    """``activations=auto``: per token where a few tokens set the range (the probed largest
    token maximum exceeds ``token_outlier_ratio`` times the median token's: trained transformers'
    norm outputs, where [CLS]/[SEP]-like tokens carry massive activations), per tensor elsewhere
    (fewer nodes; models without such tokens lose nothing)."""
    limit = run.options.token_outlier_ratio
    for plan in run.plans:
        ratio = run.token_ratio.get(plan.node.inputs[0].name)
        if plan.node.op_type == "Gather" or ratio is None:
            continue
        plan.per_token = plan.can_per_token and ratio > limit
        run.details.setdefault("token_ratio", {})[plan.node.inputs[0].name] = round(ratio, 2)


def drop_outliers(run: Run) -> None:
    """``outlier_ratio``: leave in float the plans whose input's largest channel maximum exceeds
    that many times the median channel's."""
    assert run.stats is not None
    kept = []
    ratios = {}
    for plan in run.plans:
        name = plan.node.inputs[0].name
        absmax = run.stats.get(name)
        if absmax is None or plan.node.op_type == "Gather":
            kept.append(plan)
            continue
        ratio = float(absmax.max() / max(float(np.median(absmax)), 1e-12))
        ratios[name] = round(ratio, 2)
        if ratio > run.options.outlier_ratio:
            run.decide(
                plan.node,
                False,
                f"input channel outliers: max/median {ratio:.0f} > {run.options.outlier_ratio:g}",
            )
            continue
        kept.append(plan)
    run.details["input_outlier_ratio"] = dict(sorted(ratios.items()))
    run.plans = kept

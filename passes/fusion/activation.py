"""Decomposed activations → standard ONNX ops: GELU (erf and tanh forms) → ``Gelu`` (opset 20),
HardSwish/HardSigmoid, Relu/Clip chains, and x·Sigmoid(x) → ``Swish`` (opset 24).

GELU matching is our own: onnxscript's GELU rules emit com.microsoft ops and match one association
each, while exporters write the formula in several. HardSwish and Relu/Clip chains are
onnxscript's rules (``rules.common``) with guards they lack; each guard's docstring says why.
``Swish`` exists only from opset 24, so SiLU stays decomposed below that.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import _fuse_hardswish, _fuse_relus_clips

from ..ir_helpers import all_nodes, infer_shapes, is_standard, replace_value
from ..ir_helpers import constant_array as _constant
from ._base import STANDARD, FusionPass, FusionRule, from_onnxscript
from .gelu_match import match_gelu

__all__ = ["FuseActivationsPass"]

_GELU_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16})


# ---------------------------------------------------------------------------------------------
# GELU (matched by :mod:`.gelu_match`, shared with FastGelu)


def _fuse_gelu(model: ir.Model, op_type: str, approximate: str) -> int:
    """Decomposed GELU around each ``op_type`` (Erf/Tanh) node → ``Gelu(approximate)``.

    onnxscript's GELU rules (``ort_fusions.gelu``/``erfgelu``) emit the ``com.microsoft`` ops and
    match one association each; :func:`.gelu_match.match_gelu` takes the forms exporters write.
    """
    count = 0
    for node in all_nodes(model):
        if node.graph is None or not is_standard(node, op_type):
            continue
        match = match_gelu(node, approximate)
        if match is None or match.x.dtype not in _GELU_TYPES:
            continue
        if any(n.graph is not node.graph for n in match.nodes):
            continue
        graph = node.graph
        final_out = match.final.outputs[0]
        gelu = ir.node("Gelu", [match.x], {"approximate": approximate}, name=match.final.name)
        gelu.outputs[0].type = final_out.type
        gelu.outputs[0].shape = final_out.shape
        graph.insert_before(match.final, gelu)
        if not replace_value(match.final, final_out, gelu.outputs[0]):
            graph.remove(gelu, safe=True)
            continue
        graph.remove([n for n in match.nodes if n is not match.final], safe=True)
        count += 1
    return count


def _gelu_erf(model: ir.Model) -> int:
    return _fuse_gelu(model, "Erf", "none")


def _gelu_tanh(model: ir.Model) -> int:
    return _fuse_gelu(model, "Tanh", "tanh")


# ---------------------------------------------------------------------------------------------
# HardSwish / HardSigmoid (onnxscript's rules, guarded)

_HARD_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})


def _hard_guard(result: pattern.MatchResult, x: ir.Value, *consts: ir.Value) -> pattern.MatchResult:
    """The guard onnxscript's HardSwish/HardSigmoid rules lack: they accept single-element
    constants of any rank, and ``x + [[[3]]]`` broadcasts a rank-1 x to rank 3; and ONNX Runtime
    has no double HardSigmoid or HardSwish kernel, so the rule is limited to float and float16
    (the decomposition runs in double).
    """
    if not result:
        return result
    if x.dtype not in _HARD_TYPES:
        return result.fail(f"dtype {x.dtype} has no HardSigmoid/HardSwish kernel in ONNX Runtime", x)
    rank = None if x.shape is None else len(x.shape)
    for c in consts:
        arr = _constant(c)
        if arr is None or arr.ndim > (0 if rank is None else rank):
            return result.fail("constant would broadcast x to a larger rank", c)
    return result


class _HardSwish(_fuse_hardswish.HardSwishFusion):
    def check(self, op, x, clip_min, clip_max, bias, divisor):  # type: ignore[override]
        return _hard_guard(super().check(op, x, clip_min, clip_max, bias, divisor), x, bias, divisor)


class _HardSigmoid(_fuse_hardswish.HardSigmoidFusion):
    def check(self, op, x, clip_min, clip_max, bias, divisor):  # type: ignore[override]
        return _hard_guard(super().check(op, x, clip_min, clip_max, bias, divisor), x, bias, divisor)


class _HardSwishFromHardSigmoid(_fuse_hardswish.HardSwishFusionFromHardSigmoid):
    def check(self, op, x, hardsigmoid_out):  # type: ignore[override]
        return _hard_guard(super().check(op, x, hardsigmoid_out), x)


class _HardSwishAsHardSigmoidMul(_HardSwish):
    """x·Clip(x+3, 0, 6)/6 → x·HardSigmoid(x) where HardSwish does not exist yet (opset < 14):
    two ops instead of four, and the very ops ONNX Runtime's CPU provider runs for a HardSwish
    (it inlines HardSwish's function body), so static int8 quantizes the same Mul either way."""

    def rewrite(self, op, x, clip_min, clip_max, bias, divisor):  # type: ignore[override]
        return op.Mul(x, op.HardSigmoid(x, alpha=1 / 6, beta=0.5))


def _hard_swish_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(
        [_HardSwish().rule(), _HardSigmoid().rule(), _HardSwishFromHardSigmoid().rule()], commute=True
    )


def _hard_sigmoid_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([_HardSwishAsHardSigmoidMul().rule(), _HardSigmoid().rule()], commute=True)


# ---------------------------------------------------------------------------------------------
# Relu / Clip chains (onnxscript's rules, guarded)


_RELU_BOUNDS = (0.0, math.inf)


def _clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    """(min, max) of an opset-11+ Clip with constant scalar bounds and min <= max; else None."""
    lo, hi = -math.inf, math.inf
    for i in (1, 2):
        v = node.inputs[i] if len(node.inputs) > i else None
        if v is None:
            continue
        arr = _constant(v)
        if arr is None or arr.size != 1:
            return None
        val = float(arr.astype(np.float64).reshape(-1)[0])
        if math.isnan(val):
            return None
        if i == 1:
            lo = val
        else:
            hi = val
    if lo > hi:
        return None  # a degenerate Clip (every output = max): leave it alone
    return lo, hi


def _clip_guard(
    result: pattern.MatchResult, x: ir.Value, b1: tuple[float, float] | None, b2: tuple[float, float] | None
) -> pattern.MatchResult:
    """The guard onnxscript's Relu/Clip chain rules lack: ``FuseSuccessiveClip``/``ClipRelu``/
    ``ReluClip`` intersect the ranges without checking that the intersection is non-empty:
    ``Relu(Clip(x, -5, -1))`` is 0 everywhere, the merged ``Clip(x, 0, -1)`` is -1 (ONNX Clip
    returns ``max`` when ``min > max``). They also read Clip's bounds from inputs only, so an
    opset < 11 Clip (bounds as attributes) counts as unbounded; the rule is limited to opset ≥ 11.
    """
    if not result:
        return result
    if x.dtype is None:
        return result.fail("input dtype unknown", x)
    if b1 is None or b2 is None:
        return result.fail("Clip bounds not constant scalars with min <= max")
    if max(b1[0], b2[0]) > min(b1[1], b2[1]):
        return result.fail("the two ranges do not intersect: the merged Clip would return its max")
    return result


class _ConstantBounds:
    """Emit the merged bounds as Constant nodes. onnxscript's rewrite names its new initializers
    ``{x}_min``/``{x}_max``; a second chain on the same x collides with the first, and the
    rewriter then leaves the new Clip reading a value that no initializer defines (invalid model)."""

    def rewrite(self, op, x, **kw):
        first = kw["out_first_clip"].producer()
        second = kw["out_second_clip"].producer() if kw.get("out_second_clip") is not None else None
        lo, hi = self.compute_clip_min_max(first, second)  # type: ignore[attr-defined]
        args = [
            x,
            None if lo is None else op.Constant(value=lo),
            None if hi is None else op.Constant(value=hi),
        ]
        while args[-1] is None:
            args.pop()
        return op.Clip(*args)


class _SuccessiveClip(_ConstantBounds, _fuse_relus_clips.FuseSuccessiveClip):  # Clip(Clip(x))
    def check(self, context, **kw):  # type: ignore[override]
        first, second = kw["out_first_clip"].producer(), kw["out_second_clip"].producer()
        return _clip_guard(super().check(context, **kw), kw["x"], _clip_bounds(first), _clip_bounds(second))


class _SuccessiveClipRelu(_ConstantBounds, _fuse_relus_clips.FuseSuccessiveClipRelu):  # Clip(Relu(x))
    def check(self, context, **kw):  # type: ignore[override]
        clip = _clip_bounds(kw["out_first_clip"].producer())
        return _clip_guard(super().check(context, **kw), kw["x"], _RELU_BOUNDS, clip)


class _SuccessiveReluClip(_ConstantBounds, _fuse_relus_clips.FuseSuccessiveReluClip):  # Relu(Clip(x))
    def check(self, context, **kw):  # type: ignore[override]
        clip = _clip_bounds(kw["out_first_clip"].producer())
        return _clip_guard(super().check(context, **kw), kw["x"], clip, _RELU_BOUNDS)


def _clip_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(
        [_SuccessiveClipRelu().rule(), _SuccessiveReluClip().rule(), _SuccessiveClip().rule()]
    )


# ---------------------------------------------------------------------------------------------
# SiLU → Swish (opset 24)


class _SiLU(pattern.RewriteRuleClassBase):
    """x · Sigmoid(x) → Swish(x) (alpha = 1).

    The standard ``Swish`` op exists only from opset 24 (checked in ``onnx.defs``; opset 24 is
    its first version), so ``x·Sigmoid(x)`` stays as it is below that.
    """

    def pattern(self, op, x):
        return op.Mul(x, op.Sigmoid(x))

    def check(self, context, x, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.dtype not in _GELU_TYPES:
            return result.fail(f"dtype {x.dtype} is not a Swish type", x)
        return result

    def rewrite(self, op, x, **_):
        return op.Swish(x)


class FuseActivationsPass(FusionPass):
    """Fuse decomposed activations into standard ONNX ops: Gelu (opset 20), HardSwish (14; below
    that x·HardSigmoid(x), from 11),
    merged Relu/Clip chains (Clip bounds as inputs: 11), Swish (24).

    Safe because each rule emits an op only at opsets that define it, matches constants within
    1e-5 relative and only as single elements that cannot broadcast x, needs every
    intermediate to be used only inside the pattern, and keeps graph output names.
    """

    name = "fuse-activations"
    RULES: ClassVar = (
        FusionRule(
            "gelu-erf",
            "½·x·(1+erf(x/√2)) in any association → Gelu(approximate=none)",
            _gelu_erf,
            STANDARD,
            min_opset=20,
        ),
        FusionRule(
            "gelu-tanh",
            "½·x·(1+tanh(√(2/π)·(x+0.044715·x³))) → Gelu(approximate=tanh)",
            _gelu_tanh,
            STANDARD,
            min_opset=20,
        ),
        FusionRule(
            "hard-swish",
            "x·Clip(x+3,0,6)/6 → HardSwish; Clip(x+3,0,6)/6 → HardSigmoid",
            from_onnxscript(_hard_swish_rules()),
            STANDARD,
            min_opset=14,
        ),
        FusionRule(
            "hard-sigmoid",
            "x·Clip(x+3,0,6)/6 → x·HardSigmoid(x); Clip(x+3,0,6)/6 → HardSigmoid (below opset 14, and "
            "what hard-swish leaves)",
            from_onnxscript(_hard_sigmoid_rules()),
            STANDARD,
            min_opset=11,
        ),
        FusionRule(
            "relu-relu",
            "Relu(Relu(x)) → Relu(x)",
            from_onnxscript(_fuse_relus_clips.successive_relu_rule),
            STANDARD,
        ),
        FusionRule(
            "clip-chains",
            "Clip(Clip(x)), Clip(Relu(x)), Relu(Clip(x)) → one Clip",
            from_onnxscript(_clip_rules()),
            STANDARD,
            min_opset=11,
        ),
        FusionRule(
            "silu",
            "x·Sigmoid(x) → Swish(x)",
            from_onnxscript(pattern.RewriteRuleSet([_SiLU.rule()], commute=True)),
            STANDARD,
            min_opset=24,
        ),
    )

    def prepare(self, model: ir.Model) -> bool:
        return infer_shapes(model)  # constants are checked against the rank of x

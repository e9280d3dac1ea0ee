"""Decomposed LayerNorm and RMSNorm → the standard ``LayerNormalization`` (opset 17) and
``RMSNormalization`` (opset 23) ops.

Built on onnxscript's ``rules.fusion._layer_norm.LayerNormFusion`` and
``_rms_normalization.RmsNormFusion``: we keep their dtype and epsilon checks and their replacement
ops, and widen or guard them where they fall short on real graphs (see
:class:`FuseNormalizationPass`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.fusion import _layer_norm, _rms_normalization

from ..ir_helpers import constant_array as _constant
from ..ir_helpers import infer_shapes
from ._base import STANDARD, FusionPass, FusionRule, from_onnxscript

__all__ = ["FuseNormalizationPass"]

_COMPUTE_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE})


# ---------------------------------------------------------------------------------------------
# Checks shared by both rules


def _reduce_axes(node: ir.Node, rank: int) -> list[int] | None:
    """The sorted non-negative axes a ReduceMean reduces (attribute or input form), or None."""
    if node.attributes.get_int("keepdims", 1) != 1:
        return None
    if len(node.inputs) > 1:
        arr = _constant(node.inputs[1])
        if arr is None or arr.dtype.kind not in "iu" or arr.ndim != 1:
            return None
        axes = [int(a) for a in arr]
    else:
        attr = node.attributes.get("axes")
        if attr is None:
            return None
        axes = list(attr.as_ints())
    if not axes or any(not -rank <= a < rank for a in axes):
        return None
    norm = sorted({a % rank for a in axes})
    return norm if len(norm) == len(axes) else None


def _trailing_axis(x: ir.Value, *reductions: ir.Value, result: pattern.MatchResult) -> int | None:
    """The ``axis`` attribute (negative) when every reduction reduces the same trailing axes."""
    if x.shape is None:
        result.fail("rank of the input unknown", x)
        return None
    rank = len(x.shape)
    found = None
    for v in reductions:
        node = v.producer()
        axes = None if node is None else _reduce_axes(node, rank)
        if axes is None:
            result.fail("ReduceMean axes not constant or keepdims=0", v)
            return None
        if found is not None and axes != found:
            result.fail(f"ReduceMeans reduce different axes {found} and {axes}", v)
            return None
        found = axes
    assert found is not None
    if found != list(range(found[0], rank)):
        result.fail(f"axes {found} are not the trailing axes of a rank-{rank} input", x)
        return None
    return found[0] - rank


def _scalar_ok(value: ir.Value | None, x: ir.Value, exact: float | None = None) -> bool:
    """A single-element constant that cannot broadcast ``x`` to a larger rank (and == exact)."""
    arr = _constant(value)
    if arr is None or arr.size != 1 or x.shape is None or arr.ndim > len(x.shape):
        return False
    if arr.dtype.kind != "f" and exact is None:
        return False
    v = float(arr.astype(np.float64).reshape(-1)[0])
    return bool(np.isfinite(v)) and (exact is None or v == exact)


def _same_dims(a: ir.Shape | None, dims: list[Any]) -> bool:
    if a is None or len(a) != len(dims):
        return False
    return all(
        isinstance(p, int) and p == q or (not isinstance(p, int) and p == q and p.value is not None)
        for p, q in zip(a, dims)
    )


def _param_ok(param: ir.Value | None, x: ir.Value, axis: int, dtype: ir.DataType) -> bool:
    """Scale/bias: exactly the normalized shape ``x.shape[axis:]`` and the expected dtype."""
    if param is None or param.dtype != dtype or x.shape is None:
        return False
    return _same_dims(param.shape, list(x.shape)[axis:])


# ---------------------------------------------------------------------------------------------
# LayerNormalization


def _check_operands(
    rule: Any,
    result: pattern.MatchResult,
    x: ir.Value,
    epsilon: ir.Value,
    two: ir.Value | None,
    scale: ir.Value,
    axis: int,
) -> pattern.MatchResult:
    """Checks both norms share: constant epsilon, exponent exactly 2, scale of the normalized shape;
    records the axis on the rule for its rewrite."""
    if not _scalar_ok(epsilon, x):
        return result.fail("epsilon is not a finite single-element constant of rank <= rank(x)", epsilon)
    if two is not None and not _scalar_ok(two, x, exact=2.0):
        return result.fail("Pow exponent is not exactly 2", two)
    if not _param_ok(scale, x, axis, x.dtype):
        return result.fail(
            f"scale {scale.shape} {scale.dtype} is not of the normalized shape/type of x {x.shape}", scale
        )
    rule._axis = axis
    return result


class _LayerNorm(_layer_norm.LayerNormFusion):
    """Mean/variance decomposition, normalized · scale → LayerNormalization(x, scale)."""

    def __init__(self, name: str, *, axes_attribute: bool, scale_first: bool) -> None:
        super().__init__(name)
        self._axes_attribute = axes_attribute
        self._scale_first = scale_first

    def pattern(self, op, x, axes1, axes2, two, epsilon, scale):  # type: ignore[override]
        def reduce_mean(v, axes, name):
            if self._axes_attribute:
                return op.ReduceMean(v, axes=axes, _outputs=[name])
            return op.ReduceMean(v, axes, _outputs=[name])

        mean = reduce_mean(x, axes1, "mean")
        deviation = op.Sub(x, mean)
        squared = pattern.OrValue([op.Mul(deviation, deviation), op.Pow(deviation, two)])
        variance = reduce_mean(squared, axes2, "variance")
        std_dev = op.Sqrt(op.Add(variance, epsilon))
        normalized = pattern.OrValue([op.Mul(deviation, op.Reciprocal(std_dev)), op.Div(deviation, std_dev)])
        return op.Mul(scale, normalized) if self._scale_first else op.Mul(normalized, scale)

    def check(self, context, x, epsilon, scale, mean, variance, two=None, **_) -> pattern.MatchResult:  # type: ignore[override]
        result = super().check(context, x=x, epsilon=epsilon)  # dtype float/double, scalar epsilon
        if not result:
            return result
        axis = _trailing_axis(x, mean, variance, result=result)
        if axis is None:
            return result
        return _check_operands(self, result, x, epsilon, two, scale, axis)

    def rewrite(self, op, x, scale, epsilon, **_):  # type: ignore[override]
        return op.LayerNormalization(
            x, scale, axis=self._axis, epsilon=self._epsilon, stash_type=self._stash_type
        )


class _LayerNormBias(_layer_norm.LayerNormBiasFusion):
    """LayerNormalization(x, scale) + bias → LayerNormalization(x, scale, bias)."""

    def check(self, context, x, scale, bias, normalized, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = normalized.producer()
        axis = node.attributes.get_int("axis", -1)
        if x.shape is None or x.dtype is None:
            return result.fail("input shape unknown", x)
        if not -len(x.shape) <= axis < len(x.shape):
            return result.fail("axis out of range", x)
        if len(node.outputs) > 1 and any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            return result.fail("Mean/InvStdDev outputs are used", node)
        if not _param_ok(scale, x, axis, x.dtype) or not _param_ok(bias, x, axis, x.dtype):
            return result.fail(f"bias shape {bias.shape} is not the normalized shape of {x.shape}", bias)
        return result

    def rewrite(self, op, x, scale, bias, normalized, **_):  # type: ignore[override]
        attributes = normalized.producer().attributes
        return op.LayerNormalization(x, scale, bias, **attributes)


def _layer_norm_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(
        [
            _LayerNorm.rule(
                f"LayerNorm{'_axes_attr' if attr else ''}{'_scale_first' if first else ''}",
                axes_attribute=attr,
                scale_first=first,
            )
            for attr in (False, True)
            for first in (False, True)
        ]
    )


def _layer_norm_bias_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([_LayerNormBias.rule("LayerNormBias")], commute=True)


# ---------------------------------------------------------------------------------------------
# RMSNormalization


class _RmsNorm(_rms_normalization.RmsNormFusion):
    """x / sqrt(mean(x²) + ε) · scale, optionally inside Cast(float32) … Cast(back) → RMSNormalization."""

    def pattern(self, op, x, scale, epsilon, compute_dtype, target_dtype, axes, two):  # type: ignore[override]
        xc = pattern.OrValue([op.Cast(x, to=compute_dtype), x])
        squared = pattern.OrValue([op.Pow(xc, two), op.Mul(xc, xc)])
        mean_square = op.ReduceMean(squared, axes, _outputs=["mean_square"])
        rms = op.Sqrt(op.Add(mean_square, epsilon))
        normalized = pattern.OrValue(
            [
                op.Mul(xc, op.Reciprocal(rms)),
                op.Mul(op.Reciprocal(rms), xc),
                op.Div(xc, rms),
            ]
        )
        normalized = pattern.OrValue([op.Cast(normalized, to=target_dtype), normalized])
        return op.Mul(normalized, scale) if self._mul_order else op.Mul(scale, normalized)

    def check(
        self,
        context,
        x,
        scale,
        epsilon,
        compute_dtype,
        target_dtype,
        mean_square,  # type: ignore[override]
        two=None,
        **_,
    ) -> pattern.MatchResult:
        result = super().check(
            context, x=x, scale=scale, epsilon=epsilon, compute_dtype=compute_dtype, target_dtype=target_dtype
        )  # float types, scalar epsilon, stash float/double
        if not result:
            return result
        if (compute_dtype is None) != (target_dtype is None):
            return result.fail("only one of the Cast to the compute type and the Cast back is there")
        if target_dtype is not None and ir.DataType(target_dtype.as_int()) != x.dtype:
            return result.fail("the Cast back does not return to the input's type")
        if compute_dtype is None and x.dtype not in _COMPUTE_TYPES:
            return result.fail(
                "computed in the input's low-precision type; a fused op would compute in float"
            )
        axis = _trailing_axis(x, mean_square, result=result)
        if axis is None:
            return result
        return _check_operands(self, result, x, epsilon, two, scale, axis)

    def rewrite(self, op, x, scale, epsilon, **_):  # type: ignore[override]
        return op.RMSNormalization(
            x,
            scale,
            axis=self._axis,
            epsilon=float(_constant(epsilon).reshape(-1)[0]),
            stash_type=self._stash_dtype,
        )


def _rms_norm_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(
        [
            _RmsNorm.rule("RmsNorm_scale_last", mul_order=True),
            _RmsNorm.rule("RmsNorm_scale_first", mul_order=False),
        ]
    )


class FuseNormalizationPass(FusionPass):
    """Fuse decomposed LayerNorm and RMSNorm into the standard ONNX ops.

    Safe because the reductions must agree on constant trailing axes with ``keepdims=1``,
    epsilon must be a single-element constant, the scale and bias must have exactly the
    normalized shape and the input's dtype, every intermediate must be used only inside the
    pattern, and low-precision decompositions match only with both casts (computed in float32).

    Where onnxscript's rules fall short, and what we do instead:

    * both match ``ReduceMean(x, [-1])`` only: a reduction written with its last axis as a positive
      number, over several trailing axes, or (opset 17) with ``axes`` as an attribute is missed. We
      bind the axes, accept any trailing run of axes ``[k, …, rank-1]`` (what the ops' ``axis`` can
      express), require the two reductions to agree and ``keepdims=1``.
    * ``RmsNormFusion`` requires ``noop_with_empty_axes=0`` to be spelled out, and matches only
      ``Pow(x, 2)`` and ``x * Reciprocal(rms)``; exporters also write ``x*x`` and ``x / rms``.
    * neither checks the scale (or, for ``LayerNormBiasFusion``, the bias): any tensor that
      broadcasts is taken, e.g. a residual ``[B, S, D]`` becomes the LayerNormalization bias. The
      ONNX spec allows unidirectional broadcasting there, but other backends (and older ONNX
      Runtime) require the normalized shape, so we require ``scale.shape == bias.shape ==
      x.shape[axis:]`` and the input's dtype.
    * ``RmsNormFusion`` accepts an up-cast of an fp16 input without the cast back (``Cast(x,
      float) → … → Mul(scale_f32)``) and emits ``RMSNormalization(x_f16, scale_f32)``, which
      ONNX Runtime rejects (the op's function multiplies an fp16 and a float32 tensor); we require
      both casts (the Llama form: up to float32, back to the input's type) or neither.
    * ``Pow(d, 2)`` is matched with a tolerance; ``Pow(d, 2.00001)`` is NaN for negative ``d``, so
      we want the exponent exactly 2.

    LayerNormalization computes in ``stash_type`` precision; a decomposition in float16 without
    casts computes in float16, so a fused op would be more precise than the original and differ from
    it: such sites are refused (the fp16 Cast→float32→…→Cast form matches with its casts kept
    around the fused op).
    """

    name = "fuse-normalization"
    RULES: ClassVar = (
        FusionRule(
            "layer-norm",
            "ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul → LayerNormalization",
            from_onnxscript(_layer_norm_rules()),
            STANDARD,
            min_opset=17,
        ),
        FusionRule(
            "layer-norm-bias",
            "LayerNormalization(x, scale) + bias → LayerNormalization(x, scale, bias)",
            from_onnxscript(_layer_norm_bias_rules()),
            STANDARD,
            min_opset=17,
        ),
        FusionRule(
            "rms-norm",
            "Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul/Mul (± Casts) → RMSNormalization",
            from_onnxscript(_rms_norm_rules()),
            STANDARD,
            min_opset=23,
        ),
    )

    def prepare(self, model: ir.Model) -> bool:
        return infer_shapes(model)  # the checks need the input's rank and the parameters' shapes

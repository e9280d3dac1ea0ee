"""Fold inference-mode BatchNormalization into the weights and bias of the layer before it.

``BN(Conv(x, W, b))`` → ``Conv(x, W·s, (b−μ)·s+β)`` with ``s = γ/√(σ²+ε)`` per output channel;
the same for ConvTranspose (grouped too), Gemm (its ``beta`` folded into the new bias) and
``MatMul(x, W)`` (+ an optional constant ``Add``) whose output is 2-D, where BN over ``[N, C]``
normalizes the MatMul's output columns. Standard ONNX in and out, so every backend benefits.

onnxscript has the Conv/ConvTranspose/Gemm rules (``rules.common._fuse_batchnorm``); we reuse
their patterns and weight scaling (grouped Conv/ConvTranspose, missing bias) but replace their
check and rewrite, which overwrite shared weights and miss mode and shape checks (see
:class:`_FoldChecks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import _fuse_batchnorm as osbn

from ..ir_helpers import constant_array, fresh_name, infer_shapes, model_opset
from ._base import STANDARD, FusionPass, FusionRule, from_onnxscript

__all__ = ["FuseBatchNormPass", "BATCHNORM_RULES"]

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16})


def batchnorm_reason(model: ir.Model, bn: ir.Node) -> str | None:
    """Why ``bn`` is not an inference-mode per-channel normalization (None when it is)."""
    attrs = bn.attributes
    if attrs.get_int("training_mode", 0) != 0:
        return "training_mode=1 uses batch statistics"
    if attrs.get_int("spatial", 1) != 1:
        return "spatial=0 normalizes per activation, not per channel"
    opset = bn.version if bn.version is not None else model_opset(model)
    if opset < 7 and attrs.get_int("is_test", 0) != 1:
        return "is_test=0 (opset < 7) is training mode"
    if len(bn.inputs) != 5 or any(v is None for v in bn.inputs):
        return "BatchNormalization needs scale, bias, mean and variance"
    return None


class _FoldChecks:
    """Check and rewrite shared by the rules (mixed in before an onnxscript rule class, whose
    pattern binds ``x``, ``inbound_out`` (the layer's output) and ``batchnorm_out``).

    Why not onnxscript's check and rewrite:

    * their rewrite writes the fused weight under the *original* weight's name, so it must refuse
      any weight shared with another node; after ``cleanup``'s initializer dedup that is most of
      them (the opset-9 model-zoo graphs fill every weight of a shape with the same constant: it
      folded 8 of light_resnet50's 53 BNs). We write fresh names and leave the original to DCE;
      their missing-bias name (``<weight>_bias``) could also overwrite an unrelated initializer;
    * they do not check ``training_mode`` (opset 14+), ``spatial=0`` (opset 7-8: per-activation
      statistics) or ``is_test`` (opset < 7), nor that the statistics are 1-D per channel;
    * they accept initializers only, not Constant outputs, and compute in the parameters' dtype
      (fp16 loses precision in ``γ/√(σ²+ε)``); we compute in float64 and cast to the weight dtype.

    The matcher refuses a layer output with another consumer or that is a graph output.
    """

    op_type: ClassVar[str]

    def layer(self, inbound_out: ir.Value, **_: Any) -> tuple[ir.Value, ir.Value | None, dict[str, ir.Attr]]:
        """The layer's weight, bias (or None) and attributes."""
        node = inbound_out.producer()
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        return node.inputs[1], bias, dict(node.attributes)

    def channels(self, weights: np.ndarray, attributes: Mapping[str, ir.Attr]) -> int | None:
        raise NotImplementedError

    def scale_weights(
        self, weights: np.ndarray, scale: np.ndarray, attributes: Mapping[str, ir.Attr]
    ) -> np.ndarray:
        return self._scale_weights(weights, scale, attributes)  # type: ignore[attr-defined]

    def extra_check(self, x: ir.Value, w: np.ndarray, b: np.ndarray | None) -> str | None:
        return None

    def check(self, context, x: ir.Value, inbound_out: ir.Value, batchnorm_out: ir.Value, **kw: Any):
        result = pattern.MatchResult()
        bn = batchnorm_out.producer()
        if (reason := batchnorm_reason(context.model, bn)) is not None:
            return result.fail(reason)
        w_value, b_value, attrs = self.layer(inbound_out, **kw)
        w = constant_array(w_value)
        if w is None:
            return result.fail("weight is not a constant")
        if w_value.dtype not in _FLOAT_TYPES:
            return result.fail(f"weight dtype {w_value.dtype} is not floating point")
        channels = self.channels(w, attrs)
        if channels is None:
            return result.fail(f"cannot tell the output channels of weight {w.shape}")
        params = [constant_array(v) for v in bn.inputs[1:5]]
        if any(p is None for p in params):
            return result.fail("scale, bias, mean and variance must be constants")
        if any(p.shape != (channels,) for p in params):  # type: ignore[union-attr]
            return result.fail(f"statistics {[p.shape for p in params]} are not per channel ({channels})")  # type: ignore[union-attr]
        b = None
        if b_value is not None:
            b = constant_array(b_value)
            if b is None:
                return result.fail("bias is not a constant")
        if (reason := self.extra_check(x, w, b)) is not None:
            return result.fail(reason)
        eps = bn.attributes.get_float("epsilon", 1e-5)
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)  # type: ignore[union-attr]
        s = gamma / np.sqrt(var + eps)
        # Gemm scales C by its beta attribute: fold that in and drop the attribute.
        c_scale = attrs.pop("beta").as_float() if "beta" in attrs else 1.0
        b64 = np.zeros(channels) if b is None else c_scale * b.astype(np.float64)
        self._attributes = attrs
        self._weights = ir.tensor(self.scale_weights(w.astype(np.float64), s, attrs).astype(w.dtype))
        self._bias = ir.tensor(((b64 - mean) * s + beta).astype(w.dtype))
        base = w_value.name or "weight"
        graph = context.graph_or_function
        self._w_name = fresh_name(graph, f"{base}_bn")
        self._b_name = fresh_name(graph, f"{base}_bn_bias")
        return result

    def rewrite(self, op, x: ir.Value, inbound_out: ir.Value, batchnorm_out: ir.Value, **_: Any):
        weights = op.initializer(self._weights, name=self._w_name)
        bias = op.initializer(self._bias, name=self._b_name)
        return op.op(self.op_type, x, weights, bias, **self._attributes)


class _Conv(_FoldChecks, osbn.FuseBatchNormIntoConv):
    def channels(self, weights, attributes):
        return weights.shape[0] if weights.ndim >= 3 else None


class _ConvTranspose(_FoldChecks, osbn.FuseBatchNormIntoConvTranspose):
    def channels(self, weights, attributes):
        group = attributes.get("group", ir.AttrInt64("group", 1)).as_int()
        if weights.ndim < 3 or group < 1 or weights.shape[0] % group:
            return None
        return weights.shape[1] * group


class _Gemm(_FoldChecks, osbn.FuseBatchNormIntoGemm):
    def channels(self, weights, attributes):
        if weights.ndim != 2:
            return None
        return weights.shape[self.get_filters_axis(attributes)]


class _MatMul(_FoldChecks, pattern.RewriteRuleClassBase):
    """``BN(MatMul(x, W))`` with x and W 2-D: BN over ``[N, C]`` normalizes axis 1, the MatMul's
    output columns, so it folds into W's columns and a new bias (MatMul + Add out). With a
    higher-rank x the channel axis 1 is not W's output axis, so it does not fold."""

    op_type: ClassVar = "MatMul"

    def pattern(self, op, x, w):
        return op.BatchNormalization(
            op.MatMul(x, w, _outputs=["inbound_out"]), _allow_other_inputs=True, _outputs=["batchnorm_out"]
        )

    def layer(self, inbound_out, w=None, **_):
        return w, None, {}

    def channels(self, weights, attributes):
        return weights.shape[1] if weights.ndim == 2 else None

    def scale_weights(self, weights, scale, attributes):
        return weights * scale[None, :]

    def extra_check(self, x, w, b):
        if x.shape is None or x.shape.rank() != 2:
            return f"input {x.shape} is not 2-D"
        return None

    def rewrite(self, op, x: ir.Value, inbound_out: ir.Value, batchnorm_out: ir.Value, **_: Any):
        weights = op.initializer(self._weights, name=self._w_name)
        bias = op.initializer(self._bias, name=self._b_name)
        return op.Add(op.MatMul(x, weights), bias)


class _MatMulAdd(_MatMul):
    """The same with the Linear's bias as ``Add(MatMul(x, W), c)``: the bias folds too."""

    def pattern(self, op, x, w, c):
        return op.BatchNormalization(
            op.Add(op.MatMul(x, w), c, _outputs=["inbound_out"]),
            _allow_other_inputs=True,
            _outputs=["batchnorm_out"],
        )

    def layer(self, inbound_out, w=None, c=None, **_):
        return w, c, {}

    def extra_check(self, x, w, b):
        if b is None or b.ndim > 2:
            return "the Add operand is not a constant of rank <= 2"
        return super().extra_check(x, w, b)


def _rules() -> list[FusionRule]:
    def r(name: str, summary: str, rule: Any) -> FusionRule:
        return FusionRule(name, summary, from_onnxscript(rule), STANDARD)

    return [
        r("conv", "BatchNormalization(Conv) → Conv with scaled weights and bias", _Conv.rule()),
        r(
            "conv-transpose",
            "BatchNormalization(ConvTranspose) → ConvTranspose (grouped too)",
            _ConvTranspose.rule(),
        ),
        r("gemm", "BatchNormalization(Gemm) → Gemm with scaled weights and bias", _Gemm.rule()),
        r(
            "matmul",
            "BatchNormalization([N, C] MatMul with constant W [+ c]) → MatMul + Add",
            pattern.RewriteRuleSet([_MatMulAdd.rule(), _MatMul.rule()], commute=True),
        ),
    ]


class FuseBatchNormPass(FusionPass):
    """Fold inference BatchNormalization into the preceding Conv, ConvTranspose, Gemm or 2-D MatMul.

    Safe because the layer's weights (and bias) and the BN statistics must be constants, BN must
    be in inference mode with per-channel statistics, the layer output must have no other use,
    and the fused tensors get new names (a weight shared with another layer is copied, not
    changed). Standard ONNX, so it suits every backend. Needs shapes (runs shape inference).
    """

    name = "fuse-batchnorm"
    RULES: ClassVar = tuple(_rules())

    def prepare(self, model: ir.Model) -> bool:
        return infer_shapes(model)

    def finish(self, model: ir.Model, modified: bool) -> bool:
        if modified:
            # The replaced weights are now unused; drop them so the model does not carry both.
            import onnx_ir.passes.common as common

            common.RemoveUnusedNodesPass()(model)
        return False


BATCHNORM_RULES = FuseBatchNormPass.rule_list

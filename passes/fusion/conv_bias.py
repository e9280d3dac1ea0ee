"""Fold a constant per-channel bias written as a separate ``Add`` (or ``Sub``) into the Conv.

``Add(Conv(x, W[, b]), c)`` → ``Conv(x, W, b + c)`` and the same for ConvTranspose, when ``c``
is a constant that broadcasts as one value per output channel (``[1, C, 1, 1]``, ``[C, 1, 1]``,
a scalar or any single element). PaddlePaddle's exporter writes every conv bias this way
(``Conv → Add(Reshape(bias, [1, C, 1, 1]))``); left apart, static int8 quantizes the Conv's output
*before* its bias and keeps the Add as a second quantized op, and ORT's ``quant_pre_process``
folds them before it quantizes. Standard ONNX in and out, so every backend benefits.

A ``[C]`` constant is not a per-channel bias of a Conv output (rank ≥ 3): it broadcasts over the
last spatial axis, so it is left alone, as is any constant with more than one value along the
batch or a spatial axis, or of a larger rank than the Conv's output.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from ..ir_helpers import constant_array, fresh_name, infer_shapes
from ._base import STANDARD, FusionPass, FusionRule, from_onnxscript

__all__ = ["FuseConvBiasPass"]

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16})


def per_channel_bias(c: np.ndarray, out_rank: int, channels: int) -> np.ndarray | None:
    """``c`` as a ``[channels]`` bias when adding it to an ``[N, channels, *spatial]`` tensor of
    rank ``out_rank`` adds one value per channel and does not change the shape; else None."""
    if c.ndim > out_rank or out_rank < 2:
        return None
    padded = (1,) * (out_rank - c.ndim) + tuple(c.shape)
    if padded[0] != 1 or any(d != 1 for d in padded[2:]) or padded[1] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1).astype(np.float64), (channels,))


class _FoldBias(pattern.RewriteRuleClassBase):
    """``Add(Conv(x, W, ...), c)``; the matcher refuses a Conv output with another consumer or
    that is a graph output. The new bias gets a fresh name (a bias shared with another layer is
    copied, not changed); the old one is left to DCE."""

    op_type: ClassVar[str] = "Conv"
    binary: ClassVar[str] = "Add"

    def pattern(self, op, x, w, c):
        layer = getattr(op, self.op_type)(x, w, _allow_other_inputs=True, _outputs=["layer_out"])
        return getattr(op, self.binary)(layer, c)

    def channels(self, w_shape: tuple[int, ...], node: ir.Node) -> int | None:
        return w_shape[0]

    def check(self, context, x, w, c, layer_out, **_):  # type: ignore[override]
        result = pattern.MatchResult()
        node = layer_out.producer()
        if node is None:
            return result.fail("no layer")
        if w.shape is None or not all(isinstance(d, int) for d in w.shape):
            return result.fail("weight shape unknown", w)
        w_shape = tuple(int(d) for d in w.shape)
        if len(w_shape) < 3:
            return result.fail(f"weight {w_shape} is not a convolution kernel", w)
        dtype = layer_out.dtype or x.dtype
        if dtype not in _FLOAT_TYPES:
            return result.fail(f"dtype {dtype} is not floating point", x)
        arr = constant_array(c)
        if arr is None:
            return result.fail("the added operand is not a constant", c)
        if c.dtype != dtype:
            return result.fail(f"constant dtype {c.dtype} differs from the layer's {dtype}", c)
        channels = self.channels(w_shape, node)
        if channels is None:
            return result.fail(f"cannot tell the output channels of weight {w_shape}", w)
        # The output has the kernel's rank (N, C, spatial...).
        add = per_channel_bias(arr, len(w_shape), channels)
        if add is None:
            return result.fail(f"constant {arr.shape} is not one value per output channel ({channels})", c)
        old = node.inputs[2] if len(node.inputs) > 2 else None
        b = np.zeros(channels)
        if old is not None:
            b_arr = constant_array(old)
            if b_arr is None:
                return result.fail("the layer's bias is not a constant", old)
            if b_arr.shape != (channels,):
                return result.fail(f"the layer's bias {b_arr.shape} is not [{channels}]", old)
            b = b_arr.astype(np.float64)
        sign = -1.0 if self.binary == "Sub" else 1.0
        self._bias = ir.tensor((b + sign * add).astype(arr.dtype))
        self._attributes = dict(node.attributes)
        graph = context.graph_or_function
        base = (old.name if old is not None else None) or f"{w.name or 'weight'}_bias"
        self._name = fresh_name(graph, f"{base}_folded")
        return result

    def rewrite(self, op, x: ir.Value, w: ir.Value, c: ir.Value, layer_out: ir.Value, **_: Any):
        bias = op.initializer(self._bias, name=self._name)
        return op.op(self.op_type, x, w, bias, **self._attributes)


class _ConvTransposeBias(_FoldBias):
    op_type: ClassVar[str] = "ConvTranspose"

    def channels(self, w_shape: tuple[int, ...], node: ir.Node) -> int | None:
        group = node.attributes.get_int("group", 1)
        return w_shape[1] * group if group >= 1 else None


class _ConvSub(_FoldBias):
    binary: ClassVar[str] = "Sub"


class _ConvTransposeSub(_ConvTransposeBias):
    binary: ClassVar[str] = "Sub"


def _rules() -> list[FusionRule]:
    return [
        FusionRule(
            "conv",
            "Conv(x, W[, b]) + c (one constant per output channel) → Conv(x, W, b + c)",
            from_onnxscript(pattern.RewriteRuleSet([_FoldBias.rule(), _ConvSub.rule()], commute=True)),
            STANDARD,
        ),
        FusionRule(
            "conv-transpose",
            "ConvTranspose(x, W[, b]) + c (one constant per output channel) → ConvTranspose(x, W, b + c)",
            from_onnxscript(
                pattern.RewriteRuleSet([_ConvTransposeBias.rule(), _ConvTransposeSub.rule()], commute=True)
            ),
            STANDARD,
        ),
    ]


class FuseConvBiasPass(FusionPass):
    """Fold a constant per-channel ``Add``/``Sub`` after a Conv or ConvTranspose into its bias.

    Safe because the constant must broadcast to one value per output channel without changing
    the output's shape (checked against the kernel's rank and channel count), the layer's own
    bias must be a constant ``[C]``, the layer output must have no other use, and the new bias
    gets a fresh name. ``Sub`` folds only as ``Conv − c`` (``c − Conv`` negates the output).
    Standard ONNX, so it suits every backend. Needs shapes (runs shape inference).
    """

    name = "fuse-conv-bias"
    RULES: ClassVar = tuple(_rules())

    def prepare(self, model: ir.Model) -> bool:
        return infer_shapes(model)

    def finish(self, model: ir.Model, modified: bool) -> bool:
        if modified:
            import onnx_ir.passes.common as common

            common.RemoveUnusedNodesPass()(model)
        return False

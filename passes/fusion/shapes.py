"""Collapse chains of Reshape, Transpose, Squeeze and Unsqueeze into one node (or none).

Exporters leave such chains behind (``view`` after ``view``, ``unsqueeze(0).unsqueeze(1)``, a
transpose undone later); each costs a kernel launch or a copy. Standard ONNX, for every backend.
onnxscript's rules where they are exact, our own where they miss forms or name initializers
unsafely (see :func:`_rules`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import _basic_rules as osbasic

from ..ir_helpers import constant_array, fresh_name, infer_shapes, opset_guarded, replace_value, static_shape
from ..ir_helpers import rank as _rank
from ._base import RULE_KEY, STANDARD, FusionPass, FusionRule

__all__ = ["FuseShapeChainsPass", "SHAPE_RULES"]


def _raw_axes(node: ir.Node) -> tuple[bool, list[int] | None]:
    """(known, axes) of a Squeeze/Unsqueeze: the axes input (opset 13+) or attribute (before);
    axes None when absent, known False when they are not constant."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = constant_array(node.inputs[1])
        if arr is None or arr.dtype.kind not in "iu":
            return False, None
        return True, [int(a) for a in arr.reshape(-1)]
    attr = node.attributes.get("axes")
    return True, (None if attr is None else [int(a) for a in attr.as_ints()])


def _normalize(axes: list[int], rank: int | None) -> list[int] | None:
    """Sorted non-negative axes, or None if a negative axis needs an unknown rank, an axis is out
    of range, or one repeats."""
    if any(a < 0 for a in axes):
        if rank is None:
            return None
        axes = [a + rank for a in axes]
    if any(a < 0 or (rank is not None and a >= rank) for a in axes) or len(set(axes)) != len(axes):
        return None
    return sorted(axes)


def _squeeze_axes(node: ir.Node, x: ir.Value) -> list[int] | None:
    """Normalized axes a Squeeze of ``x`` removes (for no axes: the 1-dims of a static shape)."""
    known, axes = _raw_axes(node)
    if not known:
        return None
    if axes is None:
        dims = static_shape(x)
        return None if dims is None else [i for i, d in enumerate(dims) if d == 1]
    return _normalize(axes, _rank(x))


def _unsqueeze_axes(node: ir.Node, x: ir.Value) -> list[int] | None:
    """Normalized axes (in the output) an Unsqueeze of ``x`` inserts."""
    known, axes = _raw_axes(node)
    if not known or axes is None:
        return None
    rank = _rank(x)
    return _normalize(axes, None if rank is None else rank + len(axes))


class _SqueezeUnsqueeze(pattern.RewriteRuleClassBase):
    """``Squeeze(Unsqueeze(x, a), a)`` → x."""

    def pattern(self, op, x):
        return op.Squeeze(
            op.Unsqueeze(x, _allow_other_inputs=True, _outputs=["mid"]), _allow_other_inputs=True
        )

    def check(self, context, x, mid, **_):
        result = pattern.MatchResult()
        inserted = _unsqueeze_axes(mid.producer(), x)
        if inserted is None:
            return result.fail("Unsqueeze axes not constant or not normalizable")
        squeeze = context.root
        known, axes = _raw_axes(squeeze)
        if not known:
            return result.fail("Squeeze axes not constant")
        if axes is None:
            # Squeeze() also removes x's own 1-dims: only safe when x provably has none.
            dims = static_shape(x)
            if dims is None or 1 in dims:
                return result.fail("Squeeze without axes and x may have 1-dims")
            return result
        removed = _normalize(axes, None if _rank(x) is None else _rank(x) + len(inserted))
        if removed != inserted:
            return result.fail(f"Squeeze axes {axes} differ from Unsqueeze axes {inserted}")
        return result

    def rewrite(self, op, x, **_):
        return op.Identity(x)


class _UnsqueezeSqueeze(pattern.RewriteRuleClassBase):
    """``Unsqueeze(Squeeze(x, a), a)`` → x."""

    def pattern(self, op, x):
        return op.Unsqueeze(
            op.Squeeze(x, _allow_other_inputs=True, _outputs=["mid"]), _allow_other_inputs=True
        )

    def check(self, context, x, mid, **_):
        result = pattern.MatchResult()
        removed = _squeeze_axes(mid.producer(), x)
        if removed is None:
            return result.fail("Squeeze axes not known")
        inserted = _unsqueeze_axes(context.root, mid)
        if inserted is None or inserted != removed:
            return result.fail(f"Unsqueeze axes {inserted} differ from Squeeze axes {removed}")
        return result

    def rewrite(self, op, x, **_):
        return op.Identity(x)


class _UnsqueezeUnsqueeze(pattern.RewriteRuleClassBase):
    """``Unsqueeze(Unsqueeze(x, a1), a2)`` → ``Unsqueeze(x, a)`` with a1 mapped past a2."""

    def __init__(self) -> None:
        # remove_nodes=False: an inner Unsqueeze feeding several Unsqueezes (exporters share
        # one) is rewired at each; the driver drops it once nothing uses it.
        super().__init__("UnsqueezeUnsqueeze", remove_nodes=False)

    def pattern(self, op, x):
        return op.Unsqueeze(
            op.Unsqueeze(x, _allow_other_inputs=True, _outputs=["mid"]), _allow_other_inputs=True
        )

    def check(self, context, x, mid, **_):
        result = pattern.MatchResult()
        inner, outer = mid.producer(), context.root
        a1 = _unsqueeze_axes(inner, x)
        a2 = _unsqueeze_axes(outer, mid)
        if a1 is None or a2 is None:
            return result.fail("axes not constant or not normalizable")
        if (len(inner.inputs) > 1) != (len(outer.inputs) > 1):
            return result.fail("mixed axes forms")
        mapped = []
        for i in a1:  # position of the intermediate's dim i in the final output
            p = i
            for a in a2:
                if a <= p:
                    p += 1
            mapped.append(p)
        self._axes = sorted(a2 + mapped)
        self._as_input = len(inner.inputs) > 1
        if self._as_input:
            self._axes_name = fresh_name(context.graph_or_function, f"{context.output_values[0].name}_axes")
        return result

    def rewrite(self, op, x, **_):
        if self._as_input:
            axes = op.initializer(ir.tensor(np.array(self._axes, dtype=np.int64)), name=self._axes_name)
            return op.Unsqueeze(x, axes)
        return op.Unsqueeze(x, axes=self._axes)


class _ReshapeOfSqueeze(pattern.RewriteRuleClassBase):
    """``Reshape(Squeeze(x) or Unsqueeze(x), shape)`` → ``Reshape(x, shape)``."""

    op_type: ClassVar[str]

    def __init__(self) -> None:
        # remove_nodes=False: the (Un)squeeze may keep other consumers; the driver drops it if not.
        super().__init__(f"Reshape{self.op_type}", remove_nodes=False)

    def pattern(self, op, x, shape):
        return op.Reshape(getattr(op, self.op_type)(x, _allow_other_inputs=True), shape)

    def check(self, context, x, shape, **_):
        result = pattern.MatchResult()
        arr = constant_array(shape)
        if arr is None or arr.ndim != 1:
            return result.fail("shape is not a constant 1-D tensor")
        self._allowzero = context.root.attributes.get_int("allowzero", None)
        allowzero = self._allowzero or 0
        new = np.array(arr, dtype=np.int64)
        if allowzero == 0 and (new == 0).any():
            # 0 copies the intermediate's dim, not x's: fill it from the static output shape.
            out = context.output_values[0].shape
            for i in np.flatnonzero(new == 0):
                d = out[int(i)] if out is not None and out.rank() == len(new) else None
                if not isinstance(d, int):
                    return result.fail("shape has a 0 that copies an intermediate dim of unknown size")
                new[i] = d
            self._shape_name = fresh_name(context.graph_or_function, f"{context.output_values[0].name}_shape")
            self._shape: ir.TensorProtocol | None = ir.tensor(new)
        else:
            self._shape = None
        return result

    def rewrite(self, op, x, shape, **_):
        if self._shape is not None:
            shape = op.initializer(self._shape, name=self._shape_name)
        return op.Reshape(x, shape, allowzero=self._allowzero)


class _ReshapeOfSqueezeOp(_ReshapeOfSqueeze):
    op_type: ClassVar = "Squeeze"


class _ReshapeOfUnsqueezeOp(_ReshapeOfSqueeze):
    op_type: ClassVar = "Unsqueeze"


class _ReshapeReshape(osbasic.ReshapeReshape):
    """onnxscript's rule with a fresh name for the new shape initializer."""

    def check(self, context, x, shape_ignored, shape):
        result = super().check(context, x, shape_ignored, shape)
        if result:
            self._new_shape_name = fresh_name(
                context.graph_or_function, f"{context.output_values[0].name}_shape"
            )
        return result


def safe_reshape_reshape_rule() -> pattern.RewriteRule:
    """onnxscript's Reshape∘Reshape rule, naming its new shape initializer freshly."""
    return _ReshapeReshape.rule()


def _apply(rules: Any):
    """``from_onnxscript`` for rules some of which keep their matched nodes (``remove_nodes=False``):
    onnxscript's driver then deletes *every* unused node of the model, even when nothing matched,
    which would change a model the pass reports unchanged. We delete them only after a match."""
    from onnxscript import optimizer

    rules = opset_guarded(rules)
    keeps = rules.remove_unused_nodes
    rules.remove_unused_nodes = False

    def apply(model: ir.Model) -> int:
        count = int(rules.apply_to_model(model))
        if count and keeps:
            optimizer.remove_unused_nodes(model)
        return count

    return apply


def _rules() -> list[FusionRule]:
    """The rules in order; which are onnxscript's, which are ours, and why:

    * ``transpose-transpose``: onnxscript's ``transpose_transpose_rule`` (composed perm, Identity when
      that is the identity; it refuses a Transpose without a ``perm`` attribute, which is safe).
    * ``squeeze-unsqueeze`` / ``unsqueeze-squeeze`` (own): the pair cancels when both name the same
      axes (normalized against the ranks they apply to; a Squeeze without axes only when the input's
      shape is fully static). ``Unsqueeze(Squeeze(x))`` also removes the Squeeze's failure on a
      non-1 dim, which is the only behaviour it changes.
    * ``unsqueeze-unsqueeze`` (own): one Unsqueeze with the combined axes. onnxscript's rule handles
      only one non-negative axis per node; ours takes any constant axes (negative ones when the rank
      is known) and the opset < 13 attribute form.
    * ``squeeze-reshape-1d``: onnxscript's ``Reshape(Squeeze(x), [-1])`` → x for 1-D x.
    * ``reshape-of-squeeze`` (own): ``Reshape(Squeeze|Unsqueeze(x), shape)`` → ``Reshape(x, shape)``:
      a Reshape only needs the element count, which (Un)squeeze keeps. Not when ``shape`` has a 0
      (with ``allowzero=0`` it copies the *intermediate's* dim) unless the output's static shape
      says what it is.
    * ``reshape-reshape``: onnxscript's ``reshape_reshape_rule``. Checked: it reads ``allowzero``
      from the outer Reshape, fills 0/−1 from a static output shape, refuses 0 together with −1 and
      more than one 0, and turns a single 0 into −1, which is right because with all other entries
      fixed the element count determines that dim. It names the new shape ``<output>/shape`` and
      onnxscript's driver overwrites an initializer of that name; we name it freshly.

    Identity nodes the rules leave are removed at the end (:meth:`FuseShapeChainsPass.finish`) where
    that keeps graph outputs intact.
    """

    def r(name: str, summary: str, rule: Any) -> FusionRule:
        return FusionRule(name, summary, _apply(rule), STANDARD)

    return [
        r(
            "transpose-transpose",
            "Transpose∘Transpose → one Transpose (none if the identity)",
            osbasic.TransposeTranspose.rule(),
        ),
        r("squeeze-unsqueeze", "Squeeze(Unsqueeze(x, a), a) → x", _SqueezeUnsqueeze.rule()),
        r("unsqueeze-squeeze", "Unsqueeze(Squeeze(x, a), a) → x", _UnsqueezeSqueeze.rule()),
        r("unsqueeze-unsqueeze", "Unsqueeze∘Unsqueeze → one Unsqueeze", _UnsqueezeUnsqueeze.rule()),
        r("squeeze-reshape-1d", "Reshape(Squeeze(x), [-1]) → x for 1-D x", osbasic.SqueezeReshape.rule()),
        r(
            "reshape-of-squeeze",
            "Reshape(Squeeze/Unsqueeze(x), shape) → Reshape(x, shape)",
            [_ReshapeOfSqueezeOp.rule(), _ReshapeOfUnsqueezeOp.rule()],
        ),
        r("reshape-reshape", "Reshape∘Reshape → one Reshape", _ReshapeReshape.rule()),
    ]


class FuseShapeChainsPass(FusionPass):
    """Collapse Reshape/Transpose/Squeeze/Unsqueeze chains into one node, or none.

    Safe because every rule proves the composed shape equal (constant axes, perms and shapes;
    a Reshape's 0 entries resolved from static shapes or refused), intermediates with other
    consumers or that are graph outputs are kept, and the Identity left by a cancelled pair is
    removed only where that keeps graph output names. Standard ONNX; needs shapes (runs shape
    inference).
    """

    name = "fuse-shape-chains"
    RULES: ClassVar = tuple(_rules())

    def prepare(self, model: ir.Model) -> bool:
        return infer_shapes(model)

    def finish(self, model: ir.Model, modified: bool) -> bool:
        if not modified:
            return False
        changed = False
        for graph in model.graphs():
            for node in list(graph):
                if (
                    node.op_type == "Identity"
                    and node.domain == ""
                    and node.metadata_props.get(RULE_KEY, "").startswith(f"{self.name}/")
                ):
                    changed |= replace_value(node, node.outputs[0], node.inputs[0])
        return changed


SHAPE_RULES = FuseShapeChainsPass.rule_list

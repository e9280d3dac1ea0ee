"""Scaled dot-product attention → the standard ONNX ``Attention`` op (opset 23), for targets that
cannot run com.microsoft contrib ops (TensorRT) but can run the standard op.

Recognition is onnxscript's ``ort_fusions.sdpa.SDPA`` rule, subclassed so that the replacement is
the standard ``Attention`` directly (never onnxscript's private SDPA op) and with the shape, key,
mask and scale checks it lacks (see :class:`_Sdpa`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

from ..ir_helpers import infer_shapes
from ._base import STANDARD, FusionPass, FusionRule, from_onnxscript

__all__ = ["FuseAttentionPass"]

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})


def _known(d: Any) -> bool:
    return isinstance(d, int) or (isinstance(d, ir.SymbolicDim) and d.value is not None)


def _dims(value: ir.Value | None) -> list[Any] | None:
    """The value's dims when every one is known (an int or a named symbol), else None."""
    if value is None or value.shape is None or not all(_known(d) for d in value.shape):
        return None
    return list(value.shape)


def _rules() -> pattern.RewriteRuleSet:
    # Imported here: importing onnxscript's ort_fusions package costs about a second.
    from onnxscript.rewriter.ort_fusions import sdpa

    class _Sdpa(sdpa.SDPA):
        """onnxscript's SDPA pattern, stricter checks, replaced by the standard ``Attention``.

        Recognition is onnxscript's ``ort_fusions.sdpa.SDPA`` rule (MatMul(Q, Kᵀ) · scale [+ mask] →
        Softmax → MatMul(·, V), with the key transposes and Q/K/score scalings exporters write). That
        rule replaces the match with a private ``ai.onnxruntime._fusion`` SDPA op meant for later contrib
        rules; we subclass it so that the replacement is the standard ``Attention`` directly (nothing
        private is ever created), and add the checks it lacks (each says why in :meth:`_Sdpa.check`):

        * shapes: onnxscript compares dims with ``==``, and two *unknown* dims compare equal, so
          Q/K/V of unknown batch or heads pass; MatMul broadcasts them, ``Attention`` does not. We want
          every Q/K/V dim known (a number or a named symbol) and the score/output shapes to be exactly
          ``[B, H, S, Skv]`` / ``[B, H, S, Dv]``.
        * the key: the Reshape→Transpose→Reshape form is accepted without looking at the reshapes; we
          require the 3-D key to be ``[·, Skv, Dh]`` and the transposed key ``[B, H, Dh, Skv]``.
        * the mask: any value added to the scores is taken, including one that broadcasts the scores
          to a larger shape. We require a float mask of the query's type, rank 2–4, last two dims
          exactly ``[S, Skv]`` (ONNX Runtime's Attention kernel rejects a broadcast query or key axis
          there, although the spec allows it) and leading dims 1 or equal to ``B``/``H``.
        * the scale: the product of the Q, K and score scalings is taken as is, any sign; ``Attention``
          scales Q and K by ``sqrt(scale)``, so we require a finite positive scale, and pass it
          explicitly (onnxscript drops it when it is within 1e-5 of the default ``1/sqrt(Dh)``).

        Grouped-query attention: onnxscript's rule requires K/V to have Q's head count, so on Llama-style
        models it matches *after* the repeat-kv Expand/Reshape, which stays in front of the ``Attention``
        (correct; the native GQA form of ``Attention`` is not used).

        A row the mask fully removes gives NaN in the decomposition (Softmax of all ``-inf``) and a zero
        row from ``Attention`` (spec errata); the ``Where(IsNaN(p), 0, p)`` form onnxscript also matches
        gives zeros too. Exporters use a finite minimum, not ``-inf``, so real masks are unaffected.
        """

        _attn_scale: float

        def check(self, context, query, key, value, mask, key_format, **bindings):  # type: ignore[override]
            result = super().check(
                context, query=query, key=key, value=value, mask=mask, key_format=key_format, **bindings
            )
            if not result:
                return result
            q, k, v = _dims(query), _dims(key), _dims(value)
            if q is None or k is None or v is None or len(q) != 4:
                return result.fail(
                    "Q/K/V dims not all known (unknown dims compare equal in onnxscript's check)"
                )
            if key_format == "BSHd":
                k = [k[0], k[2], k[1], k[3]]
            B, H, S, Dh = q
            Skv, Dv = k[2], v[3]
            if k != [B, H, Skv, Dh] or v != [B, H, Skv, Dv]:
                return result.fail(f"Q {q}, K {k}, V {v} are not [B,H,S,Dh], [B,H,Skv,Dh], [B,H,Skv,Dv]")
            if not (query.dtype == key.dtype == value.dtype) or query.dtype not in _FLOAT_TYPES:
                return result.fail(
                    f"Q/K/V types {query.dtype}, {key.dtype}, {value.dtype} differ or are not float"
                )

            nodes = list(context.nodes)
            softmax = next(n for n in nodes if n.op_type == "Softmax")
            qk = next(n for n in nodes if n.op_type == "MatMul" and n is not context.root)
            if _dims(softmax.inputs[0]) != [B, H, S, Skv]:
                return result.fail(f"scores {softmax.inputs[0].shape} are not [B, H, S, Skv]")
            if _dims(context.output_values[0]) != [B, H, S, Dv]:
                return result.fail(f"output {context.output_values[0].shape} is not [B, H, S, Dv]")
            if _dims(qk.inputs[1]) != [B, H, Dh, Skv]:
                return result.fail(f"transposed key {qk.inputs[1].shape} is not [B, H, Dh, Skv]")
            for n in nodes:  # Reshape→Transpose(0,2,1)→Reshape form: the 3-D key must be [·, Skv, Dh]
                if n.op_type == "Transpose" and len(n.attributes.get_ints("perm", [])) == 3:
                    k3 = _dims(n.inputs[0])
                    if k3 is None or k3[1:] != [Skv, Dh]:
                        return result.fail(f"3-D key {n.inputs[0].shape} is not [B*H, Skv, Dh]")

            if mask is not None:
                m = _dims(mask)
                if mask.dtype != query.dtype:
                    return result.fail(f"mask type {mask.dtype} is not the query's {query.dtype}")
                if m is None or not 2 <= len(m) <= 4 or m[-2:] != [S, Skv]:
                    return result.fail(f"mask {mask.shape} is not [..., S, Skv] of rank 2-4")
                if any(d != 1 and d != full for d, full in zip(m[:-2][::-1], [H, B])):
                    return result.fail(f"mask {mask.shape} does not broadcast to [B, H, S, Skv]")

            scale = 1.0
            for tag, name in (
                ("query_scaling", "query_scale"),
                ("key_scaling", "key_scale"),
                ("qk_scaling", "qk_scale"),
            ):
                kind = bindings.get(tag, "None")
                if kind == "None":
                    continue
                c = bindings.get(name)
                arr = _ir_utils.get_numpy_value(c)
                if arr is None or arr.size != 1 or arr.ndim > 4 or c.dtype != query.dtype:
                    return result.fail(f"{name} is not a single-element constant of the query's type", c)
                x = float(arr.reshape(-1)[0])
                scale *= x if kind == "Mul" else (1.0 / x if x != 0 else math.inf)
            if not math.isfinite(scale) or scale <= 0:
                return result.fail(
                    f"scale {scale} is not finite and positive (Attention scales Q and K by sqrt(scale))"
                )
            self._attn_scale = scale
            return result

        def rewrite(self, op, query, key, value, mask, key_format, **_):  # type: ignore[override]
            if key_format == "BSHd":
                key = op.Transpose(key, perm=[0, 2, 1, 3])
            args = [query, key, value] + ([mask] if mask is not None else [])
            return op.Attention(*args, scale=self._attn_scale)

    return pattern.RewriteRuleSet([_Sdpa.rule("SDPA_to_Attention")])


def _sdpa_to_attention(model: ir.Model) -> int:
    return from_onnxscript(_rules())(model)


class FuseAttentionPass(FusionPass):
    """Fuse MatMul/Softmax/MatMul scaled dot-product attention into the standard ``Attention``
    (opset 23; run ``upgrade-opset`` first on older models).

    Safe because Q/K/V must be 4-D with known, consistent ``[B, H, S, D]`` dims and one float
    type, the mask must be a float mask of the query's type in the shape the op takes, the scale
    a positive single-element constant, and every intermediate used only inside the pattern;
    anything else is left as it was.
    """

    name = "fuse-attention"
    RULES: ClassVar = (
        FusionRule(
            "sdpa-attention",
            "MatMul(Q, Kᵀ)·scale [+ mask] → Softmax → MatMul(·, V) → Attention (opset 23)",
            _sdpa_to_attention,
            STANDARD,
            min_opset=23,
        ),
    )

    def prepare(self, model: ir.Model) -> bool:
        return infer_shapes(model)  # the checks compare Q/K/V/mask dims

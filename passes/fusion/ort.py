"""ONNX Runtime contrib fusions (``com.microsoft``): attention, skip-normalization, GELU, rotary
embeddings, FusedMatMul and friends, for the ort-cpu and ort-cuda targets only.

The rules are onnxscript's ``rewriter.ort_fusions`` (maintained with ONNX Runtime's kernels), run
in the order ``onnxscript.rewriter.ort_fusions.fuse_xformers`` runs them, because later rules
consume the ops earlier ones create (SDPA → MultiHeadAttention → Attention). What we add, and
why, is in :mod:`passes.fusion.ort_extra`: patterns onnxscript misses on real exports.
"""

from __future__ import annotations

from typing import ClassVar

import onnx_ir as ir
import onnx_ir.passes.common as common

from graphopt.errors import PassFailedError

from ._base import CONTRIB, STANDARD, FusionPass, FusionRule, from_onnxscript

__all__ = ["FuseOrtPass", "ORT_RULES"]

#: onnxscript's private intermediate domain (SDPA etc.); nothing in it may survive the pass.
_PRIVATE_DOMAIN = "ai.onnxruntime._fusion"


def _rules() -> list[FusionRule]:
    from onnxscript.rewriter.ort_fusions import (
        attention,
        bias_gelu,
        cos_sin_cache,
        erfgelu,
        fused_matmul_rule_sets,
        gelu,
        gqa_packed_qkv,
        instance_to_group_normalization,
        mha_bias,
        mha_scale,
        rms_normalization,
        rotary_embedding,
        sdpa,
        sdpa_via_mha,
        skip_normalization,
        softmax,
    )

    from . import ort_extra

    def cos_sin_then_cse(model: ir.Model) -> int:
        n = cos_sin_cache.fuse_cos_sin_cache(model)
        if n:
            # Each layer's rotary embedding gets its own copy of the cache; CSE merges them so
            # that the partial-rotary rule below sees one shared cache (as fuse_xformers does).
            common.CommonSubexpressionEliminationPass()(model)
        return n

    def r(name: str, summary: str, apply, **kw) -> FusionRule:
        return FusionRule(name, summary, apply, CONTRIB, **kw)

    from onnxscript.rewriter.rules.common import gemm_to_matmul_add_rule

    return [
        # Must run first: onnxscript's MHA rules drop the Reshape-to-2D that GPT-2's Conv1D (addmm)
        # puts before its Gemm, which leaves a Gemm with a 3-D input that ONNX Runtime rejects
        # (seen on transformers' GPT-2). optimize_for_ort does the same conversion up front.
        FusionRule("gemm-to-matmul", "Reshape→Gemm→Reshape → MatMul + Add so attention patterns see the projections",
                   from_onnxscript(gemm_to_matmul_add_rule), STANDARD),
        r("erf-gelu", "x·½(1+erf(x/√2)) → com.microsoft Gelu", from_onnxscript(erfgelu.fuse_erfgelu)),
        *ort_extra.EARLY_RULES,
        r("rms-norm", "decomposed RMSNorm → SimplifiedLayerNormalization",
          from_onnxscript(rms_normalization.fuse_rms_normalization)),
        r("skip-layer-norm", "Add + LayerNormalization → SkipLayerNormalization",
          from_onnxscript(skip_normalization.fuse_skip_layer_normalization)),
        r("skip-rms-norm", "Add + SimplifiedLayerNormalization → SkipSimplifiedLayerNormalization",
          from_onnxscript(skip_normalization.fuse_skip_rms_normalization)),
        r("rotary-embedding", "rotate-half rotary embedding → RotaryEmbedding",
          from_onnxscript(rotary_embedding.fuse_rotary_embedding)),
        r("cos-sin-cache", "position-dependent cos/sin computation → a constant cos/sin cache",
          cos_sin_then_cse),
        r("partial-rotary-embedding", "rotary embedding on part of the head → RotaryEmbedding",
          from_onnxscript(rotary_embedding.fuse_partial_rotary_embedding)),
        r("sdpa", "MatMul/Softmax/MatMul scaled dot-product attention → SDPA (intermediate)",
          from_onnxscript(sdpa.sdpa_rules, shape_inference=True)),
        r("gqa", "SDPA with shared KV heads and KV cache → GroupQueryAttention",
          from_onnxscript(_checked_gqa_rules())),
        r("gqa-packed-qkv", "GroupQueryAttention on slices of one QKV projection → packed QKV input",
          from_onnxscript(gqa_packed_qkv.fuse_qkv_gqa)),
        r("mha-kv-cache", "SDPA with past/present key-value cache → MultiHeadAttention",
          from_onnxscript(_checked_mha_rules(has_past_present=True))),
        r("mha", "SDPA with head split/merge reshapes → MultiHeadAttention",
          from_onnxscript(_checked_mha_rules(has_past_present=False))),
        r("mha-scale", "query pre-scaled by a constant → MultiHeadAttention scale attribute",
          from_onnxscript(mha_scale.fuse_mha_scale)),
        r("mha-bias", "Q/K/V projection biases → MultiHeadAttention bias input",
          from_onnxscript(mha_bias.fuse_mha_bias)),
        r("attention", "MultiHeadAttention with Q/K/V projections of one input → packed Attention",
          from_onnxscript(attention.fuse_attention)),
        r("gelu", "tanh/erf GELU in the association onnxscript matches → FastGelu / Gelu",
          from_onnxscript(gelu.fuse_gelu)),
        *ort_extra.GELU_RULES,
        r("bias-gelu", "Add(bias) + Gelu → BiasGelu", from_onnxscript(bias_gelu.fuse_bias_gelu)),
        r("sdpa-via-mha", "remaining SDPA → MultiHeadAttention", from_onnxscript(sdpa_via_mha.replace_sdpa_by_mha)),
        r("softmax", "Softmax patterns ONNX Runtime runs faster in another form",
          from_onnxscript(softmax.rules)),
        r("group-norm", "InstanceNormalization over reshaped groups → GroupNorm",
          from_onnxscript(instance_to_group_normalization.rules)),
        r("fused-matmul", "MatMul with transposed inputs or a constant scale → FusedMatMul",
          from_onnxscript(fused_matmul_rule_sets.fused_matmul_rule_sets())),
        *ort_extra.LATE_RULES,
    ]


def _checked_mha_rules(has_past_present: bool):
    """onnxscript's MultiHeadAttention rules with the output check they lack.

    onnxscript 0.7's rule does not verify the Reshape after the head merge ("TODO: verify
    Reshapes" in ort_fusions/mha.py). When that Reshape goes straight to 2-D ``[B*S, D]`` (GPT-2's
    ``view(-1, nx)`` merged with the head merge by Reshape∘Reshape simplification), the rule
    replaces a 2-D value with the op's 3-D output, and the next Gemm fails at run time. We accept
    the match only when the replaced value is ``[B, S, D]`` like the query input.
    """
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter.ort_fusions import mha

    class CheckedMultiHeadAttention(mha.MultiHeadAttention):
        def check(self, op, query_BSD, attention_reshaped=None, **kw):  # type: ignore[override]
            result = super().check(op, query_BSD=query_BSD, **kw)
            if not result:
                return result
            q, out = query_BSD.shape, getattr(attention_reshaped, "shape", None)
            if out is None or q is None or out.rank() != 3 or q.rank() != 3 or list(out)[:2] != list(q)[:2]:
                return result.fail(f"attention output {out} is not [B, S, D] like the query {q}")
            return result

    combos = [(rot, cross) for rot in (False, True) for cross in ([False] if has_past_present else [False, True])]
    return pattern.RewriteRuleSet([
        CheckedMultiHeadAttention.rule(
            f"MHA{'_Rotary' if rot else ''}{'_Past' if has_past_present else ''}{'_CrossAttention' if cross else ''}",
            is_rotary=rot, has_past_present=has_past_present, is_cross_attention=cross)
        for rot, cross in combos
    ])


def _checked_gqa_rules():
    """onnxscript's GroupQueryAttention rule with a mask check that can fail.

    onnxscript 0.7.2 (ort_fusions/gqa.py) tests ``_causal_mask_pattern.match(...) is None``, but a
    failed match is a falsy MatchResult, never None: any mask passes. On transformers-5 Llama with
    com.microsoft RotaryEmbedding present, that turns padded attention into GroupQueryAttention
    with the padding mask dropped (wrong outputs for padded batches). GroupQueryAttention only
    supports a causal mask, so we require the causal-mask pattern for real.
    """
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter.ort_fusions import gqa

    class CheckedGroupQueryAttention(gqa.GroupQueryAttention):
        def check(self, context, mask=None, **kw):  # type: ignore[override]
            node = mask.producer() if mask is not None else None
            if node is None or not gqa._causal_mask_pattern.match(
                    context.model, context.graph_or_function, node, check_nodes_are_removable=False):
                return pattern.MatchResult().fail("mask is not the causal-mask pattern", mask)
            return super().check(context, mask=mask, **kw)

    return pattern.RewriteRuleSet([CheckedGroupQueryAttention.rule()])


class FuseOrtPass(FusionPass):
    """Fuse transformer and CNN subgraphs into ONNX Runtime contrib ops (com.microsoft).

    Safe because every rule checks shapes, constants and single-consumer intermediates before it
    fires (onnxscript's checks, and ours in ``ort_extra``); an intermediate onnxscript op that no
    later rule consumed makes the pass fail rather than emit a model ONNX Runtime cannot load.
    """

    name = "fuse-ort"
    RULES: ClassVar = ()  # filled lazily: importing onnxscript's fusions costs ~1 s

    @classmethod
    def rule_list(cls) -> list[FusionRule]:
        if not cls.RULES:
            cls.RULES = tuple(_rules())
        return list(cls.RULES)

    def prepare(self, model: ir.Model) -> bool:
        from onnxscript.rewriter.ort_fusions import shape_optimization

        from ..ir_helpers import infer_shapes

        # The attention patterns check ranks and head dimensions; they need inferred shapes and
        # the Shape→Gather→Concat chains that the exporter emits rewritten to direct dims.
        modified = infer_shapes(model)
        if n := shape_optimization.rules.apply_to_model(model):
            self.count("shape-chains", n)
        return modified or bool(n)

    def finish(self, model: ir.Model, modified: bool) -> bool:
        changed = _inline_private_functions(model)
        left = sorted({n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)
                       if n.domain == _PRIVATE_DOMAIN})
        if left:
            raise PassFailedError(
                f"fuse-ort left intermediate ops {left} that no rule consumed; "
                "run without fuse-ort (or exclude its 'sdpa' rule) and report the model")
        if modified or changed:
            common.RemoveUnusedNodesPass()(model)
            common.RemoveUnusedOpsetsPass()(model)
        return changed


def _inline_private_functions(model: ir.Model) -> bool:
    """Inline the intermediate functions onnxscript's rules create (e.g. a rotary embedding that no
    cos/sin-cache rule turned into the contrib op) and leave the model's own functions alone."""
    private = {k: f for k, f in model.functions.items() if k[0] == _PRIVATE_DOMAIN}
    if not private:
        return False
    own = {k: f for k, f in model.functions.items() if k[0] != _PRIVATE_DOMAIN}
    model.functions.clear()
    model.functions.update(private)
    try:
        common.InlinePass()(model)
    finally:
        model.functions.clear()
        model.functions.update(own)
    return True


ORT_RULES = FuseOrtPass.rule_list

"""``fuse-ort``: ONNX Runtime contrib fusions (``com.microsoft``) for the ort-cpu and ort-cuda
targets; this module only sets the rule order and the pass's set-up and final check.

The rules are onnxscript's ``rewriter.ort_fusions`` (maintained with ONNX Runtime's kernels), in
the order ``onnxscript.rewriter.ort_fusions.fuse_xformers`` runs them, because later rules consume
the ops earlier ones create (SDPA → MultiHeadAttention → Attention). Our additions, each in its
own module with its reasons: ``ort_attention`` (checks onnxscript's MHA/GQA rules lack),
``ort_rotary``, ``ort_gelu`` and ``ort_conv`` (patterns onnxscript misses on real exports).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import onnx_ir as ir
import onnx_ir.passes.common as common

from graphopt.errors import PassFailedError

from ..ir_helpers import graph_nodes, infer_shapes, opset_guarded
from . import ort_attention, ort_conv, ort_gelu, ort_gqa, ort_qkv, ort_rotary
from ._base import CONTRIB, STANDARD, FusionOptions, FusionPass, FusionRule, from_onnxscript
from .matching import PRIVATE_DOMAIN

__all__ = ["FuseOrtPass", "ORT_RULES"]


def _rules() -> list[FusionRule]:
    # Imported here: importing onnxscript's ort_fusions package costs about a second.
    from onnxscript.rewriter.ort_fusions import (
        attention,
        bias_gelu,
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
    from onnxscript.rewriter.rules.common import gemm_to_matmul_add_rule

    def r(name: str, summary: str, apply: Callable[[ir.Model], int], **kw: Any) -> FusionRule:
        return FusionRule(name, summary, apply, CONTRIB, **kw)

    return [
        # Must run first: onnxscript's MHA rules drop the Reshape-to-2D that GPT-2's Conv1D (addmm)
        # puts before its Gemm, which leaves a Gemm with a 3-D input that ONNX Runtime rejects
        # (seen on transformers' GPT-2). optimize_for_ort does the same conversion up front.
        FusionRule(
            "gemm-to-matmul",
            "Reshape→Gemm→Reshape → MatMul + Add so attention patterns see the projections",
            from_onnxscript(gemm_to_matmul_add_rule),
            STANDARD,
        ),
        r("erf-gelu", "x·½(1+erf(x/√2)) → com.microsoft Gelu", from_onnxscript(erfgelu.fuse_erfgelu)),
        # Before the normalization and attention rules, so that the attention rules see
        # com.microsoft RotaryEmbedding and absorb the Q/K/V head reshapes too. That needs the
        # guarded GQA rule below (onnxscript's accepts any mask once a RotaryEmbedding exists).
        r(
            "rotary-embedding-mul",
            "rotate-half RoPE with angles = positions·inv_freq (transformers ≥ 5) → RotaryEmbedding + cos/sin cache",
            ort_rotary.fuse_rotary_embedding,
        ),
        r(
            "rms-norm",
            "decomposed RMSNorm → SimplifiedLayerNormalization",
            from_onnxscript(rms_normalization.fuse_rms_normalization),
        ),
        r(
            "skip-layer-norm",
            "Add + LayerNormalization → SkipLayerNormalization",
            from_onnxscript(skip_normalization.fuse_skip_layer_normalization),
        ),
        r(
            "skip-rms-norm",
            "Add + SimplifiedLayerNormalization → SkipSimplifiedLayerNormalization",
            from_onnxscript(skip_normalization.fuse_skip_rms_normalization),
        ),
        r(
            "rotary-embedding",
            "rotate-half rotary embedding → RotaryEmbedding",
            from_onnxscript(rotary_embedding.fuse_rotary_embedding),
        ),
        r(
            "cos-sin-cache",
            "position-dependent cos/sin computation → a constant cos/sin cache",
            ort_rotary.fuse_cos_sin_cache_then_cse,
        ),
        r(
            "partial-rotary-embedding",
            "rotary embedding on part of the head → RotaryEmbedding",
            from_onnxscript(rotary_embedding.fuse_partial_rotary_embedding),
        ),
        # After the rotary rules (it takes their RotaryEmbedding in as do_rotary), before
        # onnxscript's SDPA rule (which would turn the same attention into MultiHeadAttention).
        r(
            GQA_RULE,
            "decoder self-attention with a proved causal mask → GroupQueryAttention (+ rotary inside)",
            ort_gqa.fuse_group_query_attention,
        ),
        r(
            "gqa-packed-projection",
            "GroupQueryAttention fed by three MatMuls of one input with constant weights → one packed QKV MatMul",
            ort_qkv.fuse_packed_qkv,
        ),
        r(
            "sdpa",
            "MatMul/Softmax/MatMul scaled dot-product attention → SDPA (intermediate)",
            from_onnxscript(sdpa.sdpa_rules, shape_inference=True),
        ),
        r(
            "gqa",
            "SDPA with shared KV heads and KV cache → GroupQueryAttention",
            from_onnxscript(ort_attention.checked_gqa_rules()),
        ),
        r(
            "gqa-packed-qkv",
            "GroupQueryAttention on slices of one QKV projection → packed QKV input",
            from_onnxscript(gqa_packed_qkv.fuse_qkv_gqa),
        ),
        r(
            "mha-kv-cache",
            "SDPA with past/present key-value cache → MultiHeadAttention",
            from_onnxscript(ort_attention.checked_mha_rules(has_past_present=True)),
        ),
        r(
            "mha",
            "SDPA with head split/merge reshapes → MultiHeadAttention",
            from_onnxscript(ort_attention.checked_mha_rules(has_past_present=False)),
        ),
        r(
            "mha-scale",
            "query pre-scaled by a constant → MultiHeadAttention scale attribute",
            from_onnxscript(mha_scale.fuse_mha_scale),
        ),
        r(
            "mha-bias",
            "Q/K/V projection biases → MultiHeadAttention bias input",
            from_onnxscript(mha_bias.fuse_mha_bias),
        ),
        r(
            "attention",
            "MultiHeadAttention with Q/K/V projections of one input → packed Attention",
            from_onnxscript(attention.fuse_attention),
        ),
        r(
            "gelu",
            "tanh/erf GELU in the association onnxscript matches → FastGelu / Gelu",
            from_onnxscript(gelu.fuse_gelu),
        ),
        # After onnxscript's GELU rules (the forms they miss), before BiasGelu.
        r(
            "fast-gelu-tanh",
            "tanh GELU in the associations onnxscript misses (GPT-2's (½x)·(1+tanh…)) → FastGelu",
            ort_gelu.fuse_fast_gelu,
        ),
        r("quick-gelu", "x·Sigmoid(αx) (SiLU when α=1) → QuickGelu", ort_gelu.fuse_quick_gelu),
        r("bias-gelu", "Add(bias) + Gelu → BiasGelu", from_onnxscript(bias_gelu.fuse_bias_gelu)),
        r(
            "sdpa-via-mha",
            "remaining SDPA → MultiHeadAttention",
            from_onnxscript(sdpa_via_mha.replace_sdpa_by_mha),
        ),
        r(
            "softmax",
            "Softmax patterns ONNX Runtime runs faster in another form",
            from_onnxscript(softmax.rules),
        ),
        r(
            "group-norm",
            "InstanceNormalization over reshaped groups → GroupNorm",
            from_onnxscript(instance_to_group_normalization.rules),
        ),
        r(
            "fused-matmul",
            "MatMul with transposed inputs or a constant scale → FusedMatMul",
            from_onnxscript(fused_matmul_rule_sets.fused_matmul_rule_sets()),
        ),
        r(
            "fused-conv",
            "Conv [+ Add(residual)] + Relu/Sigmoid/Tanh/LeakyRelu/Clip/HardSigmoid → FusedConv",
            ort_conv.fuse_conv_activation,
        ),
    ]


#: The decoder-attention rule, the one that reads the ``padding_mask`` option.
GQA_RULE = "gqa-decoder"


@dataclasses.dataclass
class FuseOrtOptions(FusionOptions):
    padding_mask: list[str] = dataclasses.field(
        default_factory=list,
        metadata={
            "doc": "inputs declared to follow GroupQueryAttention's padding convention (1 for the "
            "first tokens of a row, 0 after: right padding); attention masked by them may fuse"
        },
    )


class FuseOrtPass(FusionPass):
    """Fuse transformer and CNN subgraphs into ONNX Runtime contrib ops (com.microsoft).

    Safe because every rule checks shapes, constants and single-consumer intermediates before it
    fires (onnxscript's checks, and ours in the ``ort_*`` rule modules); an intermediate onnxscript
    op that no later rule consumed makes the pass fail rather than emit a model ONNX Runtime cannot
    load.

    Option ``padding_mask`` (e.g. ``fuse-ort(padding_mask=[attention_mask])``): GroupQueryAttention
    implements causal attention over the first ``seqlens_k + 1`` keys of each row, so the
    ``gqa-decoder`` rule fuses attention whose mask also reads a padding-mask input only when that
    input is named here, i.e. the caller guarantees right padding (onnxruntime-genai's convention,
    what graphopt's LLM build declares). Padded query rows then compute what the graph computes
    for them too, but only the valid rows are promised. Without it such attention is left alone
    (it still fuses when the mask is provably causal: no mask input, or a static all-ones one).
    """

    name = "fuse-ort"
    Options = FuseOrtOptions
    RULES: ClassVar = ()  # filled lazily: importing onnxscript's fusions costs ~1 s

    def selected_rules(self, model: ir.Model) -> list[FusionRule]:
        padding = frozenset(self.options.padding_mask)
        rules = super().selected_rules(model)
        if not padding:
            return rules
        gqa = functools.partial(ort_gqa.fuse_group_query_attention, padding_inputs=padding)
        return [dataclasses.replace(r, apply=gqa) if r.name == GQA_RULE else r for r in rules]

    @classmethod
    def rule_list(cls) -> list[FusionRule]:
        if not cls.RULES:
            cls.RULES = tuple(_rules())
        return list(cls.RULES)

    def prepare(self, model: ir.Model) -> bool:
        from onnxscript.rewriter.ort_fusions import shape_optimization

        # The attention patterns check ranks and head dimensions; they need inferred shapes and
        # the Shape→Gather→Concat chains that the exporter emits rewritten to direct dims.
        modified = infer_shapes(model)
        if n := opset_guarded(shape_optimization.rules).apply_to_model(model):
            self.count("shape-chains", n)
        return modified or bool(n)

    def finish(self, model: ir.Model, modified: bool) -> bool:
        changed = _inline_private_functions(model)
        left = sorted({n.op_type for n in graph_nodes(model) if n.domain == PRIVATE_DOMAIN})
        if left:
            raise PassFailedError(
                f"fuse-ort left intermediate ops {left} that no rule consumed; "
                "run without fuse-ort (or exclude its 'sdpa' rule) and report the model"
            )
        if modified or changed:
            common.RemoveUnusedNodesPass()(model)
            common.RemoveUnusedOpsetsPass()(model)
        return changed


def _inline_private_functions(model: ir.Model) -> bool:
    """Inline the intermediate functions onnxscript's rules create (e.g. a rotary embedding that no
    cos/sin-cache rule turned into the contrib op) and leave the model's own functions alone."""
    private = {k: f for k, f in model.functions.items() if k[0] == PRIVATE_DOMAIN}
    if not private:
        return False
    own = {k: f for k, f in model.functions.items() if k[0] != PRIVATE_DOMAIN}
    model.functions.clear()
    model.functions.update(private)
    try:
        common.InlinePass()(model)
    finally:
        model.functions.clear()
        model.functions.update(own)
    return True


ORT_RULES = FuseOrtPass.rule_list

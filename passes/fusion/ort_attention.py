"""onnxscript's MultiHeadAttention and GroupQueryAttention rules with the checks they lack.

onnxscript 0.7's MHA rule does not verify the Reshape after the head merge, and its GQA rule
accepts any attention mask; both let ``fuse-ort`` emit wrong models on real exports (GPT-2,
transformers-5 Llama with padding). These subclasses add the missing checks; each function's
docstring says which model showed the problem.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

__all__ = ["checked_gqa_rules", "checked_mha_rules"]


def checked_mha_rules(has_past_present: bool) -> pattern.RewriteRuleSet:
    """onnxscript's MultiHeadAttention rules with the output check they lack.

    onnxscript 0.7's rule does not verify the Reshape after the head merge ("TODO: verify
    Reshapes" in ort_fusions/mha.py). When that Reshape goes straight to 2-D ``[B*S, D]`` (GPT-2's
    ``view(-1, nx)`` merged with the head merge by Reshape∘Reshape simplification), the rule
    replaces a 2-D value with the op's 3-D output, and the next Gemm fails at run time. We accept
    the match only when the replaced value is ``[B, S, D]`` like the query input.
    """
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

    combos = [
        (rot, cross) for rot in (False, True) for cross in ([False] if has_past_present else [False, True])
    ]
    return pattern.RewriteRuleSet(
        [
            CheckedMultiHeadAttention.rule(
                f"MHA{'_Rotary' if rot else ''}{'_Past' if has_past_present else ''}{'_CrossAttention' if cross else ''}",
                is_rotary=rot,
                has_past_present=has_past_present,
                is_cross_attention=cross,
            )
            for rot, cross in combos
        ]
    )


def checked_gqa_rules() -> pattern.RewriteRuleSet:
    """onnxscript's GroupQueryAttention rule with a mask check that can fail.

    onnxscript 0.7.2 (ort_fusions/gqa.py) tests ``_causal_mask_pattern.match(...) is None``, but a
    failed match is a falsy MatchResult, never None: any mask passes. On transformers-5 Llama with
    com.microsoft RotaryEmbedding present, that turns padded attention into GroupQueryAttention
    with the padding mask dropped (wrong outputs for padded batches). GroupQueryAttention only
    supports a causal mask, so we require the causal-mask pattern for real.
    """
    from onnxscript.rewriter.ort_fusions import gqa

    class CheckedGroupQueryAttention(gqa.GroupQueryAttention):
        def check(self, context, mask=None, **kw):  # type: ignore[override]
            node = mask.producer() if mask is not None else None
            if node is None or not gqa._causal_mask_pattern.match(
                context.model, context.graph_or_function, node, check_nodes_are_removable=False
            ):
                return pattern.MatchResult().fail("mask is not the causal-mask pattern", mask)
            return super().check(context, mask=mask, **kw)

    return pattern.RewriteRuleSet([CheckedGroupQueryAttention.rule()])

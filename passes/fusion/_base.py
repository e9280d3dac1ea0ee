"""Fusion infrastructure: a rule is a named rewrite with a one-line summary and the domain it
emits; a :class:`FusionPass` applies its rules in a declared order and reports matches per rule.

Rules are usually onnxscript ``RewriteRule`` sets (pattern, check, replacement; the check raises
``MatchFailureError`` with the reason); :func:`from_onnxscript` wraps them. Each node a rule
creates is stamped with ``graphopt.rule`` in its metadata, so the output model says which rule made
what (provenance), and the report row of the pass counts matches per rule.

Ordering lives in code, not in comments: a pass lists its rules in the order they must run, and
backends list passes in the order they must run (see ``backends/``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import onnx_ir as ir

from graphopt.pipeline import Pass

from ..ir_helpers import all_nodes, infer_shapes, model_opset, opset_guarded

logger = logging.getLogger("graphopt.passes.fusion")

__all__ = ["FusionRule", "FusionPass", "from_onnxscript", "RULE_KEY", "STANDARD", "CONTRIB"]

#: Metadata key stamped on every node a fusion rule creates.
RULE_KEY = "graphopt.rule"
#: Domains a rule can emit: standard ONNX ops (every backend) or com.microsoft contrib ops
#: (ONNX Runtime CPU/CUDA only, never TensorRT).
STANDARD = "standard"
CONTRIB = "contrib"


@dataclasses.dataclass(frozen=True)
class FusionRule:
    """One named rewrite. ``apply(model) -> number of matches rewritten``."""

    name: str
    summary: str
    apply: Callable[[ir.Model], int]
    domain: str = STANDARD
    #: Lowest default-domain opset the replacement needs (e.g. 17 for LayerNormalization).
    min_opset: int = 1


def from_onnxscript(rules: Any, *, shape_inference: bool = False) -> Callable[[ir.Model], int]:
    """Adapt an onnxscript ``RewriteRule``/``RewriteRuleSet`` (or a ``fuse_*`` function) to
    ``apply(model) -> count``. The rules are opset-guarded (:func:`opset_guarded`): a site whose
    replacement does not fit the model's opsets is left alone. A ``fuse_*`` function is applied
    through the rule set it wraps."""
    from onnxscript.rewriter import pattern

    if callable(rules) and not isinstance(rules, (pattern.RewriteRule, pattern.RewriteRuleSet)):
        wrapped = _wrapped_rules(rules)
        if wrapped is None:
            fn = rules

            def apply_fn(model: ir.Model) -> int:
                return int(fn(model, apply_shape_inference=shape_inference) if shape_inference else fn(model))

            return apply_fn
        rules = wrapped
    guarded = opset_guarded(rules)

    def apply(model: ir.Model) -> int:
        count = int(guarded.apply_to_model(model))
        if count and shape_inference:
            # graphopt's wrapper: keeps subgraph types and the initializer order.
            infer_shapes(model)
        return count

    return apply


def _wrapped_rules(fn: Callable) -> Any:
    """The rule set an onnxscript ``fuse_*`` function applies (``apply_fusion_rules(rules)`` keeps
    it in its closure), or None."""
    from onnxscript.rewriter import pattern

    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, (pattern.RewriteRule, pattern.RewriteRuleSet)):
            return value
    return None


@dataclasses.dataclass
class FusionOptions:
    rules: list[str] | None = dataclasses.field(
        default=None, metadata={"doc": "only these rules (default: all the pass has)"}
    )
    exclude: list[str] = dataclasses.field(default_factory=list, metadata={"doc": "rules to skip"})
    domains: list[str] = dataclasses.field(
        default_factory=lambda: [STANDARD, CONTRIB],
        metadata={"doc": "domains rules may emit: standard, contrib"},
    )


class FusionPass(Pass):
    """Base of the fusion passes; subclasses set ``name`` and ``RULES`` (in order)."""

    Options = FusionOptions
    #: The rules, in the order they are applied.
    RULES: ClassVar[Sequence[FusionRule]] = ()

    @classmethod
    def rule_list(cls) -> list[FusionRule]:
        """The rules in application order (what ``graphopt passes`` lists)."""
        return list(cls.RULES)

    @classmethod
    def rule_names(cls) -> list[str]:
        return [r.name for r in cls.rule_list()]

    def selected_rules(self, model: ir.Model) -> list[FusionRule]:
        opts = self.options
        known = set(self.rule_names())
        for n in [*(opts.rules or []), *opts.exclude]:
            if n not in known:
                from graphopt.errors import PipelineError

                raise PipelineError(f"pass '{self.name}' has no rule '{n}' (rules: {sorted(known)})")
        out = []
        opset = model_opset(model)
        for r in self.rule_list():
            if opts.rules is not None and r.name not in opts.rules:
                continue
            if r.name in opts.exclude or r.domain not in opts.domains:
                continue
            if opset < r.min_opset:
                logger.debug(
                    "%s/%s: skipped, the model's opset %d < %d", self.name, r.name, opset, r.min_opset
                )
                continue
            out.append(r)
        return out

    def prepare(self, model: ir.Model) -> bool:
        """Hook run once before the rules (e.g. shape inference the patterns rely on); returns
        whether it changed the model."""
        return False

    def finish(self, model: ir.Model, modified: bool) -> bool:
        """Hook run once after the rules; returns whether it changed the model."""
        return False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rules = self.selected_rules(model)
        if not rules:
            return ir.passes.PassResult(model, False)
        modified = self.prepare(model)
        for rule in rules:
            # The snapshot keeps every node alive while the rule runs, so that no node it creates can
            # reuse the id() of one it removed (ids of freed objects are recycled): which nodes are
            # new, and so the provenance stamps, must not depend on memory addresses.
            existing = all_nodes(model)
            before = {id(n) for n in existing}
            n = rule.apply(model)
            if not n:
                continue
            modified = True
            self.count(rule.name, n)
            for node in all_nodes(model):
                if id(node) not in before:
                    node.metadata_props[RULE_KEY] = f"{self.name}/{rule.name}"
            logger.debug("%s/%s: %d match(es)", self.name, rule.name, n)
        modified |= self.finish(model, modified)
        return ir.passes.PassResult(model, modified)

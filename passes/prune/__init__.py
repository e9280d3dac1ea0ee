"""Weight pruning: unstructured magnitude, N:M semi-structured, and structured pruning that
shrinks the graph. One pass, ``prune``, three modes:

* ``unstructured``: zero the smallest-magnitude weights of Conv / MatMul / Gemm weight
  initializers, per layer or under one global threshold (:mod:`.unstructured`, :mod:`.masks`).
  The file keeps its dense layout; only sparse storage (:mod:`.sparse`) makes it smaller.
* ``N:M`` (``2:4`` ...): in every group of M consecutive weights along the reduction dimension,
  keep the N largest (:func:`satisfies_nm` checks the result).
* ``structured``: remove whole Conv channels, FFN neurons (:mod:`.closure`) and attention heads
  (:mod:`.heads`), rewriting every dependent weight, per-channel parameter and shape
  (:mod:`.structured`, :mod:`.rewrite`).

Importance is the weights' magnitude / norm or, with calibration data, Wanda-style activation
statistics (:mod:`.importance`). Every rewrite writes new initializers (a weight shared with
another node is copied, never changed in place for structured pruning) and the report's details
list every layer / group with its decision.
"""

from __future__ import annotations

import logging
from typing import Any

import onnx_ir as ir

from graphopt.errors import PipelineError
from graphopt.pipeline import Pass
from graphopt.sparse_storage import SPARSE_STORAGE_KEY  # metadata: graphopt.save stores sparse weights

from .masks import nm_axis, satisfies_nm, sparsity_of
from .options import MODES as MODES  # the module constants stay where they were
from .options import TARGETS, PruneOptions, PruneRun, parse_mode
from .sparse import save_sparse, to_sparse_proto
from .structured import prune_structured
from .unstructured import zero_weights

__all__ = [
    "PruneOptions",
    "PrunePass",
    "parse_mode",
    "satisfies_nm",
    "nm_axis",
    "sparsity_of",
    "to_sparse_proto",
    "save_sparse",
]

logger = logging.getLogger("graphopt.passes.prune")


class PrunePass(Pass):
    """Prune weights: unstructured magnitude, N:M (2:4) semi-structured, or structured units.

    Unstructured and N:M zero weights in place of Conv/MatMul/Gemm weight initializers (never
    embeddings, norms, biases or tensors below ``min_size``); shapes do not change, and dense
    kernels run as fast as before (only sparse hardware or sparse storage benefit). Structured
    mode removes Conv channels, FFN neurons and attention heads, rewriting every dependent
    weight, per-channel parameter and shape constant; any consumer it does not understand leaves
    that unit group unpruned with the reason in the report. Changes the model's numbers by design
    (verify accuracy); never changes inputs or outputs.
    """

    name = "prune"
    Options = PruneOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if not 0.0 <= o.sparsity < 1.0:
            raise PipelineError(f"prune sparsity must be in [0, 1), got {o.sparsity}")
        self.kind, self.n, self.m = parse_mode(o.mode)
        for t in o.targets:
            if t not in TARGETS:
                raise PipelineError(f"prune target {t!r} unknown; use {', '.join(TARGETS)}")
        if o.round_to < 1:
            raise PipelineError("prune round_to must be >= 1")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        run = PruneRun(
            self.options,
            self.kind,
            self.n,
            self.m,
            context=self.context,
            count=self.count,
            details=self.details,
        )
        run.details["mode"] = self.options.mode
        if run.kind == "structured":
            modified = prune_structured(run, model)
        else:
            modified = zero_weights(run, model)
        if self.options.sparse_storage:
            model.metadata_props[SPARSE_STORAGE_KEY] = "1"
            modified = True
        return ir.passes.PassResult(model, modified)

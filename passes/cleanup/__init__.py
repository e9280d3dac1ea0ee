"""Cleanup passes: constant folding, no-op removal, dead code, CSE, initializer dedup, sorting.

Reuses onnxscript's constant folder and onnx_ir's common passes where they are safe, and adds
what they lack; each module says what and why:

* :mod:`.folding`: ``fold-constants`` (size, overflow and type guards around onnxscript's folder)
* :mod:`.noops`: ``remove-noops``, ``simplify``
* :mod:`.basic`: ``remove-unused``, ``cse``, ``dedup-initializers``, ``topological-sort``,
  ``shape-inference``, ``lift-constants``, ``normalize-legacy-inputs``
* :mod:`.composite`: ``cleanup``, all of them in order

The entry points name the passes as ``graphopt.passes.cleanup:<Class>``: re-exported here.
"""

from __future__ import annotations

from .basic import (
    CSEOptions,
    CSEPass,
    DeduplicateInitializersPass,
    LiftConstantsPass,
    NormalizeLegacyInputsPass,
    RemoveUnusedPass,
    ShapeInferencePass,
    TopologicalSortPass,
)
from .composite import CleanupOptions, CleanupPass
from .folding import FoldConstantsPass, FoldOptions, estimate_output_elements
from .noops import NoOpOptions, RemoveNoOpsPass, SimplifyPass

__all__ = [
    "CleanupPass",
    "FoldConstantsPass",
    "RemoveNoOpsPass",
    "RemoveUnusedPass",
    "CSEPass",
    "DeduplicateInitializersPass",
    "TopologicalSortPass",
    "ShapeInferencePass",
    "LiftConstantsPass",
    "SimplifyPass",
    "NormalizeLegacyInputsPass",
    "CleanupOptions",
    "CSEOptions",
    "FoldOptions",
    "NoOpOptions",
    "estimate_output_elements",
]

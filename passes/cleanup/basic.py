"""The small cleanup passes: thin wrappers over onnx_ir's common passes (typed options,
documented safety, counted effects), initializer dedup, legacy-input normalization and shape
inference."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from graphopt.pipeline import Pass

from ..ir_helpers import all_nodes, infer_shapes

__all__ = [
    "CSEOptions",
    "CSEPass",
    "DeduplicateInitializersPass",
    "LiftConstantsPass",
    "NormalizeLegacyInputsPass",
    "RemoveUnusedPass",
    "ShapeInferencePass",
    "TopologicalSortPass",
]


class RemoveUnusedPass(Pass):
    """Remove nodes, initializers, functions and opset imports nothing uses.

    Safe because graph inputs and outputs are kept, values used inside If/Loop/Scan bodies count
    as uses, and optional outputs are only dropped where the op allows it.
    """

    name = "remove-unused"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = sum(1 for _ in all_nodes(model)) + sum(len(g.initializers) for g in model.graphs())
        modified = common.RemoveUnusedNodesPass()(model).modified
        modified |= common.RemoveUnusedFunctionsPass()(model).modified
        modified |= common.RemoveUnusedOpsetsPass()(model).modified
        after = sum(1 for _ in all_nodes(model)) + sum(len(g.initializers) for g in model.graphs())
        if before != after:
            self.count("removed", before - after)
        return ir.passes.PassResult(model, modified)


@dataclasses.dataclass
class CSEOptions:
    size_limit: int = 10


class CSEPass(Pass):
    """Merge nodes that compute the same op on the same inputs with the same attributes.

    Safe because random ops and nodes with subgraphs are never merged, and constant operands
    are compared by value only below ``size_limit`` elements.
    """

    name = "cse"
    Options = CSEOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = sum(1 for _ in all_nodes(model))
        result = common.CommonSubexpressionEliminationPass(size_limit=self.options.size_limit)(model)
        self.count("merged", before - sum(1 for _ in all_nodes(model)))
        return ir.passes.PassResult(model, result.modified)


class NormalizeLegacyInputsPass(Pass):
    """Make initializers of IR version < 4 models constants instead of graph inputs (IR 4).

    IR < 4 required every initializer to be listed as a graph input; ONNX Runtime treats those
    as constants (it does not expose them as inputs), so this changes nothing a session sees,
    and lets folding and fusion treat the weights as the constants they are.
    """

    name = "normalize-legacy-inputs"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if model.ir_version >= 4:
            return ir.passes.PassResult(model, False)
        for graph in model.graphs():
            inits = set(graph.initializers.values())
            kept = [v for v in graph.inputs if v not in inits]
            if len(kept) != len(graph.inputs):
                self.count("inputs_made_constant", len(graph.inputs) - len(kept))
                graph.inputs.clear()
                graph.inputs.extend(kept)
        model.ir_version = 4
        return ir.passes.PassResult(model, True)


class DeduplicateInitializersPass(Pass):
    """Share initializers with identical dtype, shape and bytes (hashed, then compared).

    Safe because initializers that are also graph inputs or outputs are left alone and sharing
    happens only within one graph (subgraph initializers are scoped). Own implementation because
    onnx_ir's hashed dedup fails on non-contiguous arrays (e.g. a folded Transpose).
    """

    name = "dedup-initializers"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import hashlib

        modified = False
        for graph in model.graphs():
            # Only tensors that share dtype and shape can be equal: hash those alone, in place
            # (memory-mapped weights are hashed without copying them into memory).
            groups: dict[tuple[Any, ...], list[ir.Value]] = {}
            for value in graph.initializers.values():
                t = value.const_value
                if t is None or value.is_graph_input() or value.is_graph_output():
                    continue
                if t.dtype == ir.DataType.STRING:
                    continue
                groups.setdefault((t.dtype, tuple(t.shape)), []).append(value)
            for candidates in groups.values():
                if len(candidates) < 2:
                    continue
                seen: dict[bytes, ir.Value] = {}
                for value in candidates:
                    arr = _contiguous(value.const_value)  # type: ignore[arg-type]
                    digest = hashlib.sha256(memoryview(arr).cast("B")).digest()
                    first = seen.get(digest)
                    if first is None:
                        seen[digest] = value
                        continue
                    if not np.array_equal(_contiguous(first.const_value), arr):  # type: ignore[arg-type]
                        continue  # hash collision: keep both
                    value.replace_all_uses_with(first)
                    assert value.name is not None
                    graph.initializers.pop(value.name)
                    self.count("merged")
                    modified = True
        return ir.passes.PassResult(model, modified)


def _contiguous(tensor: ir.TensorProtocol) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array, without a copy when already contiguous."""
    arr = tensor.numpy()
    if arr.dtype.kind not in "biufc":  # ml_dtypes (bf16, fp8, int4): compare the raw bytes
        return np.frombuffer(tensor.tobytes(), dtype=np.uint8)
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


class TopologicalSortPass(Pass):
    """Sort nodes topologically (graphs, subgraphs, functions) so every consumer follows its producers."""

    name = "topological-sort"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        order = [id(n) for n in all_nodes(model)]
        common.TopologicalSortPass()(model)
        return ir.passes.PassResult(model, order != [id(n) for n in all_nodes(model)])


class ShapeInferencePass(Pass):
    """Annotate values with the dtypes and shapes ONNX shape inference derives.

    Safe because it only adds type information; if inference fails the model is left unchanged.
    Later passes use the annotations to prove rewrites (e.g. a Cast to the same type).
    """

    name = "shape-inference"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, infer_shapes(model))


class LiftConstantsPass(Pass):
    """Turn Constant nodes of the main graph into initializers (weights live in one place).

    Safe because a Constant whose output is a graph output is kept (an initializer cannot be
    renamed into an output without changing the signature).
    """

    name = "lift-constants"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        return ir.passes.PassResult(model, result.modified)

"""Cleanup passes: constant folding, no-op removal, dead code, CSE, initializer dedup, sorting.

Reuses onnxscript's constant folder and onnx_ir's common passes where they are safe, and adds
what they lack (each place says why):

* onnxscript's folder evaluates a node *before* checking the result's size, so a
  ``ConstantOfShape``/``Expand``/``Tile`` of gigabytes is materialised; and an evaluator error
  aborts the whole pass. :class:`FoldConstantsPass` pre-estimates output sizes, skips nodes whose
  evaluation fails, and refuses results whose dtype/shape disagree with the node's declared type.
* onnx_ir's identity elimination renames an input that is already a graph output, which loses
  that output; :func:`~graphopt.passes.ir_helpers.replace_value` keeps the node in such cases.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import _constant_folding

from graphopt.pipeline import CompositePass, Pass, Pipeline

from .ir_helpers import all_nodes, infer_shapes, replace_value

logger = logging.getLogger("graphopt.passes.cleanup")

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
]


# ---------------------------------------------------------------------------------------------
# Helpers


def _is_std(node: ir.Node, *op_types: str) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in op_types


def _const(value: ir.Value | None) -> np.ndarray | None:
    """The constant content of a value (initializer or Constant output), if small enough to read."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    try:
        return value.const_value.numpy()
    except Exception:
        return None


def _static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None:
        return None
    dims = []
    for d in value.shape:
        if not isinstance(d, int):
            return None
        dims.append(d)
    return tuple(dims)


# ---------------------------------------------------------------------------------------------
# Constant folding

# Slots of ops that hold parameters: a ConstantOfShape feeding only these is a weight built at
# run time (the opset-9 model-zoo graphs do this), which is worth materialising.
_WEIGHT_SLOTS: dict[str, set[int]] = {
    "Conv": {1, 2},
    "ConvTranspose": {1, 2},
    "Gemm": {1, 2},
    "MatMul": {1},
    "BatchNormalization": {1, 2, 3, 4},
    "InstanceNormalization": {1, 2},
    "LayerNormalization": {1, 2},
    "PRelu": {1},
    "LSTM": {1, 2, 3},
    "GRU": {1, 2, 3},
    "RNN": {1, 2, 3},
}

# Ops whose output can be far larger than their inputs; their size is estimated before folding.
_ITEMSIZE_GUESS = 8


def _broadcast(*shapes: Sequence[int]) -> tuple[int, ...] | None:
    try:
        return tuple(int(x) for x in np.broadcast_shapes(*[tuple(int(d) for d in s) for s in shapes]))
    except ValueError:
        return None


def estimate_output_elements(node: ir.Node) -> int | None:
    """Upper estimate of the element count of a node's largest output, from constant inputs.

    Computed *without* evaluating the node, so that folding never materialises a huge tensor.
    None when unknown.
    """
    out = node.outputs[0] if node.outputs else None
    shape = _static_shape(out)
    if shape is not None:
        return math.prod(shape)
    ins = [_const(v) for v in node.inputs]
    shapes = [None if a is None else a.shape for a in ins]
    op = node.op_type
    try:
        if op == "ConstantOfShape" and ins and ins[0] is not None:
            return int(np.prod(ins[0].astype(np.int64), dtype=np.float64))
        if op == "Expand" and len(ins) == 2 and ins[0] is not None and ins[1] is not None:
            b = _broadcast(ins[0].shape, [int(d) for d in ins[1].reshape(-1)])
            return None if b is None else math.prod(b)
        if op == "Tile" and len(ins) >= 2 and ins[0] is not None and ins[1] is not None:
            return int(ins[0].size * float(np.prod(ins[1].astype(np.float64))))
        if op == "Range" and len(ins) == 3 and all(a is not None for a in ins):
            start, limit, delta = (float(np.asarray(a).reshape(-1)[0]) for a in ins)  # type: ignore[union-attr]
            if delta == 0:
                return None
            return max(0, math.ceil((limit - start) / delta))
        if op == "OneHot" and len(ins) >= 2 and ins[0] is not None and ins[1] is not None:
            return int(ins[0].size * float(np.asarray(ins[1]).reshape(-1)[0]))
        if op in ("MatMul", "Gemm", "Einsum", "Resize", "Upsample", "Pad", "Col2Im", "CumSum"):
            if op == "MatMul" and len(ins) == 2 and all(a is not None for a in ins):
                a, b = ins[0], ins[1]  # type: ignore[assignment]
                return int(a.size // max(a.shape[-1], 1) * (b.shape[-1] if b.ndim else 1) * max(1, b.size // max(b.shape[-1] * (b.shape[-2] if b.ndim > 1 else 1), 1)))  # type: ignore[union-attr]
            return None
    except (ValueError, OverflowError, IndexError, TypeError):
        return None
    known = [s for s in shapes if s is not None]
    if not known:
        return None
    b = _broadcast(*known)
    if b is not None and len(known) == len([v for v in node.inputs if v is not None]):
        return max(math.prod(b), max(math.prod(s) for s in known))
    return max(math.prod(s) for s in known)


@dataclasses.dataclass
class FoldOptions:
    input_size_limit: int = 8192
    output_size_limit: int = 1 << 20
    max_fold_bytes: int = 512 * 1024 * 1024
    shape_inference: bool = True


class _GuardedFolder(_constant_folding.FoldConstantsPass):
    """onnxscript's folder with graphopt's guards (see module docstring)."""

    def __init__(self, owner: FoldConstantsPass) -> None:
        o = owner.options
        super().__init__(
            shape_inference=o.shape_inference,
            input_size_limit=o.input_size_limit,
            output_size_limit=o.output_size_limit,
            should_fold=self._should_fold,
        )
        self.owner = owner

    def _should_fold(self, node: ir.Node) -> bool | None:
        o = self.owner.options
        if node.domain not in ("", "ai.onnx"):
            return False  # only standard ops have a trustworthy reference implementation
        if any(v is not None and v.is_graph_input() for v in node.inputs):
            return False
        if _may_overflow(node):
            self.owner.count("skipped_int_overflow")
            return False
        n = estimate_output_elements(node)
        if n is not None:
            itemsize = _itemsize(node.outputs[0]) if node.outputs else _ITEMSIZE_GUESS
            if n * itemsize > o.max_fold_bytes:
                self.owner.count("skipped_too_large")
                return False
        elif node.op_type in ("ConstantOfShape", "Expand", "Tile", "Range", "OneHot", "Resize", "Upsample"):
            self.owner.count("skipped_unknown_size")
            return False
        if node.op_type == "ConstantOfShape":
            if n is not None and n <= o.output_size_limit:
                return True
            if node.outputs and _only_weight_uses(node.outputs[0]):
                return True
            return None  # onnxscript keeps ConstantOfShape by default
        return None

    def process_node(self, node: ir.Node, is_function: bool) -> Any:
        try:
            return super().process_node(node, is_function)
        except Exception as e:  # an evaluator that cannot handle this node: leave it alone
            logger.debug("not folding %s (%s): %s", node.name, node.op_type, e)
            self.owner.count("skipped_error")
            return None

    def _prepare_folded_tensor(self, node: ir.Node, output_name: str, output_array: Any) -> ir.Tensor | None:
        if isinstance(output_array, np.ndarray):
            declared = node.outputs[0] if node.outputs else None
            if declared is not None and declared.dtype is not None:
                try:
                    got = ir.DataType.from_numpy(output_array.dtype)
                except TypeError:
                    got = None
                if got is not None and got != declared.dtype:
                    self.owner.count("skipped_dtype_mismatch")
                    return None
            shape = _static_shape(declared)
            if shape is not None and tuple(output_array.shape) != shape:
                self.owner.count("skipped_shape_mismatch")
                return None
            if output_array.nbytes > self.owner.options.max_fold_bytes:
                self.owner.count("skipped_too_large")
                return None
        if (
            isinstance(output_array, np.ndarray)
            and _is_std(node, "ConstantOfShape")
            and node.outputs
            and _only_weight_uses(node.outputs[0])
        ):
            # A weight built at run time: onnxscript's size gate would keep it unfolded.
            tensor = ir.tensor(output_array)
            tensor.name = output_name
        else:
            tensor = super()._prepare_folded_tensor(node, output_name, output_array)
        if tensor is not None:
            self.owner.count("folded")
        return tensor


_INT_ARITH = {"Add", "Sub", "Mul", "Neg", "Abs", "Pow", "Div", "ReduceSum", "ReduceProd", "CumSum",
              "MatMul", "Gemm", "Sum", "ReduceSumSquare", "Einsum"}


def _may_overflow(node: ir.Node) -> bool:
    """True if integer arithmetic on these constants might overflow its type.

    numpy wraps around on overflow while ONNX Runtime kernels may saturate or wrap differently
    (ReduceProd on int64 saturates), so folding such a node could change the result.
    """
    if node.op_type not in _INT_ARITH or not node.outputs:
        return False
    arrays = [_const(v) for v in node.inputs if v is not None]
    if any(a is None for a in arrays):
        return False
    ints = [a for a in arrays if a is not None and a.dtype.kind in "iu"]
    if not ints:
        return False
    dtype = np.result_type(*ints)
    info = np.iinfo(dtype)
    mags = [np.abs(a.astype(np.float64)) for a in arrays if a is not None]
    if not all(m.size for m in mags):
        return False
    op = node.op_type
    with np.errstate(all="ignore"):
        if op in ("Add", "Sub", "Sum"):
            bound = float(sum(m.max() for m in mags))
        elif op in ("Mul", "Pow", "ReduceProd", "MatMul", "Gemm", "Einsum", "ReduceSumSquare"):
            if op == "Pow" and len(mags) == 2:
                bound = float(mags[0].max() ** arrays[1].astype(np.float64).max())  # type: ignore[union-attr]
            elif op in ("MatMul", "Gemm", "Einsum"):
                bound = float(np.prod([m.max() for m in mags])) * max(m.size for m in mags)
            elif op == "ReduceSumSquare":
                bound = float((mags[0] ** 2).sum())
            else:
                bound = float(np.prod([np.prod(m) if op == "ReduceProd" else m.max() for m in mags]))
        elif op in ("ReduceSum", "CumSum"):
            bound = float(mags[0].sum())
        else:  # Neg, Abs, Div: only the most negative value overflows
            bound = float(max(m.max() for m in mags))
            if dtype.kind == "i" and bound >= -float(info.min):
                return True
            return dtype.kind == "u" and op == "Neg"
    if dtype.kind == "u" and op == "Sub":
        a, b = arrays[0], arrays[1]
        if a is None or b is None or bool(np.any(a.astype(np.float64) < b.astype(np.float64))):
            return True
    return not np.isfinite(bound) or bound >= float(info.max)


def _itemsize(value: ir.Value) -> int:
    if value.dtype is None:
        return _ITEMSIZE_GUESS
    try:
        return max(1, value.dtype.itemsize)
    except Exception:
        return _ITEMSIZE_GUESS


def _only_weight_uses(value: ir.Value) -> bool:
    uses = value.uses()
    if not uses or value.is_graph_output():
        return False
    for use in uses:
        slots = _WEIGHT_SLOTS.get(use.node.op_type)
        if use.node.domain not in ("", "ai.onnx") or not slots or use.idx not in slots:
            return False
    return True


class FoldConstantsPass(Pass):
    """Evaluate nodes whose inputs are all constant and store the results as initializers.

    Safe because only standard-domain, deterministic ops are folded, graph inputs (even with
    an initializer) are never treated as constants, a result whose dtype or shape disagrees with
    the node's declared type is discarded, and outputs whose estimated size exceeds
    ``max_fold_bytes`` are never materialised. Also propagates shapes (Shape/Size/Gather on
    shapes) through onnxscript's partial evaluators.
    """

    name = "fold-constants"
    Options = FoldOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _type_annotations(model)
        result = _GuardedFolder(self)(model)
        # onnxscript's folder also annotates value types/shapes (subgraphs included) without
        # saying "modified"; the output then differs, so we say so.
        return ir.passes.PassResult(model, result.modified or _type_annotations(model) != before)


def _type_annotations(model: ir.Model) -> list[tuple[str, str]]:
    return [(repr(v.type), repr(v.shape)) for n in all_nodes(model) for v in n.outputs]


# ---------------------------------------------------------------------------------------------
# No-op removal


@dataclasses.dataclass
class NoOpOptions:
    identity: bool = True
    dropout: bool = True
    cast: bool = True
    reshape: bool = True
    expand: bool = True
    transpose: bool = True
    arithmetic: bool = True


def _neutral_operand_input(node: ir.Node) -> ir.Value | None:
    """x for x+0, 0+x, x-0, x*1, 1*x, x/1 when the constant cannot broadcast x to a new shape."""
    neutral = 0 if node.op_type in ("Add", "Sub") else 1
    sides = [(0, 1), (1, 0)] if node.op_type in ("Add", "Mul") else [(0, 1)]
    for xi, ci in sides:
        x, c = node.inputs[xi], node.inputs[ci]
        if x is None or c is None or x.shape is None or x.dtype is None:
            continue
        arr = _const(c)
        if arr is None or arr.size == 0 or c.dtype != x.dtype:
            continue
        if arr.ndim > len(x.shape) or any(d != 1 for d in arr.shape):
            continue  # could broadcast x to a larger shape
        if not np.all(arr == neutral):
            continue
        return x
    return None


def _perm(node: ir.Node, rank: int | None) -> list[int] | None:
    attr = node.attributes.get("perm")
    if attr is not None:
        return list(attr.as_ints())
    if rank is None:
        return None
    return list(range(rank))[::-1]


def _input_rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return len(value.shape)


class RemoveNoOpsPass(Pass):
    """Remove nodes that return their input unchanged: Identity, inference Dropout, Cast to the
    same type, Reshape/Expand to the same static shape, identity Transpose and inverse
    Transpose pairs, x+0 / x-0 / x*1 / x/1 with a constant that cannot broadcast.

    Safe because each rule needs proof (known dtypes, fully static shapes, constant shape
    operands), and a node whose output is a graph output is kept when its input cannot take
    over that name.
    """

    name = "remove-noops"
    Options = NoOpOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in all_nodes(model):
            if node.graph is None or not node.outputs:
                continue  # already removed by an earlier rewrite in this walk
            replacement = self._noop_input(node)
            if replacement is None:
                continue
            if replace_value(node, node.outputs[0], replacement):
                self.count(node.op_type.lower())
                modified = True
        return ir.passes.PassResult(model, modified)

    def _noop_input(self, node: ir.Node) -> ir.Value | None:
        o = self.options
        if node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
            return None
        x = node.inputs[0]
        op = node.op_type
        if op == "Identity" and o.identity:
            # Identity on sequences/optionals is fine too: same value.
            return x
        if op == "Dropout" and o.dropout:
            training = node.inputs[2] if len(node.inputs) > 2 else None
            if training is not None:
                t = _const(training)
                if t is None or bool(t.reshape(-1)[0]):
                    return None
            if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
                return None  # the mask is used
            return x
        if op == "Cast" and o.cast:
            to = node.attributes.get("to")
            if to is not None and x.dtype is not None and ir.DataType(to.as_int()) == x.dtype:
                return x
            return None
        if op == "CastLike" and o.cast and len(node.inputs) > 1 and node.inputs[1] is not None:
            if x.dtype is not None and x.dtype == node.inputs[1].dtype:
                return x
            return None
        if op == "Reshape" and o.reshape and len(node.inputs) > 1:
            src = _static_shape(x)
            target = _const(node.inputs[1])
            if src is None or target is None:
                return None
            allowzero = node.attributes.get("allowzero")
            az = allowzero is not None and allowzero.as_int() == 1
            t = [int(d) for d in target.reshape(-1)]
            if len(t) != len(src):
                return None
            resolved = []
            for i, d in enumerate(t):
                if d == 0 and not az:
                    d = src[i]
                resolved.append(d)
            if resolved.count(-1) == 1:
                known = math.prod(d for d in resolved if d != -1)
                if known == 0:
                    return None
                resolved[resolved.index(-1)] = math.prod(src) // known
            return x if tuple(resolved) == src else None
        if op == "Expand" and o.expand and len(node.inputs) > 1:
            src = _static_shape(x)
            target = _const(node.inputs[1])
            if src is None or target is None:
                return None
            b = _broadcast(src, [int(d) for d in target.reshape(-1)])
            return x if b is not None and b == src else None
        if op in ("Add", "Sub", "Mul", "Div") and o.arithmetic and len(node.inputs) == 2:
            return _neutral_operand_input(node)
        if op == "Transpose" and o.transpose:
            rank = _input_rank(x)
            perm = _perm(node, rank)
            if perm is not None and perm == sorted(perm) and (rank is None or len(perm) == rank):
                return x
            prev = x.producer()
            if perm is not None and prev is not None and _is_std(prev, "Transpose") and prev.inputs[0] is not None:
                first = _perm(prev, _input_rank(prev.inputs[0]))
                if first is not None and len(first) == len(perm):
                    composed = [first[p] for p in perm]
                    if composed == list(range(len(perm))):
                        return prev.inputs[0]
            return None
        return None


class SimplifyPass(Pass):
    """Apply onnxscript's shape-chain simplifications: collapse no-op Slices, merge
    Reshape/Reshape and Unsqueeze/Unsqueeze chains, materialise Reshape shapes known from
    inference, drop no-op ScatterND, fold Cast of ConstantOfShape.

    Safe because each onnxscript rule checks constants and static shapes before it fires.
    Rules that are not exact are left out on purpose: Cast∘Cast (double rounding) and
    x+0/x*1 (they ignore broadcasting, which can change the output shape).
    """

    name = "simplify"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.rewriter import pattern
        from onnxscript.rewriter.rules import common as rules

        from graphopt.passes.fusion.shapes import safe_reshape_reshape_rule

        ruleset = pattern.RewriteRuleSet(
            [
                rules.collapse_slice_rule,
                rules.collapse_slice2_rule,
                rules.materialize_reshape_shape_rule,
                # onnxscript's reshape_reshape_rule names its new shape "<output>/shape" and the
                # rewriter overwrites an initializer of that name; ours names it freshly.
                safe_reshape_reshape_rule(),
                rules.unsqueeze_unsqueeze_rule,
                rules.squeeze_reshape_1d_rule,
                rules.no_op_dynamic_scatter_nd_rule,
                rules.no_op_static_scatter_nd_rule,
                rules.cast_constant_of_shape_rule,
                rules.cast_constant_of_shape_without_value_rule,
            ]
        )
        def shape() -> tuple[int, int, int]:
            nodes = list(all_nodes(model))
            inits = sum(len(g.initializers) for g in model.graphs())
            return len(nodes), sum(len(n.inputs) for n in nodes), inits

        before = shape()
        count = ruleset.apply_to_model(model)
        if count:
            self.count("rewrites", count)
        # The rewriter also drops nodes and initializers left dead by earlier passes and trailing
        # empty optional inputs (Clip(x, "", "") → Clip(x)), even with no match.
        removed = before != shape()
        return ir.passes.PassResult(model, bool(count) or removed)


# ---------------------------------------------------------------------------------------------
# Wrappers around onnx_ir passes (typed options, documented safety, counted effects)


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


@dataclasses.dataclass
class CleanupOptions:
    max_iterations: int = 8
    fold: bool = True
    cse: bool = True


class CleanupPass(CompositePass):
    """Standard cleanup: shape inference, then fold/no-op/dead-code/CSE to a fixpoint, then
    lift constants, share duplicate weights and sort.
    """

    name = "cleanup"
    Options = CleanupOptions

    def pipeline(self) -> Pipeline:
        o = self.options
        inner = ["fold-constants"] if o.fold else []
        inner += ["remove-noops", "simplify", "remove-unused"]
        if o.cse:
            inner.append("cse")
        # Weights are lifted and shared before the fixpoint so CSE sees equal weights as equal;
        # folding can create new duplicates, hence the second dedup/CSE round.
        text = (
            "normalize-legacy-inputs,shape-inference,lift-constants,dedup-initializers,"
            f"fixpoint(max_iterations={o.max_iterations})[{','.join(inner)}],"
            "lift-constants,dedup-initializers," + ("cse," if o.cse else "") + "remove-unused,topological-sort"
        )
        return Pipeline.parse(text)

"""``fold-constants``: onnxscript's constant folder with graphopt's guards.

onnxscript's folder evaluates a node *before* checking the result's size, so a
``ConstantOfShape``/``Expand``/``Tile`` of gigabytes is materialised, and an evaluator error aborts
the whole pass. Here output sizes are estimated first, nodes whose evaluation fails are skipped,
integer arithmetic that could overflow is left alone, integer division or modulo by zero (no value
by the op's definition; ONNX Runtime refuses it) is never folded, results whose dtype/shape
disagree with the node's declared type are refused, and a rewrite whose new nodes the model's opset
does not have (onnxscript writes the newest forms) is not made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.optimizer import _constant_folding

from graphopt.pipeline import Pass

from ..ir_helpers import STANDARD_DOMAINS, all_nodes, is_standard, new_nodes_problem, static_shape
from ._values import broadcast as _broadcast
from ._values import const_value as _const

logger = logging.getLogger("graphopt.passes.cleanup")

__all__ = ["FoldConstantsPass", "FoldOptions", "estimate_output_elements"]

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

# Bytes per element assumed when an output's dtype is unknown (size estimates before folding).
_ITEMSIZE_GUESS = 8


def estimate_output_elements(node: ir.Node) -> int | None:
    """Upper estimate of the element count of a node's largest output, from constant inputs.

    Computed *without* evaluating the node, so that folding never materialises a huge tensor.
    None when unknown.
    """
    out = node.outputs[0] if node.outputs else None
    shape = static_shape(out)
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
                return int(
                    a.size
                    // max(a.shape[-1], 1)
                    * (b.shape[-1] if b.ndim else 1)
                    * max(1, b.size // max(b.shape[-1] * (b.shape[-2] if b.ndim > 1 else 1), 1))
                )  # type: ignore[union-attr]
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
        if node.domain not in STANDARD_DOMAINS:
            return False  # only standard ops have a trustworthy reference implementation
        if any(v is not None and v.is_graph_input() for v in node.inputs):
            return False
        if _may_overflow(node):
            self.owner.count("skipped_int_overflow")
            return False
        if _integer_division_by_zero(node):
            self.owner.count("skipped_undefined")
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
        # numpy gives integer results where the op has none (x // 0 is 0, with a warning): with
        # integer inputs, its floating-point errors raise, and the node is left alone below.
        strict = np.errstate(all="raise") if _integer_inputs(node) else contextlib.nullcontext()
        try:
            with strict:
                replacement = super().process_node(node, is_function)
        except Exception as e:  # an evaluator that cannot handle this node: leave it alone
            logger.debug("not folding %s (%s): %s", node.name, node.op_type, e)
            self.owner.count("skipped_error")
            return None
        if replacement is not None and replacement.new_nodes:
            # onnxscript's partial evaluators write the newest opset's forms (Constant(value_ints),
            # Split/Squeeze/Unsqueeze with sizes or axes as inputs) whatever the model's opset.
            problem = new_nodes_problem(replacement.new_nodes, self._opset_imports)
            if problem is not None:
                logger.debug("not rewriting %s (%s): %s", node.name, node.op_type, problem)
                self.owner.count("skipped_opset")
                return None
        return replacement

    def _prepare_folded_tensor(self, node: ir.Node, output_name: str, output_array: Any) -> ir.Tensor | None:
        if isinstance(output_array, np.ndarray) and output_array.dtype.kind in "OSU":
            # String results: ir.Tensor cannot serialize numpy string/object arrays (the model
            # could not be saved); the node stays, and ONNX Runtime computes it.
            self.owner.count("skipped_string")
            return None
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
            shape = static_shape(declared)
            if shape is not None and tuple(output_array.shape) != shape:
                self.owner.count("skipped_shape_mismatch")
                return None
            if output_array.nbytes > self.owner.options.max_fold_bytes:
                self.owner.count("skipped_too_large")
                return None
        if (
            isinstance(output_array, np.ndarray)
            and is_standard(node, "ConstantOfShape")
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


_INT_ARITH = {
    "Add",
    "Sub",
    "Mul",
    "Neg",
    "Abs",
    "Pow",
    "Div",
    "ReduceSum",
    "ReduceProd",
    "CumSum",
    "MatMul",
    "Gemm",
    "Sum",
    "ReduceSumSquare",
    "Einsum",
}


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


def _integer_inputs(node: ir.Node) -> bool:
    return any(v is not None and v.dtype is not None and v.dtype.is_integer() for v in node.inputs)


def _integer_division_by_zero(node: ir.Node) -> bool:
    """True for an integer Div/Mod whose constant divisor holds a zero: the op defines no result
    (numpy would give 0, ONNX Runtime refuses to run it)."""
    if node.op_type not in ("Div", "Mod") or len(node.inputs) < 2:
        return False
    divisor = _const(node.inputs[1])
    return divisor is not None and divisor.dtype.kind in "iu" and not bool(np.all(divisor))


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
        if use.node.domain not in STANDARD_DOMAINS or not slots or use.idx not in slots:
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

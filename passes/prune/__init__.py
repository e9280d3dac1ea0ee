"""Weight pruning: unstructured magnitude, N:M semi-structured, and structured pruning that shrinks the graph.

Three modes, one pass (``prune``):

* ``unstructured``: zero the smallest-magnitude weights of Conv / MatMul / Gemm weight initializers,
  per layer or with one global threshold. Embedding tables (Gather), normalization parameters,
  biases and tensors below ``min_size`` are never targets. The file keeps its dense layout, so
  ONNX Runtime's dense kernels run exactly as fast as before; only sparse storage
  (:func:`to_sparse_proto` / :func:`save_sparse`) makes the file smaller, and only above ~67 %
  sparsity (ONNX sparse tensors store int64 indices: 12 bytes per kept value vs 4 dense).
* ``N:M`` (``2:4`` ...): in every group of M consecutive weights along the reduction dimension,
  keep the N largest. MatMul ``W[K, N]``: groups along K per column; Gemm along K respecting
  ``transB``; Conv ``W[O, I, kh, kw]``: groups along I per (output channel, kh, kw), the layout
  TensorRT / cuSPARSELt use (KRSC with C innermost). :func:`satisfies_nm` checks the result.
* ``structured``: remove whole units and rewrite every dependent shape.
  - *channels / neurons*: a unit group starts at a producer (Conv output channels, MatMul / Gemm
    output columns) and follows the value through element-wise ops, per-channel BatchNorm /
    bias Adds, pooling, Transpose, flattening Reshape, residual Adds (both producers join the
    group), up to the consumers (next Conv / MatMul / Gemm input channels, rows). A group whose
    units reach anything else (a graph output, LayerNorm, Concat, Split, an op not listed) is
    left alone and the reason recorded. Groups made only of MatMul / Gemm are ``ffn`` (FFN
    neurons; a Llama gated MLP joins gate and up columns through the ``silu(gate) * up`` Mul,
    and down's rows); groups with a Conv are ``channels``.
  - *heads*: multi-head attention as exported from BERT / ViT / GPT-2 (Q/K/V projections, or
    one fused QKV projection + Split → Reshape [B, S, H, d] → Transpose, scores MatMul, softmax,
    context MatMul, Transpose → Reshape [B, S, H·d] → output projection MatMul / Gemm). Q/K/V
    columns (every section of a fused QKV weight), their biases and the output projection's rows
    are sliced per head; a literal head count in Reshape shapes (and Split sizes) is rewritten,
    run-time shapes adapt by themselves. Grouped-query attention, rotary chains (Llama) and any
    unrecognized node are skipped with the reason.

  Importance is the L1 or L2 norm of each unit's weights (producers' output slices and
  consumers' input slices, each normalized by its mean), or, with calibration data,
  ``mean|activation|`` of the unit at each consumer's input times the norm of the consumer's
  weights for that unit (Wanda-style).

Every rewrite writes new initializers (a weight shared with another node is copied, never changed
in place for structured pruning) and the report's details list every layer / group with its
decision.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import re
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from graphopt.errors import PipelineError
from graphopt.ir import SPARSE_STORAGE_KEY  # metadata: graphopt.save stores sparse weights
from graphopt.passes.ir_helpers import constant_array
from graphopt.pipeline import Pass

from .masks import global_prune, nm_axis, satisfies_nm, sparsity_of
from .masks import magnitude_mask as _magnitude_mask
from .masks import nm_prune as _nm_prune
from .masks import out_axis as _out_axis
from .masks import per_output_mask as _per_output_mask
from .sparse import save_sparse, to_sparse_proto

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

MODES = ("unstructured", "2:4", "structured")
TARGETS = ("channels", "ffn", "heads")
_FLOAT = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16})


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclasses.dataclass
class PruneOptions:
    sparsity: float = dataclasses.field(
        default=0.5, metadata=_doc("fraction of weights (unstructured) or units (structured) to remove, 0..1; "
                                   "N:M modes ignore it (their sparsity is 1 - N/M)"))
    mode: str = dataclasses.field(
        default="unstructured", metadata=_doc("unstructured | 2:4 | N:M (e.g. 1:4) | structured"))
    scope: Literal["layer", "global"] = dataclasses.field(
        default="layer", metadata=_doc("layer: each layer (unit group) loses `sparsity`; global: one threshold "
                                       "over all targets (structured: over mean-normalized unit scores)"))
    targets: list[str] = dataclasses.field(
        default_factory=lambda: list(TARGETS),
        metadata=_doc("structured unit kinds: channels (Conv), ffn (MatMul/Gemm neurons), heads (attention)"))
    importance: Literal["l1", "l2", "activation"] = dataclasses.field(
        default="l1", metadata=_doc("unit score: weight L1/L2 norm, or activation statistics (needs calibration)"))
    min_size: int = dataclasses.field(
        default=1024, metadata=_doc("weights with fewer elements are left dense (unstructured and N:M)"))
    exclude: list[str] = dataclasses.field(
        default_factory=list, metadata=_doc("node names, weight names, fnmatch patterns or op types to leave alone"))
    include: list[str] = dataclasses.field(
        default_factory=list, metadata=_doc("if given, prune only nodes/weights matching these"))
    round_to: int = dataclasses.field(
        default=1, metadata=_doc("structured: keep a multiple of this many units per group when possible"))
    sparse_storage: bool = dataclasses.field(
        default=False, metadata=_doc("graphopt.save then stores mostly-zero weights as ONNX sparse initializers"))
    calibration: str | None = dataclasses.field(
        default=None, metadata=_doc(".npz file or folder for importance=activation (or optimize(calibration=))"))
    calibration_batches: int = dataclasses.field(
        default=16, metadata=_doc("at most this many calibration batches for activation statistics"))


def parse_mode(mode: str) -> tuple[str, int, int]:
    """``("unstructured"|"nm"|"structured", n, m)``; a PipelineError for anything else."""
    text = str(mode).strip().lower()
    if text in ("unstructured", "structured"):
        return text, 0, 0
    m = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if 0 < n < mm <= 64:
            return "nm", n, mm
    raise PipelineError(
        f"prune mode {mode!r} is not valid; use unstructured, structured, or N:M with 0 < N < M (e.g. 2:4)")


# ---------------------------------------------------------------------------------------------
# Graph helpers


_const = constant_array  # an initializer's or Constant's value; never an overridable graph input's


def _matches(patterns: Iterable[str], node: ir.Node, weight_name: str | None) -> bool:
    names = [node.name or "", weight_name or ""]
    for p in patterns:
        if p == node.op_type or any(p == n or fnmatch.fnmatchcase(n, p) for n in names if n):
            return True
    return False


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else value.shape.rank()


def _dim(value: ir.Value, axis: int) -> Any:
    """Static int, SymbolicDim or None for ``value``'s dim at (negative) ``axis``."""
    if value.shape is None:
        return None
    r = value.shape.rank()
    if axis + r < 0:
        return 1  # broadcast: the value has no such axis
    return value.shape[axis]


class _Names:
    """Fresh, deterministic initializer/value names."""

    def __init__(self, graph: ir.Graph) -> None:
        self.taken: set[str] = set(graph.initializers)
        self.taken.update(v.name for v in graph.inputs if v.name)
        for n in ir.traversal.RecursiveGraphIterator(graph):
            self.taken.update(o.name for o in n.outputs if o.name)

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name


def _set_input_const(graph: ir.Graph, names: _Names, node: ir.Node, index: int, array: np.ndarray,
                     suffix: str) -> ir.Value:
    """Give ``node`` input ``index`` a new initializer (the old one may be shared; DCE drops it)."""
    old = node.inputs[index]
    base = (old.name if old is not None and old.name else f"{node.name or node.op_type}_{index}") + suffix
    value = ir.Value(name=names.fresh(base), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(np.ascontiguousarray(array)))
    value.const_value.name = value.name  # type: ignore[union-attr]
    graph.register_initializer(value)
    node.replace_input_with(index, value)
    return value


# ---------------------------------------------------------------------------------------------
# Structured groups


@dataclasses.dataclass
class _Slice:
    """A constant node input cut along ``axis``; unit ``u`` owns elements [u*block, (u+1)*block)."""

    node: ir.Node
    index: int
    axis: int
    block: int
    role: str  # "out" (producer weight), "in" (consumer weight), "param" (bias, BN, ...), "shape"
    data: ir.Value | None = None  # consumers: the activation feeding the weight
    data_axis: int = -1
    weight_name: str = ""
    #: Sections along the axis, each holding every unit (a fused QKV weight: 3 sections).
    groups: int = 1

    def __post_init__(self) -> None:
        if not self.weight_name:
            v = self.node.inputs[self.index]
            self.weight_name = (v.name or "") if v is not None else ""


@dataclasses.dataclass
class _Group:
    kind: str
    units: int
    slices: list[_Slice] = dataclasses.field(default_factory=list)
    values: dict[ir.Value, tuple[int, int]] = dataclasses.field(default_factory=dict)
    reason: str | None = None
    producers: list[ir.Node] = dataclasses.field(default_factory=list)
    #: Values whose shape must be re-inferred (heads: layouts too tangled to update by hand).
    clear: list[ir.Value] = dataclasses.field(default_factory=list)
    #: (node, input index, new array builder) for shape tensors that hold a unit count.
    shape_fixes: list[tuple[ir.Node, int, Any]] = dataclasses.field(default_factory=list)
    name: str = ""


_UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Erf", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish",
    "Softplus", "Softsign", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Sin", "Cos", "Floor", "Ceil",
    "Round", "Sign", "Identity", "Cast", "IsNaN", "IsInf", "Not", "Mish", "ThresholdedRelu", "Swish",
})
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "PRelu", "And", "Or", "Equal",
                     "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Mod"})
_LAYERS = frozenset({"Conv", "MatMul", "Gemm"})
_POOL = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
_REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceProd",
                     "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"})


def _producer_axes(node: ir.Node) -> tuple[int, int, int] | None:
    """(weight input index, weight output axis, activation output axis) of a prunable producer."""
    if node.domain not in ("", "ai.onnx"):
        return None
    w = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or node.inputs[1].dtype not in _FLOAT:  # type: ignore[union-attr]
        return None
    if node.op_type == "Conv" and w.ndim >= 3 and node.attributes.get_int("group", 1) == 1:
        return 1, 0, -(w.ndim - 1)
    if node.op_type == "MatMul" and w.ndim == 2 and _const(node.inputs[0]) is None:
        return 1, 1, -1
    if node.op_type == "Gemm" and w.ndim == 2 and _const(node.inputs[0]) is None:
        return 1, (0 if node.attributes.get_int("transB", 0) else 1), -1
    return None


class _Closure:
    """Collect every tensor slice that depends on one producer's output units (see module doc)."""

    def __init__(self, seed: ir.Node, units: int) -> None:
        self.group = _Group(kind="ffn", units=units, name=seed.name or seed.op_type)
        self.handled: set[tuple[int, str]] = set()
        self.work: list[tuple[ir.Value, int, int]] = []
        self._seed = seed

    def block(self, reason: str) -> None:
        if self.group.reason is None:
            self.group.reason = reason

    def run(self) -> _Group:
        self.producer(self._seed)
        steps = 0
        while self.work and self.group.reason is None:
            steps += 1
            if steps > 5000:
                self.block("unit group too large to analyse")
                break
            v, axis, block = self.work.pop()
            self.visit(v, axis, block)
        return self.group

    # --- values ---
    def push(self, v: ir.Value, axis: int, block: int) -> None:
        known = self.group.values.get(v)
        if known is not None:
            if known != (axis, block):
                self.block(f"value {v.name} reached with two unit layouts")
            return
        self.work.append((v, axis, block))
        self.group.values[v] = (axis, block)

    def visit(self, v: ir.Value, axis: int, block: int) -> None:
        if v.is_graph_output():
            self.block(f"units reach graph output {v.name}")
            return
        if v.is_graph_input():
            self.block(f"units come from graph input {v.name}")
            return
        full = self.group.units * block
        d = _dim(v, axis)
        if not isinstance(d, int) or d != full:
            self.block(f"value {v.name} has dim {d} at axis {axis}, expected {full}")
            return
        if v.const_value is not None or (v.producer() is None and not v.is_graph_input()):
            self.block(f"constant {v.name} reached through an op")
            return
        p = v.producer()
        if p is not None:
            if p.op_type in _LAYERS and p.domain in ("", "ai.onnx"):
                self.producer(p)
            elif (id(p), "node") not in self.handled:
                self.node(p, v)
        for u in v.uses():
            node = u.node
            if node.op_type in _LAYERS and node.domain in ("", "ai.onnx"):
                self.consumer(node, v, u.idx, axis, block)
            elif (id(node), "node") not in self.handled:
                self.node(node, v, u.idx)

    # --- nodes ---
    def producer(self, node: ir.Node) -> None:
        key = (id(node), "producer")
        if key in self.handled:
            return
        self.handled.add(key)
        axes = _producer_axes(node)
        if axes is None:
            self.block(f"{node.op_type} {node.name} is not a prunable producer")
            return
        widx, waxis, out_axis = axes
        if node.op_type == "Conv":
            self.group.kind = "channels"
        self.group.producers.append(node)
        self.group.slices.append(_Slice(node, widx, waxis, 1, "out", weight_name=node.inputs[widx].name or ""))
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            b = _const(node.inputs[2])
            if b is None:
                self.block(f"bias of {node.name} is not constant")
                return
            if node.op_type == "Gemm":
                if b.size == 1:
                    pass
                elif b.ndim >= 1 and b.shape[-1] == self.group.units:
                    self.group.slices.append(_Slice(node, 2, -1, 1, "param"))
                else:
                    self.block(f"Gemm bias {b.shape} of {node.name} is not per output column")
                    return
            else:
                self.group.slices.append(_Slice(node, 2, 0, 1, "param"))
        out = node.outputs[0]
        if node.op_type == "MatMul":
            r = _rank(out)
            if r is None:
                self.block(f"rank of {out.name} unknown")
                return
        self.push(out, out_axis, 1)

    def consumer(self, node: ir.Node, v: ir.Value, index: int, axis: int, block: int) -> None:
        key = (id(node), "consumer")
        if key in self.handled:
            return
        self.handled.add(key)
        if index != 0:
            self.block(f"units feed the weight input of {node.op_type} {node.name}")
            return
        axes = _producer_axes(node)
        if axes is None:
            self.block(f"{node.op_type} {node.name} with a non-constant or grouped weight consumes the units")
            return
        r = _rank(v)
        if node.op_type == "Conv":
            self.group.kind = "channels"
            if r is None or axis != 1 - r:
                self.block(f"units of {v.name} are not on the Conv channel axis")
                return
            self.group.slices.append(_Slice(node, 1, 1, block, "in", v, axis, node.inputs[1].name or ""))
        elif node.op_type == "MatMul":
            if axis != -1:
                self.block(f"units of {v.name} are not on the MatMul reduction axis")
                return
            self.group.slices.append(_Slice(node, 1, 0, block, "in", v, axis, node.inputs[1].name or ""))
        else:  # Gemm
            if node.attributes.get_int("transA", 0) or axis != -1 or r != 2:
                self.block(f"Gemm {node.name} reads the units transposed or not 2-D")
                return
            waxis = 1 if node.attributes.get_int("transB", 0) else 0
            self.group.slices.append(_Slice(node, 1, waxis, block, "in", v, axis, node.inputs[1].name or ""))

    def node(self, node: ir.Node, v: ir.Value, index: int | None = None) -> None:
        """``v`` (tracked) is ``node``'s output (index None) or its input ``index``."""
        axis, block = self.group.values[v]
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            self.block(f"{node.domain}::{op} {node.name} not understood")
            return
        self.handled.add((id(node), "node"))
        if op in _UNARY or op == "Dropout" or op == "Clip":
            self._unary(node, axis, block)
        elif op in _BINARY:
            self._binary(node, axis, block)
        elif op in ("BatchNormalization", "InstanceNormalization"):
            self._norm(node, axis, block)
        elif op in _POOL:
            self._pool(node, axis, block)
        elif op in _REDUCE and index == 0:
            self._reduce(node, axis, block)
        elif op == "Transpose":
            self._transpose(node, v, axis, block)
        elif op in ("Reshape", "Flatten") and index == 0:
            self._flatten(node, axis, block)
        else:
            where = "output" if index is None else f"input {index}"
            self.block(f"{op} {node.name} ({where}) not understood for unit pruning")

    def _unary(self, node: ir.Node, axis: int, block: int) -> None:
        if node.op_type == "Clip":
            for extra in node.inputs[1:]:
                if extra is not None and (_const(extra) is None or _const(extra).size != 1):  # type: ignore[union-attr]
                    self.block(f"Clip {node.name} bounds are not constant scalars")
                    return
        if node.op_type == "Dropout" and len(node.outputs) > 1 and node.outputs[1].uses():
            self.block(f"Dropout {node.name} mask is used")
            return
        if node.inputs[0] is None:
            self.block(f"{node.op_type} {node.name} has no input")
            return
        self.push(node.inputs[0], axis, block)
        self.push(node.outputs[0], axis, block)

    def _binary(self, node: ir.Node, axis: int, block: int) -> None:
        full = self.group.units * block
        for i, x in enumerate(node.inputs):
            if x is None:
                continue
            c = _const(x)
            if c is not None:
                if axis + c.ndim < 0 or c.shape[axis] == 1:
                    continue
                if c.shape[axis] == full:
                    self.group.slices.append(_Slice(node, i, axis, block, "param"))
                    continue
                self.block(f"constant {x.name} {c.shape} of {node.op_type} {node.name} does not match the units")
                return
            d = _dim(x, axis)
            if d == 1:
                continue
            if d is None:
                self.block(f"shape of {x.name} unknown")
                return
            self.push(x, axis, block)
        self.push(node.outputs[0], axis, block)

    def _norm(self, node: ir.Node, axis: int, block: int) -> None:
        x = node.inputs[0]
        r = _rank(x) if x is not None else None
        if r is None or axis != 1 - r or block != 1:
            self.block(f"{node.op_type} {node.name} does not normalize the unit axis per channel")
            return
        if node.op_type == "BatchNormalization":
            if node.attributes.get_int("training_mode", 0) or any(o.uses() for o in node.outputs[1:]):
                self.block(f"BatchNormalization {node.name} is in training mode")
                return
            params = node.inputs[1:5]
        else:
            params = node.inputs[1:3]
        for i, p in enumerate(params, start=1):
            c = _const(p)
            if c is None or c.shape != (self.group.units,):
                self.block(f"{node.op_type} {node.name} parameters are not constant per channel")
                return
            self.group.slices.append(_Slice(node, i, 0, 1, "param"))
        self.push(x, axis, block)  # type: ignore[arg-type]
        self.push(node.outputs[0], axis, block)

    def _pool(self, node: ir.Node, axis: int, block: int) -> None:
        x = node.inputs[0]
        r = _rank(x) if x is not None else None
        if r is None or axis != 1 - r or (len(node.outputs) > 1 and node.outputs[1].uses()):
            self.block(f"{node.op_type} {node.name}: units not on the channel axis or indices used")
            return
        self.push(x, axis, block)  # type: ignore[arg-type]
        self.push(node.outputs[0], axis, block)

    def _reduce(self, node: ir.Node, axis: int, block: int) -> None:
        x = node.inputs[0]
        r = _rank(x) if x is not None else None
        if r is None:
            self.block(f"rank of {node.op_type} {node.name} input unknown")
            return
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            axes_arr = _const(node.inputs[1])
            if axes_arr is None:
                self.block(f"{node.op_type} {node.name} axes not constant")
                return
            axes = [int(a) for a in axes_arr.ravel()]
        else:
            attr = node.attributes.get("axes")
            axes = list(attr.as_ints()) if attr is not None else []
        if not axes:
            self.block(f"{node.op_type} {node.name} reduces every axis")
            return
        axes = sorted({a % r for a in axes})
        p = axis + r
        if p in axes:
            self.block(f"{node.op_type} {node.name} reduces over the units")
            return
        keep = node.attributes.get_int("keepdims", 1)
        out_r = r if keep else r - len(axes)
        out_p = p if keep else p - sum(1 for a in axes if a < p)
        self.push(node.outputs[0], out_p - out_r, block)

    def _transpose(self, node: ir.Node, v: ir.Value, axis: int, block: int) -> None:
        x, y = node.inputs[0], node.outputs[0]
        r = _rank(x) if x is not None else None
        attr = node.attributes.get("perm")
        if r is None:
            self.block(f"rank of Transpose {node.name} unknown")
            return
        perm = list(attr.as_ints()) if attr is not None else list(range(r))[::-1]
        if v is x:
            self.push(y, perm.index(axis + r) - r, block)
        else:
            self.push(x, perm[axis + r] - r, block)  # type: ignore[arg-type]

    def _reshape_keep_last(self, node: ir.Node, x: ir.Value, y: ir.Value, block: int) -> None:
        """A Reshape that keeps the unit axis last and whole (``[B*S, C]`` ⇄ ``[B, S, C]``): rows
        map to rows, so only a literal ``C`` in the shape tensor changes."""
        full = self.group.units * block
        if y.shape.rank() < 1 or y.shape[-1] != full:
            self.block(f"Reshape {node.name} does not keep the units whole on the last axis")
            return
        pieces = _shape_pieces(node.inputs[1]) if node.inputs[1] is not None else None
        if pieces is None:
            self.block(f"Reshape {node.name} shape is computed in a way not understood")
            return
        total = sum(n for n, _ in pieces)
        _, _, last = _element(pieces, total - 1)
        consts = [int(a) for _, arr in pieces if arr is not None for a in arr]
        if last == full:
            self.group.shape_fixes.append((node, 1, ("last", block)))
        elif last == -1 and consts.count(-1) == 1:
            pass
        elif last == 0 and not node.attributes.get_int("allowzero", 0) and total == x.shape.rank():
            pass
        else:
            self.block(f"Reshape {node.name} last shape element {last} not understood")
            return
        self.push(y, -1, block)

    def _flatten(self, node: ir.Node, axis: int, block: int) -> None:
        """Flatten / Reshape that merges the unit axis with the static axes after it into the last axis."""
        x, y = node.inputs[0], node.outputs[0]
        if x is None or x.shape is None or y.shape is None:
            self.block(f"{node.op_type} {node.name} shapes unknown")
            return
        r = x.shape.rank()
        p = axis + r
        if p == r - 1 and node.op_type == "Reshape":
            self._reshape_keep_last(node, x, y, block)
            return
        tail = [x.shape[i] for i in range(p + 1, r)]
        if not all(isinstance(t, int) for t in tail):
            self.block(f"{node.op_type} {node.name}: axes after the units are not static")
            return
        inner = int(np.prod(tail)) if tail else 1
        new_block = block * inner
        full = self.group.units * new_block
        if y.shape.rank() != p + 1 or y.shape[-1] != full:
            self.block(f"{node.op_type} {node.name} does not flatten the units into the last axis")
            return
        if node.op_type == "Flatten":
            if node.attributes.get_int("axis", 1) != p:
                self.block(f"Flatten {node.name} axis is not the unit axis")
                return
        else:
            shape = _const(node.inputs[1])
            if shape is None or shape.ndim != 1 or shape.size != p + 1:
                self.block(f"Reshape {node.name} shape is not a constant of rank {p + 1}")
                return
            head = [int(s) for s in shape[:-1]]
            last = int(shape[-1])
            if last == full and -1 in head:
                self.group.shape_fixes.append((node, 1, ("last", new_block)))
            elif last == -1 and all(h >= 0 for h in head):
                pass
            else:
                self.block(f"Reshape {node.name} shape {shape.tolist()} not understood")
                return
        self.push(y, -1, new_block)


# --- attention heads ---------------------------------------------------------------------------


def _single_consumer(v: ir.Value, allow_shape: bool = True) -> ir.Node | None:
    users = [u.node for u in v.uses() if not (allow_shape and u.node.op_type == "Shape")]
    return users[0] if len(users) == 1 and not v.is_graph_output() else None


def _projection(v: ir.Value) -> tuple[ir.Node, ir.Node | None, int] | None:
    """``v = MatMul(x, W) [+ b]`` with constant 2-D W and 1-D b: (matmul, add or None, bias input index)."""
    p = v.producer()
    add = None
    bias_index = -1
    if p is not None and p.op_type == "Add":
        for i in (0, 1):
            b = _const(p.inputs[i])
            if b is not None and b.ndim == 1:
                other = p.inputs[1 - i]
                mm = other.producer() if other is not None else None
                if mm is not None and mm.op_type == "MatMul" and _single_consumer(other, False) is p:
                    add, bias_index, p = p, i, mm
                    break
        else:
            return None
    if p is not None and p.op_type == "Gemm" and add is None:
        if p.attributes.get_int("transA", 0):
            return None
        b = _const(p.inputs[2]) if len(p.inputs) > 2 and p.inputs[2] is not None else None
        if len(p.inputs) > 2 and p.inputs[2] is not None and (b is None or b.ndim != 1):
            return None
        w = _const(p.inputs[1])
        if w is None or w.ndim != 2:
            return None
        return p, (p if b is not None else None), 2
    if p is None or p.op_type != "MatMul":
        return None
    w = _const(p.inputs[1])
    if w is None or w.ndim != 2 or _const(p.inputs[0]) is not None:
        return None
    return p, add, bias_index


def _column_axis(node: ir.Node) -> int:
    """Axis of a projection weight that holds its output columns."""
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return 1


def _row_axis(node: ir.Node) -> int:
    if node.op_type == "Gemm":
        return 1 if node.attributes.get_int("transB", 0) else 0
    return 0


def _shape_pieces(v: ir.Value) -> list[tuple[int, Any]] | None:
    """A 1-D shape tensor as (length, constant array or None) pieces (Concat of constants/dynamic parts)."""
    c = _const(v)
    if c is not None:
        return [(int(c.size), c.astype(np.int64).ravel())]
    p = v.producer()
    if p is None or p.op_type != "Concat":
        return None
    pieces = []
    for x in p.inputs:
        if x is None:
            return None
        cx = _const(x)
        if cx is not None:
            pieces.append((int(cx.size), cx.astype(np.int64).ravel()))
        elif x.shape is not None and x.shape.rank() == 1 and isinstance(x.shape[0], int):
            pieces.append((int(x.shape[0]), None))
        else:
            return None
    return pieces


def _element(pieces: list[tuple[int, Any]], pos: int) -> tuple[int, int, Any]:
    """(piece index, offset in piece, constant value or None) of shape element ``pos``."""
    start = 0
    for k, (n, arr) in enumerate(pieces):
        if pos < start + n:
            return k, pos - start, None if arr is None else int(arr[pos - start])
        start += n
    raise IndexError(pos)


class _HeadMatcher:
    """BERT-style multi-head attention around one output projection (see module doc)."""

    def __init__(self, out_proj: ir.Node) -> None:
        self.o = out_proj
        self.reason: str | None = None
        #: Run-time Reshapes inside Q/K/V paths whose shape holds the head count literally.
        self.literal_fixes: list[ir.Node] = []

    def fail(self, reason: str) -> None:
        self.reason = reason

    def match(self) -> _Group | None:
        o = self.o
        x = o.inputs[0]
        merge = x.producer() if x is not None else None
        if merge is None or merge.op_type != "Reshape" or _single_consumer(x) is not o:
            return None
        t = merge.inputs[0].producer() if merge.inputs[0] is not None else None
        if t is None or t.op_type != "Transpose" or list(t.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
            return None
        ctx = t.inputs[0].producer() if t.inputs[0] is not None else None
        if ctx is None or ctx.op_type != "MatMul" or any(_const(i) is not None for i in ctx.inputs):
            return None
        # From here on it looks like attention: every failure is recorded.
        probs, v4 = ctx.inputs
        h_out = _dim(ctx.outputs[0], -3)
        d = _dim(ctx.outputs[0], -1)
        if not isinstance(h_out, int) or not isinstance(d, int):
            return self.fail("head count or head size not static")
        wo = _const(o.inputs[1])
        rows = wo.shape[_row_axis(o)]  # type: ignore[union-attr]
        if rows != h_out * d:
            return self.fail(f"output projection rows {rows} != heads*head_size {h_out}*{d}")
        if o.op_type == "Gemm" and o.attributes.get_int("transA", 0):
            return self.fail("output projection Gemm has transA")
        chain: list[ir.Node] = [o, merge, t, ctx]
        # Scores: back from the probabilities through element-wise ops to the Q·K MatMul.
        qk = None
        frontier = [probs]
        seen: set[int] = set()
        while frontier:
            val = frontier.pop()
            node = val.producer()
            if node is None or id(node) in seen:
                if node is None:
                    return self.fail(f"scores come from a graph input {val.name}")
                continue
            seen.add(id(node))
            if len(seen) > 24:
                return self.fail("score chain too long")
            if node.op_type == "MatMul" and all(_const(i) is None for i in node.inputs):
                if qk is not None and qk is not node:
                    return self.fail("two score MatMuls")
                qk = node
                chain.append(node)
                continue
            if node.op_type not in (_UNARY | _BINARY | {"Softmax", "Dropout"}):
                return self.fail(f"{node.op_type} {node.name} in the score chain")
            if node.op_type == "Softmax" and node.attributes.get_int("axis", -1) not in (-1, 3):
                return self.fail("softmax not over the keys")
            chain.append(node)
            for i in node.inputs:
                if i is None or _const(i) is not None and _const(i).size == 1:  # type: ignore[union-attr]
                    continue
                hd = _dim(i, -3)
                if hd == 1:
                    continue  # mask / bias broadcast over heads
                if hd != h_out:
                    return self.fail(f"{i.name} in the score chain has head dim {hd}")
                frontier.append(i)
        if qk is None:
            return self.fail("no Q·K MatMul")
        paths = {}
        for role, val in (("q", qk.inputs[0]), ("k", qk.inputs[1]), ("v", v4)):
            got = self._split_path(val, h_out, d, chain)
            if got is None:
                return None
            paths[role] = got
        # Every node in the chain may feed only chain nodes (and Shape reads, which adapt).
        members = {id(n) for n in chain}
        for n in chain:
            if n is o:
                continue
            for out in n.outputs:
                if out.is_graph_output():
                    return self.fail(f"{out.name} is a graph output")
                for u in out.uses():
                    if id(u.node) not in members and u.node.op_type != "Shape":
                        return self.fail(f"{out.name} also feeds {u.node.op_type} {u.node.name}")
        g = _Group(kind="heads", units=h_out, name=o.name or "attention")
        fused = [paths[r][4] for r in ("q", "k", "v")]
        if any(f is not None for f in fused):
            # One QKV projection split into sections (GPT-2): every section loses the same heads.
            if any(f is None for f in fused) or len({id(f["proj"]) for f in fused}) != 1 \
                    or sorted(f["index"] for f in fused) != list(range(fused[0]["sections"])):
                return self.fail("Q/K/V come partly from one fused projection and partly not")
            f = fused[0]
            mm, add, bias_index = f["proj"], f["add"], f["bias_index"]
            sections = f["sections"]
            g.slices.append(_Slice(mm, 1, _column_axis(mm), d, "out", weight_name=mm.inputs[1].name or "",
                                   groups=sections))
            if add is not None:
                g.slices.append(_Slice(add, bias_index, 0 if add is not mm else -1, d, "param", groups=sections))
            g.producers.append(mm)
            for n, fix in f["fixes"]:
                g.shape_fixes.append((n, 1, fix))
            g.clear.extend(f["values"])
            if f["split_sizes"] is not None:
                g.shape_fixes.append((f["split"], 1, ("split", d)))
            for role in ("q", "k", "v"):
                g.shape_fixes.append((paths[role][3], 1, ("heads", 2)))
        else:
            for role in ("q", "k", "v"):
                mm, add, bias_index, split, _ = paths[role]
                g.slices.append(_Slice(mm, 1, _column_axis(mm), d, "out", weight_name=mm.inputs[1].name or ""))
                if add is not None:
                    g.slices.append(_Slice(add, bias_index, 0 if add is not mm else -1, d, "param"))
                g.producers.append(mm)
                g.shape_fixes.append((split, 1, ("heads", 2)))
        g.slices.append(_Slice(o, 1, _row_axis(o), d, "in", x, -1, o.inputs[1].name or ""))
        g.shape_fixes.append((merge, 1, ("merge", d)))
        for n in self.literal_fixes:
            g.shape_fixes.append((n, 1, ("literal_heads", 0)))
        for n in chain:
            if n is not o:
                g.clear.extend(n.outputs)
        for role in ("q", "k", "v"):
            mm, add, _, _, _ = paths[role]
            g.clear.append(mm.outputs[0])
            if add is not None:
                g.clear.append(add.outputs[0])
        pieces = _shape_pieces(merge.inputs[1])
        if pieces is None or len(pieces) == 0:
            return self.fail("merge Reshape shape not readable")
        try:
            _, _, last = _element(pieces, sum(n for n, _ in pieces) - 1)
        except IndexError:
            return self.fail("merge Reshape shape empty")
        if last not in (-1, h_out * d):
            return self.fail(f"merge Reshape last dim {last} not understood")
        return g

    def _fused(self, section: ir.Value, h: int, d: int) -> dict[str, Any] | None:
        """``section`` is one output of ``Split(last axis)`` of a fused QKV projection, possibly
        through a row-preserving Reshape (``[B*S, 3E]`` → ``[B, S, 3E]``)."""
        split = section.producer()
        x = split.inputs[0]  # type: ignore[union-attr]
        if x is None or x.shape is None:
            return self.fail("fused QKV Split input shape unknown")
        r = x.shape.rank()
        axis = split.attributes.get_int("axis", 0)  # type: ignore[union-attr]
        if axis % r != r - 1:
            return self.fail("fused QKV Split not on the last axis")
        sections = len(split.outputs)  # type: ignore[union-attr]
        sizes = _const(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None  # type: ignore[union-attr]
        if len(split.inputs) > 1 and split.inputs[1] is not None and sizes is None:  # type: ignore[union-attr]
            return self.fail("fused QKV Split sizes not constant")
        if sizes is not None and any(int(v) != h * d for v in sizes.ravel()):
            return self.fail(f"fused QKV Split sizes {sizes.tolist()} are not {h}*{d} each")
        fixes: list[tuple[ir.Node, tuple[str, int]]] = []
        values = [x]
        src = x
        p = x.producer()
        if p is not None and p.op_type == "Reshape":
            y_last, in_v = x.shape[-1], p.inputs[0]
            if in_v is None or in_v.shape is None or in_v.shape[-1] != y_last or y_last != sections * h * d:
                return self.fail(f"Reshape {p.name} before the fused QKV Split does not keep rows")
            pieces = _shape_pieces(p.inputs[1]) if p.inputs[1] is not None else None
            if pieces is None:
                return self.fail(f"Reshape {p.name} shape not readable")
            _, _, last = _element(pieces, sum(n for n, _ in pieces) - 1)
            if last not in (-1, sections * h * d):
                return self.fail(f"Reshape {p.name} last shape element {last} not understood")
            if _single_consumer(in_v, False) is not p or _single_consumer(x, False) is not split:
                return self.fail("fused QKV projection output has other users")
            fixes.append((p, ("last", sections * d)))
            values.append(in_v)
            src = in_v
        proj = _projection(src)
        if proj is None:
            return self.fail("fused QKV Split does not read a projection")
        mm, add, bias_index = proj
        if _single_consumer(src, False) is None:
            return self.fail("fused QKV projection output has other users")
        return {"proj": mm, "add": add, "bias_index": bias_index, "sections": sections,
                "index": list(split.outputs).index(section), "split": split,  # type: ignore[union-attr]
                "split_sizes": sizes, "fixes": fixes, "values": values + list(split.outputs)}  # type: ignore[union-attr]

    def _split_path(self, val: ir.Value, h: int, d: int, chain: list[ir.Node]):
        """Back from a Q/K/V operand to its projection through scalar scaling, Transpose and
        run-time Reshapes; returns (matmul, add, bias index, split Reshape)."""
        for _ in range(12):
            node = val.producer()
            if node is None:
                return self.fail(f"{val.name} comes from a graph input")
            if node.op_type in ("Mul", "Div"):
                c = [_const(i) for i in node.inputs]
                if node.op_type == "Mul" and c[0] is not None and c[0].size == 1 and c[1] is None:
                    nxt = node.inputs[1]
                elif c[1] is not None and c[1].size == 1 and c[0] is None:
                    nxt = node.inputs[0]
                else:
                    return self.fail(f"{node.op_type} {node.name} on a Q/K/V path is not a scalar scale")
                chain.append(node)
                val = nxt  # type: ignore[assignment]
                continue
            if node.op_type == "Transpose":
                chain.append(node)
                val = node.inputs[0]  # type: ignore[assignment]
                continue
            if node.op_type == "Reshape":
                src = node.inputs[0]
                proj = _projection(src) if src is not None else None
                fused = None
                if proj is None and src is not None and src.producer() is not None \
                        and src.producer().op_type == "Split":
                    fused = self._fused(src, h, d)
                    if fused is None:
                        return None
                    proj = (fused["proj"], fused["add"], fused["bias_index"])
                if proj is not None:
                    mm, add, bias_index = proj
                    w = _const(mm.inputs[1])
                    cols = w.shape[_column_axis(mm)]  # type: ignore[union-attr]
                    if cols != h * d * (fused["sections"] if fused else 1):
                        return self.fail(f"projection {mm.name} has {cols} columns, not {h}*{d} "
                                         "(grouped-query attention)")
                    y = node.outputs[0]
                    if y.shape is None or y.shape.rank() != 4 or y.shape[2] != h or y.shape[3] != d:
                        return self.fail(f"split Reshape {node.name} output {y.shape} is not [B, S, {h}, {d}]")
                    pieces = _shape_pieces(node.inputs[1])
                    if pieces is None:
                        return self.fail(f"split Reshape {node.name} shape not readable")
                    _, _, hv = _element(pieces, 2)
                    _, _, dv = _element(pieces, 3)
                    if hv not in (-1, h) or dv != d:
                        return self.fail(f"split Reshape {node.name} shape elements ({hv}, {dv}) not understood")
                    nxt_users = [u.node for u in node.outputs[0].uses()]
                    if len(nxt_users) != 1 or nxt_users[0].op_type != "Transpose":
                        return self.fail(f"split Reshape {node.name} not followed by one Transpose")
                    perm = list(nxt_users[0].attributes.get_ints("perm", []))
                    if perm not in ([0, 2, 1, 3], [0, 2, 3, 1]):
                        return self.fail(f"head Transpose perm {perm} not understood")
                    if fused is None:
                        for n in (mm, add):
                            if n is not None and _single_consumer(n.outputs[0], False) is None:
                                return self.fail(f"projection output {n.outputs[0].name} has other users")
                    chain.append(node)
                    return mm, add, bias_index, node, fused
                # A run-time reshape inside the path (e.g. K transposed via [B*H, S, d]).
                pieces = _shape_pieces(node.inputs[1])
                if pieces is None:
                    return self.fail(f"Reshape {node.name} shape not readable")
                literal = False
                out_shape = node.outputs[0].shape
                static = [x for x in (out_shape.dims if out_shape is not None else ()) if isinstance(x, int)]
                allowed = {-1, 0, 1, d, *static} - {h}
                for _, arr in pieces:
                    if arr is None:
                        continue
                    for a in arr:
                        if int(a) == h and h not in (d, 1) and static.count(h) <= 1:
                            literal = True
                        elif int(a) not in allowed:
                            return self.fail(f"Reshape {node.name} has literal dims {arr.tolist()} not understood")
                if d == h:
                    return self.fail("head size equals head count: literal dims are ambiguous")
                if literal:
                    self.literal_fixes.append(node)
                chain.append(node)
                val = src  # type: ignore[assignment]
                continue
            return self.fail(f"{node.op_type} {node.name} on a Q/K/V path (rotary, grouped-query or fused QKV)")
        return self.fail("Q/K/V path too long")


# ---------------------------------------------------------------------------------------------
# The pass


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

    # --- selection ---
    def _selected(self, node: ir.Node, weight_name: str | None) -> str | None:
        o = self.options
        if o.include and not _matches(o.include, node, weight_name):
            return "not in include"
        if o.exclude and _matches(o.exclude, node, weight_name):
            return "excluded"
        return None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.details["mode"] = self.options.mode
        if self.kind == "structured":
            modified = self._structured(model)
        else:
            modified = self._zeroing(model)
        if self.options.sparse_storage:
            model.metadata_props[SPARSE_STORAGE_KEY] = "1"
            modified = True
        return ir.passes.PassResult(model, modified)

    # --- unstructured and N:M -----------------------------------------------------------------
    def _weight_targets(self, model: ir.Model) -> list[tuple[ir.Value, list[ir.Node], int | None, str | None]]:
        """(weight value, nodes using it, N:M axis, skip reason) per distinct weight, graph order."""
        graph = model.graph
        by_weight: dict[ir.Value, list[ir.Node]] = {}
        order: list[ir.Value] = []
        axes: dict[ir.Value, int | None] = {}
        reasons: dict[ir.Value, str | None] = {}
        for node in graph:
            if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "MatMul", "Gemm"):
                continue
            if len(node.inputs) < 2 or node.inputs[1] is None:
                continue
            w = node.inputs[1]
            if w.const_value is None:
                continue  # activations (attention scores), not weights
            if w not in by_weight:
                by_weight[w] = []
                order.append(w)
            by_weight[w].append(node)
            arr_shape = w.shape
            rank = arr_shape.rank() if arr_shape is not None else 0
            axis = nm_axis(node.op_type, rank, {"transB": node.attributes.get_int("transB", 0)})
            reason = None
            if w.dtype not in _FLOAT:
                reason = f"weight dtype {w.dtype} not float"
            elif node.op_type == "MatMul" and rank < 2:
                reason = "MatMul weight rank < 2"
            elif (sel := self._selected(node, w.name)) is not None:
                reason = sel
            elif w.const_value.size < self.options.min_size:
                reason = f"smaller than min_size={self.options.min_size}"
            prev = reasons.get(w)
            if w in axes and axes[w] != axis:
                reason = reason or "weight shared by layers with different reduction axes"
            axes[w] = axis
            reasons[w] = prev or reason
        for w in order:
            if reasons[w] is None:
                for u in w.uses():
                    if u.node.op_type not in ("Conv", "MatMul", "Gemm") or u.idx != 1:
                        reasons[w] = f"weight also used by {u.node.op_type} {u.node.name} (embedding/tied)"
                        break
                if w.is_graph_output():
                    reasons[w] = "weight is a graph output"
        return [(w, by_weight[w], axes[w], reasons[w]) for w in order]

    def _zeroing(self, model: ir.Model) -> bool:
        o = self.options
        targets = self._weight_targets(model)
        layers: list[dict[str, Any]] = []
        arrays: dict[ir.Value, np.ndarray] = {}
        for w, _nodes, _axis, reason in targets:
            if reason is None:
                arrays[w] = w.const_value.numpy()  # type: ignore[union-attr]
        new: dict[ir.Value, np.ndarray] = {}
        nm_reason: dict[ir.Value, str] = {}
        scores: dict[ir.Value, np.ndarray] = {}
        if o.importance == "activation":
            scores = self._weight_activation_scores(model, targets, arrays)
        if self.kind == "nm":
            for w, _nodes, axis, _reason in targets:
                if w not in arrays:
                    continue
                a = arrays[w]
                if axis is None or a.shape[axis] % self.m:
                    nm_reason[w] = f"reduction dim {a.shape[axis] if axis is not None else '?'} not a multiple of {self.m}"
                    continue
                new[w] = _nm_prune(a, self.n, self.m, axis, scores.get(w))
        elif o.scope == "global" and arrays:
            new = global_prune(arrays, scores, o.sparsity)
        else:
            out_axes = {w: _out_axis(nodes[0].op_type, a.ndim, nodes[0].attributes.get_int("transB", 0))
                        for w, nodes, _, _ in targets if (a := arrays.get(w)) is not None}
            for w, a in arrays.items():
                if w in scores:
                    new[w] = np.where(_per_output_mask(scores[w], out_axes[w], o.sparsity), 0, a).astype(a.dtype)
                    continue
                k = int(np.floor(o.sparsity * a.size))
                new[w] = np.where(_magnitude_mask(a, k), 0, a).astype(a.dtype)
        modified = False
        total_pruned = zeros = 0
        for w, nodes, axis, reason in targets:
            entry: dict[str, Any] = {"weight": w.name, "nodes": [n.name for n in nodes],
                                     "op_type": nodes[0].op_type,
                                     "shape": [d if isinstance(d, int) else str(d) for d in w.shape] if w.shape is not None else None}
            a = arrays.get(w)
            if a is not None:
                entry["sparsity_before"] = round(sparsity_of(a), 6)
                if self.kind == "nm" and axis is not None and a.shape[axis] % self.m == 0:
                    entry["already_nm"] = satisfies_nm(a, self.n, self.m, axis)
            reason = reason or nm_reason.get(w)
            if reason is not None or w not in new:
                entry.update(pruned=False, reason=reason or "nothing to prune")
                self.count(f"skipped:{(reason or 'nothing').split('=')[0].split(' (')[0]}")
                layers.append(entry)
                continue
            b = new[w]
            changed = not np.array_equal(a, b)
            if changed:
                w.const_value = ir.tensor(b, name=w.name)
                modified = True
            entry.update(pruned=True, sparsity=round(sparsity_of(b), 6))
            if self.kind == "nm":
                entry["nm_axis"] = axis
            total_pruned += b.size
            zeros += int((b == 0).sum())
            self.count("pruned_weights")
            layers.append(entry)
        self.count("zeroed", zeros)
        self.details["layers"] = layers
        self.details["pruned_sparsity"] = round(zeros / total_pruned, 6) if total_pruned else 0.0
        return modified

    def _calibration(self) -> Any:
        from graphopt.calibration import CalibrationData

        o = self.options
        source = o.calibration if o.calibration is not None else self.context.get("calibration")
        if source is None:
            raise PipelineError("prune importance=activation needs calibration data: pass calibration= to "
                                "optimize() or the prune option calibration=PATH")
        data = CalibrationData.from_any(source)
        if getattr(data, "_single_use", False):
            data = data.materialize()
            self.context["calibration"] = data
        return data

    def _weight_activation_scores(self, model: ir.Model, targets: list, arrays: dict) -> dict[ir.Value, np.ndarray]:
        """Wanda scores ``|W| · ‖x_j‖₂``: each weight times the L2 norm (over the calibration data) of
        the input feature it multiplies. Weights whose input layout is not understood keep |W|."""
        from graphopt.calibration import stream_tensors

        wanted: dict[str, int] = {}  # activation name -> feature axis
        uses: dict[ir.Value, list[tuple[str, int]]] = {}  # weight -> (activation, weight feature axis)
        for w, nodes, _axis, _reason in targets:
            if w not in arrays:
                continue
            entries = []
            for node in nodes:
                x = node.inputs[0]
                if x is None or not x.name or x.shape is None:
                    entries = []
                    break
                if node.op_type == "Conv":
                    feat, waxis = 1, 1
                elif node.op_type == "Gemm" and not node.attributes.get_int("transA", 0):
                    feat, waxis = x.shape.rank() - 1, (1 if node.attributes.get_int("transB", 0) else 0)
                elif node.op_type == "MatMul":
                    feat, waxis = x.shape.rank() - 1, arrays[w].ndim - 2
                else:
                    entries = []
                    break
                wanted[x.name] = feat
                entries.append((x.name, waxis))
            if entries:
                uses[w] = entries
        if not uses:
            return {}
        names = sorted(wanted)
        sq: dict[str, np.ndarray] = {}
        for batch in stream_tensors(model, names, self._calibration(), limit=self.options.calibration_batches,
                                    description="prune stats"):
            for name in names:
                a = np.asarray(batch[name], dtype=np.float64)
                moved = np.moveaxis(a, wanted[name], 0).reshape(a.shape[wanted[name]], -1)
                sq[name] = sq.get(name, 0) + (moved * moved).sum(axis=1)
        scores = {}
        for w, entries in uses.items():
            a = arrays[w]
            waxis = entries[0][1]
            norm = np.sqrt(sum(sq[name] for name, _ in entries if name in sq))
            if np.ndim(norm) == 0 or norm.shape[0] != a.shape[waxis]:
                continue
            shape = [1] * a.ndim
            shape[waxis] = a.shape[waxis]
            scores[w] = np.abs(a).astype(np.float64) * norm.reshape(shape)
        return scores

    # --- structured ---------------------------------------------------------------------------
    def _groups(self, model: ir.Model) -> tuple[list[_Group], list[dict[str, Any]]]:
        from graphopt.passes.ir_helpers import infer_shapes

        infer_shapes(model)
        graph = model.graph
        targets = set(self.options.targets)
        groups: list[_Group] = []
        skipped: list[dict[str, Any]] = []
        covered: set[int] = set()
        if "heads" in targets:
            for node in list(graph):
                if node.op_type not in ("MatMul", "Gemm") or _producer_axes(node) is None:
                    continue
                hm = _HeadMatcher(node)
                g = hm.match()
                if g is None:
                    if hm.reason is not None:
                        skipped.append({"kind": "heads", "group": node.name, "reason": hm.reason})
                        self.count("skipped:heads")
                    continue
                why = self._selected(node, node.inputs[1].name) or next(
                    (self._selected(p, p.inputs[1].name) for p in g.producers
                     if self._selected(p, p.inputs[1].name)), None)
                if why:
                    skipped.append({"kind": "heads", "group": g.name, "reason": why})
                    continue
                if g.units < 2:
                    skipped.append({"kind": "heads", "group": g.name, "reason": "a single head"})
                    continue
                groups.append(g)
                for p in g.producers:
                    covered.add(id(p))
        if targets & {"channels", "ffn"}:
            for node in list(graph):
                if id(node) in covered or node.op_type not in ("Conv", "MatMul", "Gemm"):
                    continue
                axes = _producer_axes(node)
                if axes is None:
                    continue
                w = _const(node.inputs[1])
                units = int(w.shape[axes[1]])  # type: ignore[union-attr]
                g = _Closure(node, units).run()
                for p in g.producers:
                    covered.add(id(p))
                name = ",".join(p.name or p.op_type for p in g.producers)
                if g.reason is None and not any(s.role == "in" for s in g.slices):
                    g.reason = "units have no consumer layer"
                if g.reason is None and g.kind not in targets:
                    g.reason = f"{g.kind} not in targets"
                if g.reason is None:
                    for s in g.slices:
                        if s.role in ("out", "in") and (why := self._selected(s.node, s.weight_name)):
                            g.reason = f"{s.node.name}: {why}"
                            break
                if g.reason is None and units < 2:
                    g.reason = "a single unit"
                if g.reason is not None:
                    skipped.append({"kind": g.kind, "group": name, "reason": g.reason})
                    self.count(f"skipped:{g.kind}")
                    continue
                g.name = name
                groups.append(g)
        return groups, skipped

    def _scores(self, model: ir.Model, groups: list[_Group]) -> list[np.ndarray]:
        o = self.options
        scores: list[np.ndarray] = []
        acts: dict[ir.Value, np.ndarray] = {}
        if o.importance == "activation":
            acts = self._activation_stats(model, groups)
        for g in groups:
            total = np.zeros(g.units, dtype=np.float64)
            # A BatchNormalization right after a producer rescales its output channels: weigh the
            # producer's norms by |γ|/√(σ²+ε), the scale the next layer actually sees.
            bn_scale: dict[int, np.ndarray] = {}
            for s in g.slices:
                if s.node.op_type == "BatchNormalization" and s.index == 1:
                    bn = s.node
                    gamma, var = _const(bn.inputs[1]), _const(bn.inputs[4])
                    src = bn.inputs[0].producer() if bn.inputs[0] is not None else None
                    if gamma is not None and var is not None and src is not None:
                        eps = bn.attributes.get_float("epsilon", 1e-5)
                        bn_scale[id(src)] = np.abs(gamma.astype(np.float64)) / np.sqrt(var.astype(np.float64) + eps)
            for s in g.slices:
                if s.role not in ("out", "in"):
                    continue
                w = _const(s.node.inputs[s.index]).astype(np.float64)  # type: ignore[union-attr]
                per = np.moveaxis(w, s.axis, 0).reshape(s.groups, g.units, -1).transpose(1, 0, 2).reshape(g.units, -1)
                if o.importance == "l1":
                    norm = np.abs(per).sum(axis=1)
                else:
                    norm = np.sqrt((per * per).sum(axis=1))
                if s.role == "out" and id(s.node) in bn_scale:
                    norm = norm * bn_scale[id(s.node)]
                if o.importance == "activation":
                    if s.role != "in" or s.data not in acts:
                        continue
                    norm = np.sqrt((per * per).sum(axis=1)) * acts[s.data]
                total += norm / (norm.mean() + 1e-12)
            scores.append(total)
        return scores

    def _activation_stats(self, model: ir.Model, groups: list[_Group]) -> dict[ir.Value, np.ndarray]:
        from graphopt.calibration import stream_tensors

        o = self.options
        data = self._calibration()
        wanted: dict[str, tuple[ir.Value, int, int, int]] = {}
        for g in groups:
            for s in g.slices:
                if s.role == "in" and s.data is not None and s.data.name:
                    wanted[s.data.name] = (s.data, s.data_axis, s.block, g.units)
        names = sorted(wanted)
        sums: dict[str, np.ndarray] = {}
        count = 0
        for batch in stream_tensors(model, names, data, limit=o.calibration_batches, description="prune stats"):
            count += 1
            for name in names:
                v, axis, block, units = wanted[name]
                a = np.abs(np.asarray(batch[name], dtype=np.float64))
                moved = np.moveaxis(a, axis, 0).reshape(units * block, -1).mean(axis=1)
                per = moved.reshape(units, block).mean(axis=1)
                sums[name] = sums.get(name, 0) + per
        if not count:
            raise PipelineError("prune importance=activation: the calibration data has no batches")
        return {wanted[n][0]: sums[n] / count for n in names}

    def _keep_counts(self, groups: list[_Group], scores: list[np.ndarray]) -> list[np.ndarray]:
        """Sorted unit indices to keep per group."""
        o = self.options
        keeps: list[np.ndarray] = []
        if o.scope == "global" and groups:
            flat = np.concatenate(scores)
            k = int(np.floor(o.sparsity * flat.size))
            order = np.argsort(flat, kind="stable")
            removed = np.zeros(flat.size, dtype=bool)
            removed[order[:k]] = True
            start = 0
            for g in groups:
                r = removed[start:start + g.units]
                start += g.units
                n_remove = min(int(r.sum()), g.units - 1)
                keeps.append(self._keep(g, scores[len(keeps)], n_remove))
            return keeps
        for g, s in zip(groups, scores):
            keeps.append(self._keep(g, s, int(np.floor(o.sparsity * g.units))))
        return keeps

    def _keep(self, g: _Group, score: np.ndarray, n_remove: int) -> np.ndarray:
        keep_n = max(1, g.units - n_remove)
        r = self.options.round_to
        if r > 1 and keep_n % r and g.units >= r:
            keep_n = min(g.units, int(np.ceil(keep_n / r) * r))
        order = np.argsort(-score, kind="stable")
        return np.sort(order[:keep_n])

    def _structured(self, model: ir.Model) -> bool:
        groups, skipped = self._groups(model)
        scores = self._scores(model, groups)
        keeps = self._keep_counts(groups, scores)
        graph = model.graph
        names = _Names(graph)
        report: list[dict[str, Any]] = []
        modified = False
        need_inference = False
        for g, keep in zip(groups, keeps):
            removed = np.setdiff1d(np.arange(g.units), keep)
            entry = {"kind": g.kind, "group": g.name, "units": g.units, "kept": int(keep.size),
                     "removed": [int(i) for i in removed],
                     "slices": [{"node": s.node.name, "input": s.index,
                                 "weight": s.weight_name or s.node.inputs[s.index].name,
                                 "axis": s.axis, "block": s.block, "role": s.role} for s in g.slices]}
            report.append(entry)
            if removed.size == 0:
                continue
            modified = True
            self.count(f"pruned:{g.kind}")
            self.count(f"removed_units:{g.kind}", int(removed.size))
            for s in g.slices:
                arr = _const(s.node.inputs[s.index])
                idx = (np.arange(s.groups)[:, None, None] * g.units * s.block
                       + keep[None, :, None] * s.block + np.arange(s.block)[None, None, :]).ravel()
                _set_input_const(graph, names, s.node, s.index, np.take(arr, idx, axis=s.axis), "_pruned")
            for node, index, fix in g.shape_fixes:
                self._fix_shape(graph, names, node, index, fix, g.units, int(keep.size))
            for v, (axis, block) in g.values.items():
                if v.shape is not None and not v.is_graph_output():
                    dims = list(v.shape.dims)
                    dims[axis] = int(keep.size) * block
                    v.shape = ir.Shape(dims)
            for v in g.clear:
                v.shape = None
                need_inference = True
        if modified:
            import onnx_ir.passes.common as common

            common.RemoveUnusedNodesPass()(model)
            if need_inference:
                from graphopt.passes.ir_helpers import infer_shapes

                infer_shapes(model)
        self.details["groups"] = report
        self.details["skipped"] = skipped
        total = sum(g.units for g in groups)
        self.details["removed_fraction"] = round(
            sum(len(e["removed"]) for e in report) / total, 6) if total else 0.0
        return modified

    def _fix_shape(self, graph: ir.Graph, names: _Names, node: ir.Node, index: int, fix: tuple[str, int],
                   units: int, kept: int) -> None:
        """Rewrite the unit count held literally in a shape tensor (a constant, or a constant piece
        of a Concat, which is cloned: the original may serve other layers)."""
        kind, arg = fix
        value = node.inputs[index]
        pieces = _shape_pieces(value) if value is not None else None
        if pieces is None:
            return
        flat: list[int | None] = []
        for n, arr in pieces:
            flat.extend([None] * n if arr is None else [int(a) for a in arr])
        changes: dict[int, int] = {}
        if kind in ("last", "merge") and flat and flat[-1] == units * arg:
            changes[len(flat) - 1] = kept * arg
        elif kind == "heads" and len(flat) > 2 and flat[2] == units:
            changes[2] = kept
        elif kind == "literal_heads":
            changes = {i: kept for i, v in enumerate(flat) if v == units}
        elif kind == "split":
            changes = {i: kept * arg for i, v in enumerate(flat) if v == units * arg}
        if not changes:
            return  # -1 / 0 / run-time values adapt by themselves
        c = _const(value)
        if c is not None:
            arr = c.astype(np.int64).ravel().copy()
            for i, v in changes.items():
                arr[i] = v
            _set_input_const(graph, names, node, index, arr.reshape(c.shape).astype(c.dtype), "_pruned")
            return
        concat = value.producer()
        clone = ir.node("Concat", list(concat.inputs), attributes={"axis": 0},
                        name=names.fresh((concat.name or "Concat") + "_pruned"))
        graph.insert_after(concat, clone)
        clone.outputs[0].name = names.fresh((value.name or "shape") + "_pruned")
        clone.outputs[0].dtype = value.dtype
        clone.outputs[0].shape = value.shape
        start = 0
        for k, (n, arr) in enumerate(pieces):
            local = {i - start: v for i, v in changes.items() if start <= i < start + n}
            if local and arr is not None:
                new_piece = arr.copy()
                for i, v in local.items():
                    new_piece[i] = v
                dtype = _const(concat.inputs[k]).dtype  # type: ignore[union-attr]
                _set_input_const(graph, names, clone, k, new_piece.reshape(
                    _const(concat.inputs[k]).shape).astype(dtype), "_pruned")  # type: ignore[union-attr]
            start += n
        node.replace_input_with(index, clone.outputs[0])


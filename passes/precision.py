"""``convert-float16``: run the float32 compute of a model in float16 (or bfloat16), where it is safe.

Why graphopt's own converter rather than ``onnxruntime.transformers.float16`` /
onnxconverter-common: those work on a ``ModelProto`` (a full copy of every weight, and no onnx_ir
round trip in place), decide per op type only (a block list), convert every float initializer and
silently clamp out-of-range values, and keep elementwise chains in fp16 between fp32 statistics
(an RMSNorm's ``Add(variance, eps)`` is cast down and up again). Here:

* an **allow list**: only ops known to have fp16 kernels and to be numerically safe in fp16 are
  converted; every other op (unknown ops and custom domains included) keeps float32, and the
  reasons for the ops kept on purpose are listed in :data:`~graphopt.passes.precision_ops.KEEP_FP32`;
* **follow the data**: a node converts only when one of its non-constant float inputs is already
  fp16 (or a graph input), or it gathers rows of a constant table (embeddings). Position and
  statistics chains that start at a ``Cast(int → float)`` or at a kept op (``Pow``) stay float32
  until they meet fp16 activations again, so RoPE angles, masks and variances never lose bits;
* **value ranges**: constants beyond fp16's ±65504 keep their consumer in float32, except
  "minus infinity" sentinels (``torch.finfo(float32).min`` masks, |v| ≥ 1e30) which are clamped to
  ±65504 (the same effect after Softmax). With calibration data (``context["calibration"]``) every
  activation's max |value| is measured first (:func:`graphopt.calibration.stream_tensors`): nodes
  that read or write a value above ``max_abs``, or a non-zero value whose magnitude is all below
  fp16's smallest normal, stay float32. Without calibration only the op rules apply (logged);
* the graph's inputs and outputs keep float32 by default (a ``Cast`` at the boundary), so callers
  and IO bindings are unchanged; ``keep_io_types=false`` makes them fp16 for zero-copy pipelines.

Decisions worth stating: ``Softmax`` converts (ONNX Runtime's CUDA kernel accumulates in float32;
its input range is what overflows, and calibration checks it); fused ``LayerNormalization`` /
``SkipLayerNormalization`` / RMSNorm ops convert (their kernels keep mean and variance in float32),
while a decomposed norm keeps its statistics in float32 because ``Pow`` is kept and the reduction after
it follows its float32 input; ``Pow``/``Exp``/sum reductions, angles (``Sin``/``Cos``), ``Range``,
random ops, ``TopK``/``ArgMax`` indices and comparisons stay float32 (:data:`~graphopt.passes.precision_ops.KEEP_FP32`).

Numeric checks on the CPU provider understate fp16 error: ONNX Runtime's CPU provider runs fp16 nodes
without an fp16 kernel in float32 (it inserts casts), so overflow shows only on the GPU.

``dtype=bfloat16`` keeps float32's exponent range (no overflow checks needed) with 8 mantissa
bits; ONNX Runtime's CUDA provider has bf16 kernels for fewer ops (MatMul, Gemm, Add, the
LayerNorm family, attention) and its CPU provider for almost none.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

from graphopt.errors import PipelineError
from graphopt.pipeline import Pass

from .fusion._base import RULE_KEY
from .ir_helpers import MS_DOMAIN as _MS
from .ir_helpers import STANDARD_DOMAINS, constant_array, model_opset
from .precision_ops import (
    ANY_INPUT,
    CONVERTIBLE,
    FP16_MAX,
    FP16_MIN_NORMAL,
    GATHERS,
    HEAVY,
    KEEP_FP32,
    KEEP_INPUTS,
    KEEP_OUTPUTS,
    SENTINEL,
)

__all__ = ["ConvertFloat16Pass"]

logger = logging.getLogger("graphopt.passes.precision")


@dataclasses.dataclass
class Float16Options:
    dtype: Literal["float16", "bfloat16"] = dataclasses.field(
        default="float16", metadata={"doc": "reduced precision type: float16 | bfloat16"}
    )
    keep_io_types: bool = dataclasses.field(
        default=True, metadata={"doc": "graph inputs/outputs stay float32 (Cast at the boundary)"}
    )
    op_block_list: list[str] = dataclasses.field(
        default_factory=list, metadata={"doc": "more op types to keep in float32"}
    )
    node_block_list: list[str] = dataclasses.field(
        default_factory=list, metadata={"doc": "node names to keep in float32"}
    )
    max_abs: float = dataclasses.field(
        default=16384.0,
        metadata={
            "doc": "calibrated |values| above this keep their nodes in float32 "
            "(fp16 max is 65504; the margin covers inputs not seen)"
        },
    )
    calibration_batches: int = dataclasses.field(
        default=8, metadata={"doc": "calibration batches used to measure value ranges"}
    )
    ranges: Literal["auto", "calibration", "off"] = dataclasses.field(
        default="auto",
        metadata={
            "doc": "value-range checks: auto (when calibration data is given), calibration (required), off"
        },
    )


class ConvertFloat16Pass(Pass):
    """Convert float32 compute to float16/bfloat16 where safe: allow-listed ops only, value ranges
    checked (constants always, activations with calibration data), float32 graph I/O by default.

    Safe: ops not known to be fp16-safe keep float32 with a Cast at each boundary; nodes whose
    input types are unknown are skipped; every node kept in float32 is listed with its reason in
    the report details (``kept_fp32``).
    """

    name = "convert-float16"
    Options: ClassVar[type] = Float16Options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o = self.options
        if o.max_abs <= 0:
            raise PipelineError(f"convert-float16: max_abs must be positive, got {o.max_abs}")
        low = ir.DataType.FLOAT16 if o.dtype == "float16" else ir.DataType.BFLOAT16
        #: ids of float32 values cast down through a Clip to ±65504 (mask sentinels); Clip takes its
        #: bounds as inputs from opset 11.
        self._clamped: set[int] = set()
        self._can_clip = model_opset(model) >= 11
        graph = model.graph
        nodes = list(graph)
        filled = _fill_contrib_types(nodes)
        if filled:
            self.count("contrib_types_filled", filled)
        stats = self._ranges(model, nodes) if o.dtype == "float16" else {}
        outer = _read_in_subgraphs(graph)
        kept: list[dict[str, str]] = []
        converted: set[int] = set()
        low_values: set[int] = set()  # ids of values that will be reduced precision
        low_inputs = {id(v) for v in graph.inputs if v.dtype == ir.DataType.FLOAT}

        # Values computed from integers (positions, shapes) through float ops: a Cast(int → float)
        # or Range starts the chain; nothing on it converts.
        tainted: set[int] = set()

        def is_low(v: ir.Value) -> bool:
            return id(v) in low_values or id(v) in low_inputs

        for node in nodes:
            key = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
            if _starts_position_chain(node) or _all_tainted(node, tainted):
                tainted.update(id(v) for v in node.outputs if v.dtype == ir.DataType.FLOAT)
            if key in ANY_INPUT or key == ("", "Constant"):  # constants convert where they are read
                continue
            float_in = [
                (i, v) for i, v in enumerate(node.inputs) if v is not None and v.dtype == ir.DataType.FLOAT
            ]
            float_out = [(i, v) for i, v in enumerate(node.outputs) if v.dtype == ir.DataType.FLOAT]
            if not float_in and not float_out:
                continue
            keep_in = KEEP_INPUTS.get(key, frozenset())
            keep_out = KEEP_OUTPUTS.get(key, frozenset())
            reason = self._keep_reason(
                node, key, float_in, float_out, keep_in, keep_out, stats, outer, is_low, tainted
            )
            if reason is None:
                converted.add(id(node))
                for i, v in float_out:
                    if i not in keep_out:
                        low_values.add(id(v))
                self.count("nodes_converted")
            elif reason not in ("follows float32 inputs", "computes positions or shapes (from integers)"):
                kept.append({"node": node.name or "", "op_type": node.op_type, "reason": reason})
                self.count("nodes_kept_fp32")
        if not converted:
            self.details["kept_fp32"] = kept
            return ir.passes.PassResult(model, bool(filled))
        self._rewrite(model, nodes, converted, low_values, low)
        self.details["kept_fp32"] = kept
        self.details["dtype"] = o.dtype
        return ir.passes.PassResult(model, True)

    # --- decisions ----------------------------------------------------------------------------
    def _keep_reason(
        self,
        node: ir.Node,
        key: tuple[str, str],
        float_in: list[tuple[int, ir.Value]],
        float_out: list[tuple[int, ir.Value]],
        keep_in: frozenset[int],
        keep_out: frozenset[int],
        stats: dict[str, tuple[float, bool]],
        outer: set[int],
        is_low: Any,
        tainted: set[int],
    ) -> str | None:
        """Why ``node`` stays float32 (None: convert it)."""
        o = self.options
        if key not in CONVERTIBLE:
            return KEEP_FP32.get(node.op_type, "no known reduced-precision kernel (not in the allow list)")
        if node.op_type in o.op_block_list or (node.name and node.name in o.node_block_list):
            return "blocked by option"
        for v in node.inputs:
            if v is not None and v.dtype is None:
                return "an input's type is unknown"
        if any(v.dtype is None for v in node.outputs):
            return "an output's type is unknown"
        if any(id(v) in outer for _, v in float_out):
            return "an output is read inside a subgraph"
        active = [(i, v) for i, v in float_in if i not in keep_in]
        dynamic = [v for _, v in active if constant_array(v) is None]
        if any(id(v) in tainted for v in dynamic) and not any(is_low(v) for v in dynamic):
            return "computes positions or shapes (from integers)"
        heavy = key in HEAVY and any(id(v) not in tainted for v in dynamic)
        if not (heavy or any(is_low(v) for v in dynamic) or (key in GATHERS and len(dynamic) < len(active))):
            return "follows float32 inputs"
        if o.dtype == "float16":
            for _, v in active:
                arr = constant_array(v) if v not in dynamic else None
                if arr is not None:
                    why = _constant_problem(arr)
                    if why:
                        return f"constant '{v.name}' {why}"
            outs = [v for i, v in float_out if i not in keep_out]
            clamp = []
            for v in [*dynamic, *outs]:
                if v.name in stats:
                    peak, sentinel = stats[v.name]
                    if peak > o.max_abs:
                        return f"value '{v.name}' reaches |{peak:.4g}| > {o.max_abs:g} in calibration"
                    if 0 < peak < FP16_MIN_NORMAL and not sentinel:
                        return f"value '{v.name}' is all below fp16's smallest normal ({peak:.3g})"
                    if sentinel:
                        produced_low = is_low(v) and not v.is_graph_input()
                        if any(v is out for out in outs) or produced_low or not self._can_clip:
                            return f"value '{v.name}' holds ±1e30-like mask sentinels; kept float32"
                        clamp.append(v)
            # Mask inputs (finfo(float32).min where masked, ordinary values elsewhere): the cast
            # to fp16 saturates them at ±65504 instead of making -inf (same effect after Softmax).
            self._clamped.update(id(v) for v in clamp)
        return None

    def _ranges(self, model: ir.Model, nodes: list[ir.Node]) -> dict[str, tuple[float, bool]]:
        """Per float activation: max |value| apart from ±1e30-like mask sentinels, and whether it
        holds such sentinels, from calibration."""
        o = self.options
        data = self.context.get("calibration")
        if o.ranges == "off" or (data is None and o.ranges == "auto"):
            if o.ranges == "auto":
                logger.info("convert-float16: no calibration data; activation ranges are not checked")
                self.count("ranges_unchecked")
            return {}
        if data is None:
            raise PipelineError(
                "convert-float16(ranges=calibration) needs calibration data; pass calibration="
            )
        from graphopt.calibration import CalibrationData, stream_tensors

        data = CalibrationData.from_any(data)
        names: list[str] = [v.name for v in model.graph.inputs if v.dtype == ir.DataType.FLOAT and v.name]
        seen = set(names)
        for node in nodes:
            for v in node.outputs:
                if v.dtype == ir.DataType.FLOAT and v.name and v.name not in seen:
                    seen.add(v.name)
                    names.append(v.name)
        peaks: dict[str, tuple[float, bool]] = {}
        for batch in stream_tensors(
            model, names, data, limit=o.calibration_batches, description="fp16 value ranges"
        ):
            for name, arr in batch.items():
                a = np.abs(np.asarray(arr, dtype=np.float32))
                finite = a[np.isfinite(a)]
                sentinel = finite >= SENTINEL
                ordinary = finite[~sentinel]
                peak = float(ordinary.max()) if ordinary.size else 0.0
                old_peak, old_sentinel = peaks.get(name, (0.0, False))
                peaks[name] = (max(old_peak, peak), old_sentinel or bool(sentinel.any()))
        self.count("values_measured", len(peaks))
        return peaks

    # --- rewriting ----------------------------------------------------------------------------
    def _rewrite(
        self,
        model: ir.Model,
        nodes: list[ir.Node],
        converted: set[int],
        low_values: set[int],
        low: ir.DataType,
    ) -> None:
        graph = model.graph
        o = self.options
        taken = {v.name for n in nodes for v in n.outputs if v.name}
        taken |= {v.name for v in graph.inputs if v.name} | set(graph.initializers)
        short = "fp16" if low == ir.DataType.FLOAT16 else "bf16"

        def fresh(base: str) -> str:
            name, i = base, 1
            while name in taken:
                name, i = f"{base}_{i}", i + 1
            taken.add(name)
            return name

        down: dict[int, ir.Value] = {}
        up: dict[int, ir.Value] = {}
        consts: dict[int, ir.Value] = {}
        first = nodes[0]

        def cast(v: ir.Value, to: ir.DataType, after: ir.Node | None) -> ir.Value:
            suffix = short if to == low else "fp32"
            node = ir.node("Cast", [v], {"to": to}, name=fresh(f"{v.name}_cast_{suffix}"))
            out = node.outputs[0]
            out.name = fresh(f"{v.name}_{suffix}")
            out.type = ir.TensorType(to)
            out.shape = v.shape
            node.metadata_props[RULE_KEY] = self.name
            if after is None:
                graph.insert_before(first, node)
            else:
                graph.insert_after(after, node)
            self.count("casts_inserted")
            return out

        def to_low(v: ir.Value) -> ir.Value:
            arr = constant_array(v)
            if arr is not None:
                if id(v) not in consts:
                    consts[id(v)] = self._constant(graph, v, arr, low, fresh(f"{v.name}_{short}"))
                return consts[id(v)]
            if id(v) not in down:
                source = clip(v) if id(v) in self._clamped else v
                down[id(v)] = cast(source, low, source.producer())
            return down[id(v)]

        bounds: list[ir.Value] = []

        def clip(v: ir.Value) -> ir.Value:
            if not bounds:
                for name, x in (("fp16_lowest", -FP16_MAX), ("fp16_max", FP16_MAX)):
                    t = ir.Tensor(np.array(x, dtype=np.float32), name=fresh(name))
                    b = ir.Value(
                        name=t.name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]), const_value=t
                    )
                    graph.register_initializer(b)
                    bounds.append(b)
            node = ir.node("Clip", [v, *bounds], name=fresh(f"{v.name}_saturate"))
            out = node.outputs[0]
            out.name = fresh(f"{v.name}_saturated")
            out.type = ir.TensorType(ir.DataType.FLOAT)
            out.shape = v.shape
            node.metadata_props[RULE_KEY] = self.name
            producer = v.producer()
            if producer is None:
                graph.insert_before(first, node)
            else:
                graph.insert_after(producer, node)
            self.count("sentinel_values_saturated")
            return out

        def to_float(v: ir.Value) -> ir.Value:
            if id(v) not in up:
                up[id(v)] = cast(v, ir.DataType.FLOAT, v.producer())
            return up[id(v)]

        if not o.keep_io_types:
            for v in graph.inputs:
                if v.dtype == ir.DataType.FLOAT and not v.is_initializer():
                    v.type = ir.TensorType(low)
                    low_values.add(id(v))
                    self.count("io_converted")
        # Outputs first (the casts that restore float32 need the producers' final types).
        for node in nodes:
            if id(node) in converted:
                for v in node.outputs:
                    if id(v) in low_values:
                        v.type = ir.TensorType(low)
        for node in nodes:
            key = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
            if key in ANY_INPUT:
                continue
            keep_in = KEEP_INPUTS.get(key, frozenset())
            for i, v in enumerate(list(node.inputs)):
                if v is None:
                    continue
                wants_low = id(node) in converted and i not in keep_in
                if wants_low and id(v) in low_values:
                    continue
                if wants_low and v.dtype == ir.DataType.FLOAT:
                    node.replace_input_with(i, to_low(v))
                elif id(v) in low_values:
                    node.replace_input_with(i, to_float(v))
        for i, v in enumerate(list(graph.outputs)):
            if id(v) in low_values and o.keep_io_types:
                if v.is_graph_input():
                    continue
                restored = to_float(v)
                # The graph output keeps its name and float32 type; the fp16 value is renamed.
                name = v.name
                v.name = fresh(f"{name}_{short}")
                taken.discard(restored.name)
                restored.name = name
                graph.outputs[i] = restored
        for v in list(graph.initializers.values()):
            if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
                graph.initializers.pop(v.name)  # type: ignore[arg-type]

    def _constant(
        self, graph: ir.Graph, v: ir.Value, arr: np.ndarray, low: ir.DataType, name: str
    ) -> ir.Value:
        """A new initializer holding ``v``'s data in ``low`` (sentinels clamped to the fp16 range)."""
        a = np.asarray(arr, dtype=np.float32)
        if low == ir.DataType.FLOAT16:
            big = np.isfinite(a) & (np.abs(a) > FP16_MAX)
            if big.any():
                a = np.where(big, np.sign(a) * FP16_MAX, a).astype(np.float32)
                self.count("sentinels_clamped", int(big.sum()))
            converted = a.astype(np.float16)
        else:
            converted = a.astype(ml_dtypes.bfloat16)
        tensor = ir.Tensor(converted, dtype=low, name=name)
        value = ir.Value(
            name=name, type=ir.TensorType(low), shape=ir.Shape(converted.shape), const_value=tensor
        )
        graph.register_initializer(value)
        self.count("initializers_converted")
        return value


def _starts_position_chain(node: ir.Node) -> bool:
    """Cast from an integer/bool to float, or Range: float values that are really indices."""
    if node.domain not in STANDARD_DOMAINS:
        return False
    if node.op_type == "Range":
        return True
    if node.op_type == "Cast" and node.inputs and node.inputs[0] is not None:
        src = node.inputs[0].dtype
        return src is not None and not src.is_floating_point()
    return False


def _all_tainted(node: ir.Node, tainted: set[int]) -> bool:
    dynamic = [
        v for v in node.inputs if v is not None and v.dtype == ir.DataType.FLOAT and constant_array(v) is None
    ]
    return bool(dynamic) and all(id(v) in tainted for v in dynamic)


def _fill_contrib_types(nodes: list[ir.Node]) -> int:
    """Set the missing output types of com.microsoft ops ONNX's shape inference does not know.

    Every contrib op in :data:`CONVERTIBLE` has outputs of its first input's type T, except the
    normalization statistics (float32); without types, nothing after them could be converted.
    """
    n = 0
    for node in nodes:
        key = (node.domain, node.op_type)
        if node.domain != _MS or key not in CONVERTIBLE or not node.inputs or node.inputs[0] is None:
            continue
        t = node.inputs[0].dtype
        if t is None:
            continue
        keep = KEEP_OUTPUTS.get(key, frozenset())
        for i, v in enumerate(node.outputs):
            if v.dtype is None:
                v.type = ir.TensorType(ir.DataType.FLOAT if i in keep else t)
                n += 1
    return n


def _constant_problem(arr: np.ndarray) -> str | None:
    """Why a float32 constant cannot become fp16 (None when it can, perhaps with clamped sentinels)."""
    if arr.size == 0 or not np.issubdtype(arr.dtype, np.floating):
        return None
    a = np.abs(arr.astype(np.float32))
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return None
    over = finite[finite > FP16_MAX]
    if over.size and (over < SENTINEL).any():
        return f"has values up to {float(over.max()):.4g}, beyond fp16's {FP16_MAX:g}"
    peak = float(finite.max())
    if 0 < peak < FP16_MIN_NORMAL:
        return f"is all below fp16's smallest normal (max |v| {peak:.3g})"
    return None


def _read_in_subgraphs(graph: ir.Graph) -> set[int]:
    """Ids of main-graph values that nodes inside subgraphs read (outer-scope references)."""
    out: set[int] = set()
    for node in graph:
        for attr in node.attributes.values():
            subs = []
            if attr.type == ir.AttributeType.GRAPH:
                subs = [attr.value]
            elif attr.type == ir.AttributeType.GRAPHS:
                subs = list(attr.value)
            for sub in subs:
                for inner in ir.traversal.RecursiveGraphIterator(sub):
                    for v in inner.inputs:
                        if v is not None and v.graph is graph:
                            out.add(id(v))
    return out

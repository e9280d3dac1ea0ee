"""``quantize-static``: calibrated int8 (or 16-bit) QDQ quantization.

Calibration data runs through the float model once (one batch at a time, reduced into mergeable
statistics, see :mod:`calibrators`); a calibrator turns each tensor's statistics into a clip range;
then QuantizeLinear/DequantizeLinear pairs go on the activations and the weights are stored as
int8 initializers (per channel) behind a DequantizeLinear, biases as int32 at
``input_scale * weight_scale``. Where the pairs go is the backend's choice (:class:`Placement`):
``ort-cpu`` follows ONNX Runtime's CPU QDQ transformer so that it fuses each group into
QLinearConv / QLinearMatMul / QGemm / QLinearAdd ... and runs the int8 kernels; ``tensorrt``
puts symmetric int8 pairs on the inputs only (TensorRT propagates them itself).

Safe because every rewrite is a quantize-dequantize of a value whose dtype is known to be
float32; nodes whose inputs are of unknown dtype, or whose weights are not constants, stay float
and their decision says why. Ranges are cached in the pipeline context, so re-running the pass
on copies of the same model (the accuracy-control loop) calibrates once.

Where it goes in a pipeline (ort-cpu): ``cleanup,fuse(domains=[standard]),quantize-static,cleanup``:
after BatchNorm folding and the standard fusions (MatMul+Add → Gemm gives QGemm an int32 bias),
before any com.microsoft fusion (FusedConv/FusedMatMul hide the op from ORT's QDQ fusion).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from graphopt.calibration import CalibrationError, stream_tensors
from graphopt.errors import PipelineError

from ..ir_helpers import constant_array, unique_name
from .base import CommonOptions, QuantizePassBase, matches_any
from .calibrators import CALIBRATORS, ChannelAbsMax, Histogram, MinMax, compute_range

__all__ = ["PLACEMENTS", "Placement", "QuantizeStaticPass", "StaticOptions"]

logger = logging.getLogger("graphopt.passes.quantize.static")

_FLOAT = ir.DataType.FLOAT

# ---------------------------------------------------------------------------------------------
# Placement rules


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where Q/DQ pairs go for one backend.

    * ``compute``: ops with a constant weight (quantized offline, per channel) and activation
      input(s); MatMul with two activations quantizes both;
    * ``output_required``: compute ops whose output must be quantized for the backend to fuse
      them (ORT has QLinearConv but no float-output integer Conv); other compute ops quantize
      their output only when a quantized consumer reads it (ORT then fuses MatMul into
      MatMulIntegerToFloat and Gemm into a float-output QGemm);
    * ``qlinear``: ops with their own int8 kernel: all inputs and the output quantized, the output
      with its own calibrated range (when ``quantize_outputs``);
    * ``passthrough``: ops that move or select values: quantized only when their input already
      is, the output reusing the input's scale and zero point (ORT then drops the pair and runs
      the op on uint8);
    * ``removable``: activations absorbed by the previous Q when its zero point is ``qmin``
      (Relu's output range starts at 0), as ORT's quantizer does;
    * ``symmetric``/``activation_type``: forced activation settings (None: the pass options);
    * ``constant_operands``: quantize a constant operand of Add/Mul/Concat as int8 (else the node
      stays float: quantizing a bias Add's constant to 8 bits costs accuracy);
    * ``embedding``: lookups in a constant table (Gather): the table as per-tensor int8 and the
      output Q sharing its scale (the pattern ORT's quantizer writes; smaller files, off unless the
      ``embeddings`` option asks, since ORT CPU then dequantizes the whole table each run);
    * ``quantize_bias``: Conv/Gemm bias as int32 at ``input_scale * weight_scale`` (ORT's integer
      kernels take it so); TensorRT keeps float biases and folds them itself;
    * ``float_norm_residuals``: Adds whose output feeds a normalization (a transformer's residual
      stream) or a Softmax (scores plus attention mask) stay float.
    """

    name: str
    compute: frozenset[str]
    output_required: frozenset[str]
    qlinear: frozenset[str]
    passthrough: frozenset[str]
    removable: frozenset[str]
    quantize_outputs: bool = True
    symmetric: bool | None = None
    activation_type: str | None = None
    constant_operands: bool = False
    quantize_bias: bool = True
    embedding: frozenset[str] = frozenset()
    #: Leave float the transformer Adds one per-tensor 8-bit scale cannot hold: those feeding a
    #: normalization (the residual stream carries a few channels hundreds of times larger than the
    #: rest) and those feeding Softmax (the attention mask's -1e4…-3e38 share the scores' tensor).
    float_norm_residuals: bool = False

    def kind(self, op_type: str) -> str | None:
        for kind in ("compute", "qlinear", "passthrough", "removable", "embedding"):
            if op_type in getattr(self, kind):
                return kind
        return None

    @property
    def op_types(self) -> list[str]:
        return sorted(self.compute | self.qlinear | self.passthrough | self.removable | self.embedding)


PLACEMENTS: dict[str, Placement] = {
    "ort-cpu": Placement(
        name="ort-cpu",
        compute=frozenset({"Conv", "MatMul", "Gemm"}),
        output_required=frozenset({"Conv"}),
        qlinear=frozenset({"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid",
                           "LeakyRelu"}),
        passthrough=frozenset({"MaxPool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze",
                               "Unsqueeze"}),
        removable=frozenset({"Relu", "Clip"}),
        embedding=frozenset({"Gather"}),
        float_norm_residuals=True,
    ),
    # TensorRT: symmetric int8 (zero points 0) on the inputs of the ops it runs in int8, both
    # inputs of a residual Add; it propagates scales through pooling/reshapes and fuses ReLU.
    "tensorrt": Placement(
        name="tensorrt",
        compute=frozenset({"Conv", "MatMul", "Gemm"}),
        output_required=frozenset(),
        qlinear=frozenset({"Add", "Concat", "AveragePool", "GlobalAveragePool"}),
        passthrough=frozenset(),
        removable=frozenset(),
        quantize_outputs=False,
        symmetric=True,
        activation_type="int8",
        quantize_bias=False,
    ),
}

#: Consumers that make an Add part of a residual stream: normalizations, fused or decomposed.
_NORM_CONSUMERS = frozenset({"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
                             "SkipSimplifiedLayerNormalization", "RMSNormalization", "ReduceMean", "Pow"})

_QRANGE = {
    "uint8": (0, 255, np.uint8, ir.DataType.UINT8),
    "int8": (-128, 127, np.int8, ir.DataType.INT8),
    "uint16": (0, 65535, np.uint16, ir.DataType.UINT16),
    "int16": (-32768, 32767, np.int16, ir.DataType.INT16),
}


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclasses.dataclass
class StaticOptions(CommonOptions):
    calibrator: str = dataclasses.field(
        default="mse",
        metadata=_doc(f"how ranges are chosen: {', '.join(CALIBRATORS)} (mse: the most accurate on the digits "
                      "CNN/MLP and BERT/GPT-2/ViT tiny, see benchmarks/results/quantize_static.md)"))
    percentile: float = dataclasses.field(
        default=99.999, metadata=_doc("percentile calibrator: keep this share of each tail"))
    activation_type: str = dataclasses.field(
        default="uint8", metadata=_doc("uint8 (ONNX Runtime CPU runs u8s8 fastest) or int8"))
    activation_symmetric: bool = dataclasses.field(
        default=False, metadata=_doc("symmetric activation ranges (zero point at the middle)"))
    per_channel: bool = dataclasses.field(default=True, metadata=_doc("per-channel int8 weights"))
    activations16: list[str] = dataclasses.field(
        default_factory=list,
        metadata=_doc("nodes (names, patterns, op types) whose activations get 16-bit QDQ"))
    op_types: list[str] = dataclasses.field(
        default_factory=list, metadata=_doc("quantize only these op types (default: the placement's)"))
    max_batches: int | None = dataclasses.field(
        default=None, metadata=_doc("calibrate on at most this many batches"))
    progress: bool | None = dataclasses.field(
        default=None, metadata=_doc("progress bar while calibrating (default: on a terminal only)"))
    placement: str = dataclasses.field(
        default="ort-cpu", metadata=_doc(f"Q/DQ placement rules: {', '.join(PLACEMENTS)}"))
    embeddings: bool = dataclasses.field(
        default=False,
        metadata=_doc("store constant lookup tables (Gather: embeddings) as per-tensor int8 too: a smaller "
                      "file, but one scale per table, and ONNX Runtime 1.32 CPU dequantizes the table on "
                      "every run instead of gathering int8 (measured on BERT)"))
    smooth_quant: float | None = dataclasses.field(
        default=None,
        metadata=_doc("SmoothQuant alpha (e.g. 0.5): move activation outliers into MatMul/Gemm weights "
                      "where a LayerNormalization's scale/bias can absorb the inverse scale"))


@dataclasses.dataclass
class _QT:
    """One activation tensor to quantize."""

    value: ir.Value
    range_from: str  # the value whose calibrated range is used (a removed Relu's output)
    shared_from: ir.Value | None = None  # passthrough: reuse this tensor's parameters
    wide: bool = False  # 16-bit
    absorbs: ir.Node | None = None  # removed activation whose output this pair replaces
    table: ir.Value | None = None  # embedding output: the parameters of this int8 table
    params: tuple[np.ndarray, np.ndarray] | None = None  # (scale, zero point)


@dataclasses.dataclass
class _Plan:
    tensors: dict[ir.Value, _QT] = dataclasses.field(default_factory=dict)
    order: list[ir.Value] = dataclasses.field(default_factory=list)
    weights: list[tuple[ir.Node, int, int | None]] = dataclasses.field(default_factory=list)
    biases: list[tuple[ir.Node, int, ir.Value, int, int | None]] = dataclasses.field(default_factory=list)
    nodes: list[tuple[ir.Node, bool, str]] = dataclasses.field(default_factory=list)
    alias: dict[ir.Value, ir.Value] = dataclasses.field(default_factory=dict)

    def quantized(self, v: ir.Value | None) -> ir.Value | None:
        """The tensor carrying ``v``'s quantization (``v`` itself, or the input of a removed Relu)."""
        if v is None:
            return None
        v = self.alias.get(v, v)
        return v if v in self.tensors else None

    def add(self, qt: _QT) -> None:
        if qt.value not in self.tensors:
            self.tensors[qt.value] = qt
            self.order.append(qt.value)


class QuantizeStaticPass(QuantizePassBase):
    """Static int8 QDQ quantization with calibration (per-channel int8 weights, int32 biases,
    uint8/int8/16-bit activations) placed so the backend fuses the groups into integer kernels.
    Needs calibration data (``calibration=`` / ``--calibration``)."""

    name = "quantize-static"
    modes: ClassVar[dict[str, dict[str, Any]]] = {"static": {}}
    Options = StaticOptions

    # --- options ----------------------------------------------------------------------------
    def _check_options(self) -> Placement:
        o = self.options
        if o.placement not in PLACEMENTS:
            raise PipelineError(f"quantize-static: placement must be one of {', '.join(PLACEMENTS)}, "
                                f"not {o.placement!r}")
        if o.calibrator not in CALIBRATORS:
            raise PipelineError(f"quantize-static: calibrator must be one of {', '.join(CALIBRATORS)}, "
                                f"not {o.calibrator!r}")
        if o.activation_type not in ("uint8", "int8"):
            raise PipelineError(f"quantize-static: activation_type must be uint8 or int8, not "
                                f"{o.activation_type!r}")
        if not 50.0 < float(o.percentile) <= 100.0:
            raise PipelineError(f"quantize-static: percentile must be in (50, 100], not {o.percentile}")
        if o.max_batches is not None and o.max_batches < 1:
            raise PipelineError("quantize-static: max_batches must be at least 1")
        if o.smooth_quant is not None and not 0.0 <= o.smooth_quant <= 1.0:
            raise PipelineError(f"quantize-static: smooth_quant alpha must be in [0, 1], not {o.smooth_quant}")
        placement = PLACEMENTS[o.placement]
        if o.op_types:
            unknown = sorted(set(o.op_types) - set(placement.op_types))
            if unknown:
                raise PipelineError(f"quantize-static: op_types {unknown} are not quantizable with placement "
                                    f"{placement.name} (choose from {', '.join(placement.op_types)})")
        return placement

    def _act(self, placement: Placement, wide: bool) -> tuple[str, bool]:
        """(activation type name, symmetric) for an 8- or 16-bit tensor."""
        t = placement.activation_type or self.options.activation_type
        sym = placement.symmetric if placement.symmetric is not None else bool(self.options.activation_symmetric)
        if wide:
            t = "int16" if t == "int8" else "uint16"
        return t, sym

    # --- main -------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        placement = self._check_options()
        data = self.calibration_data()
        if data is None:
            raise CalibrationError(
                "quantize-static needs calibration data: pass calibration=<.npz, folder or list of feed "
                "dicts> to optimize() (CLI: --calibration FILE), or the pass option calibration=PATH")
        opset = model.opset_imports.get("", model.graph.opset_imports.get("", 0))
        if opset < 13:
            raise PipelineError(f"quantize-static needs opset >= 13 (per-axis QDQ); the model has {opset}: "
                                "run the upgrade-opset pass first")
        from ..ir_helpers import infer_shapes

        modified = infer_shapes(model)
        graph = model.graph
        smooth_key: tuple[Any, ...] = ()
        if self.options.smooth_quant is not None:
            smooth_key, changed = self._smooth_quant(model, placement, data)
            modified = modified or changed

        # Plan over every candidate (selection ignored) to calibrate once for all later runs,
        # then the plan that honours include/exclude.
        full = self._plan(graph, placement, use_selection=False)
        ranges = self._ranges(model, full, placement, data, smooth_key)
        plan = self._plan(graph, placement, use_selection=True)
        for node, quantized, reason in plan.nodes:
            self.decide(node, quantized, reason)
        if not plan.tensors and not plan.weights:
            return ir.passes.PassResult(model, modified)
        self._apply(model, plan, placement, ranges)
        return ir.passes.PassResult(model, True)

    # --- planning ---------------------------------------------------------------------------
    def _ops(self, placement: Placement) -> set[str]:
        if self.options.op_types:
            return set(self.options.op_types)
        ops = set(placement.op_types)
        return ops if self.options.embeddings else ops - placement.embedding

    def _eligible(self, node: ir.Node, kind: str, placement: Placement) -> str | None:
        """Why ``node`` cannot be quantized (dtype, constness), independent of its neighbours."""
        if kind == "compute":
            x = node.inputs[0] if node.inputs else None
            w = node.inputs[1] if len(node.inputs) > 1 else None
            if x is None or w is None:
                return "missing input"
            if x.dtype != _FLOAT:
                return f"input dtype {x.dtype or 'unknown'} is not float32"
            if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
                return "transA=1"
            if constant_array(x) is not None:
                return "first input is a constant"
            wc = constant_array(w)
            if wc is None:
                if node.op_type != "MatMul":
                    return "weight is not a constant"
                if w.dtype != _FLOAT:
                    return f"input dtype {w.dtype or 'unknown'} is not float32"
                return None
            if wc.dtype != np.float32:
                return f"weight dtype {wc.dtype} is not float32"
            return None
        if kind == "embedding":
            table = constant_array(node.inputs[0]) if node.inputs else None
            if table is None:
                return "table is not a constant"
            if table.dtype != np.float32:
                return f"table dtype {table.dtype} is not float32"
            return None
        ins = [v for v in node.inputs if v is not None]
        if not ins:
            return "no inputs"
        if kind in ("passthrough", "removable"):
            ins = ins[:1]
        for v in ins:
            if v.dtype != _FLOAT:
                return f"input dtype {v.dtype or 'unknown'} is not float32"
        if kind == "removable" and node.op_type == "Clip":
            # Clip(0, M) → Q is Q alone: the calibrated range is [0, ≤M] and Q saturates there.
            lo = constant_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
            hi_v = node.inputs[2] if len(node.inputs) > 2 else None
            if lo is None or lo.size != 1 or float(lo.reshape(())) != 0.0:
                return "Clip's minimum is not a constant 0"
            if hi_v is not None and constant_array(hi_v) is None:
                return "Clip's maximum is not a constant"
        if kind == "qlinear" and not placement.constant_operands:
            if any(constant_array(v) is not None for v in ins):
                return "constant operand (stays float)"
        if placement.float_norm_residuals and node.op_type == "Add":
            consumers = {c.op_type for o in node.outputs for c in o.consumers()}
            if consumers & _NORM_CONSUMERS:
                return "residual Add into a normalization (outlier channels; stays float)"
            if "Softmax" in consumers:
                return "attention-mask Add into Softmax (mask values dwarf the scores; stays float)"
        return None

    def _plan(self, graph: ir.Graph, placement: Placement, use_selection: bool) -> _Plan:
        plan = _Plan()
        ops = self._ops(placement)
        o = self.options
        _, sym = self._act(placement, False)
        removable_ok = not sym  # Relu/Clip vanish into a Q only when its zero point is qmin
        patterns16 = list(o.activations16)
        outputs = set(graph.outputs)
        decided: set[ir.Node] = set()

        def candidate(n: ir.Node) -> str | None:
            if n.domain not in ("", "ai.onnx") or n.op_type not in ops:
                return None
            return placement.kind(n.op_type)

        def usable(n: ir.Node) -> tuple[str | None, str]:
            kind = candidate(n)
            if kind is None:
                return None, ""
            if use_selection:
                ok, why = self.selected(n)
                if not ok:
                    return None, why
            why = self._eligible(n, kind, placement)
            return (kind, "") if why is None else (None, why)

        def wants_input(consumer: ir.Node, depth: int = 0) -> bool:
            kind, _ = usable(consumer)
            if kind in ("compute", "qlinear"):
                return True
            if kind == "removable" and removable_ok:
                return True
            if kind == "passthrough" and depth < 2:
                return any(wants_input(c, depth + 1) for c in consumer.outputs[0].consumers())
            return False

        def quantize_output(n: ir.Node) -> None:
            y = n.outputs[0]
            consumers = list(y.consumers())
            if (len(consumers) == 1 and consumers[0].op_type in placement.removable and removable_ok
                    and y not in outputs and consumers[0].outputs[0] not in outputs):
                relu = consumers[0]
                kind, _why = usable(relu)
                if kind == "removable":
                    plan.add(_QT(y, relu.outputs[0].name or "", absorbs=relu))
                    plan.alias[relu.outputs[0]] = y
                    plan.nodes.append((relu, True, "absorbed by the quantize of its input (zero point at qmin)"))
                    decided.add(relu)
                    return
            plan.add(_QT(y, y.name or ""))

        def quantize_input(v: ir.Value) -> None:
            if plan.quantized(v) is None:
                plan.add(_QT(v, v.name or ""))

        for node in graph:
            if node in decided:
                continue
            kind = candidate(node)
            if kind is None:
                continue
            if use_selection:
                ok, why = self.selected(node)
                if not ok:
                    plan.nodes.append((node, False, why))
                    continue
            why = self._eligible(node, kind, placement)
            if why is not None:
                plan.nodes.append((node, False, why))
                continue
            if kind == "compute":
                x, w = node.inputs[0], node.inputs[1]
                quantize_input(x)
                wc = constant_array(w)
                if wc is None:  # MatMul of two activations
                    quantize_input(w)
                else:
                    plan.weights.append((node, 1, self._weight_axis(node, wc)))
                    if (placement.quantize_bias and node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2
                            and node.inputs[2] is not None):
                        b = node.inputs[2]
                        bc = constant_array(b)
                        ok_bias = bc is not None and bc.dtype == np.float32 and bc.ndim == 1
                        if node.op_type == "Gemm":
                            ok_bias = ok_bias and node.attributes.get_float("alpha", 1.0) == 1.0 \
                                and node.attributes.get_float("beta", 1.0) == 1.0
                        if ok_bias:
                            plan.biases.append((node, 2, x, 1, self._weight_axis(node, wc)))
                y = node.outputs[0]
                if node.op_type in placement.output_required or (
                        placement.quantize_outputs and any(wants_input(c) for c in y.consumers())):
                    quantize_output(node)
                plan.nodes.append((node, True, ""))
            elif kind == "qlinear":
                for v in node.inputs:
                    if v is not None:
                        quantize_input(v)
                if placement.quantize_outputs:
                    quantize_output(node)
                plan.nodes.append((node, True, ""))
            elif kind == "passthrough":
                src = plan.quantized(node.inputs[0])
                if src is None:
                    plan.nodes.append((node, False, "input not quantized (runs in float)"))
                    continue
                if placement.quantize_outputs:
                    plan.add(_QT(node.outputs[0], node.outputs[0].name or "", shared_from=src))
                plan.nodes.append((node, True, "runs on the quantized input"))
            elif kind == "embedding":
                plan.weights.append((node, 0, None))
                plan.add(_QT(node.outputs[0], "", table=node.inputs[0]))
                plan.nodes.append((node, True, "int8 table, lookup on int8"))
            else:  # removable activation not absorbed
                reason = ("symmetric activations: the zero point is not qmin" if not removable_ok
                          else "input not quantized by a single-consumer producer (runs in float)")
                plan.nodes.append((node, False, reason))

        # 16-bit: a tensor is wide when its producer or a quantized consumer matches activations16;
        # passthrough groups share one width.
        if patterns16:
            quantized_nodes = {n for n, q, _ in plan.nodes if q}

            def is16(n: ir.Node | None) -> bool:
                return n is not None and n in quantized_nodes and matches_any(n, patterns16)

            for v in plan.order:
                qt = plan.tensors[v]
                users = list(v.consumers())
                if qt.absorbs is not None:
                    users += list(qt.absorbs.outputs[0].consumers())
                qt.wide = is16(v.producer()) or any(is16(c) for c in users) or is16(qt.absorbs)
            for v in plan.order:  # a passthrough group is wide if any member is
                qt = plan.tensors[v]
                if qt.shared_from is not None and qt.wide:
                    plan.tensors[qt.shared_from].wide = True
            for v in plan.order:
                qt = plan.tensors[v]
                if qt.shared_from is not None:
                    qt.wide = plan.tensors[qt.shared_from].wide
        return plan

    @staticmethod
    def _weight_axis(node: ir.Node, w: np.ndarray) -> int | None:
        """The output-channel axis of a weight (None: per-tensor)."""
        if node.op_type == "Conv":
            return 0
        if node.op_type == "Gemm":
            return 0 if node.attributes.get_int("transB", 0) else 1
        if node.op_type == "MatMul" and w.ndim == 2:
            return 1
        return None

    # --- calibration ------------------------------------------------------------------------
    def _cache(self, data: Any) -> dict[Any, Any]:
        """The statistics/range cache: ``context["_static_ranges"]``, else kept on the
        CalibrationData object itself, because ``Pipeline.run`` hands each run a shallow copy of
        the context dict (a key added here would be lost) while the data object is shared."""
        cache = self.context.get("_static_ranges")
        if cache is None:
            cache = getattr(data, "_static_ranges", None)
            if cache is None:
                cache = {}
                try:
                    data._static_ranges = cache
                except AttributeError:
                    pass
            self.context["_static_ranges"] = cache
        return cache

    def _source_key(self) -> Any:
        src = self.options.calibration if self.options.calibration is not None else self.context.get("calibration")
        return src if isinstance(src, str) else id(src)

    def _ranges(self, model: ir.Model, plan: _Plan, placement: Placement, data: Any,
                smooth_key: tuple[Any, ...]) -> dict[tuple[str, bool], tuple[float, float]]:
        """``{(tensor, wide): (rmin, rmax)}`` for every tensor of ``plan`` with its own range."""
        o = self.options
        cache = self._cache(data)
        want_hist = o.calibrator != "minmax"
        base = (self._source_key(), o.max_batches, smooth_key)
        needed = sorted({qt.range_from for qt in plan.tensors.values() if qt.shared_from is None and qt.table is None})

        def stats_key(name: str, hist: bool) -> tuple[Any, ...]:
            return ("stats", name, "hist" if hist else "minmax", *base)

        missing = [n for n in needed
                   if stats_key(n, want_hist) not in cache and stats_key(n, True) not in cache]
        batches = 0
        if missing:
            stats: dict[str, MinMax | Histogram] = {n: Histogram() if want_hist else MinMax() for n in missing}
            for values in _stream(model, missing, data, o.max_batches, o.progress, "quantize-static: calibrating"):
                batches += 1
                for name, arr in values.items():
                    stats[name].update(arr)
            if batches == 0:
                raise CalibrationError("quantize-static: the calibration data yielded no batches")
            for n, s in stats.items():
                cache[stats_key(n, want_hist)] = s
        self.details["calibration"] = {
            "calibrator": o.calibrator, "tensors": len(needed), "collected": len(missing),
            "batches": batches, "cached": not missing,
        }
        out: dict[tuple[str, bool], tuple[float, float]] = {}
        for qt in plan.tensors.values():
            if qt.shared_from is not None or qt.table is not None:
                continue
            for wide in (False, True):
                name = qt.range_from
                s = cache.get(stats_key(name, want_hist)) or cache.get(stats_key(name, True))
                t, sym = self._act(placement, wide)
                qmin, qmax = _QRANGE[t][:2]
                calib = "minmax" if wide else o.calibrator  # 16 bits: clipping costs more than resolution
                rkey = ("range", name, calib, float(o.percentile), qmin, qmax, sym, *base)
                if rkey not in cache:
                    cache[rkey] = compute_range(s, calib, percentile=float(o.percentile), qmin=qmin,
                                                qmax=qmax, symmetric=sym)
                out[(name, wide)] = cache[rkey]
        self.count("calibrated_tensors", len(needed))
        return out

    # --- rewriting --------------------------------------------------------------------------
    def _apply(self, model: ir.Model, plan: _Plan, placement: Placement,
               ranges: dict[tuple[str, bool], tuple[float, float]]) -> None:
        graph = model.graph
        taken: set[str] = set()
        opset = model.opset_imports.get("", 0)

        def init(base: str, array: np.ndarray) -> ir.Value:
            name = unique_name(graph, base, taken)
            v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
            graph.register_initializer(v)
            return v

        def qdq_domain(wide: bool) -> str:
            if wide and opset < 21:
                model.opset_imports.setdefault("com.microsoft", 1)
                return "com.microsoft"
            return ""

        # activation parameters (roots first, then passthrough tensors sharing them)
        for v in plan.order:
            qt = plan.tensors[v]
            if qt.shared_from is not None:
                continue
            if qt.table is not None:  # same numbers as the table's own DequantizeLinear below
                _, tscale = _quantize_weight(constant_array(qt.table), None)  # type: ignore[arg-type]
                qt.params = (tscale, np.array(0, np.int8))
                qt.wide = False
                continue
            t, sym = self._act(placement, qt.wide)
            qmin, qmax, npt, _ = _QRANGE[t]
            rmin, rmax = ranges[(qt.range_from, qt.wide)]
            qt.params = _activation_params(rmin, rmax, qmin, qmax, sym, npt)
        for v in plan.order:
            qt = plan.tensors[v]
            if qt.shared_from is not None:
                qt.params = plan.tensors[qt.shared_from].params
        # what each quantized activation ended up with, for the report (and for debugging a range)
        report: dict[str, Any] = {}
        for v in plan.order:
            qt = plan.tensors[v]
            scale, zp = qt.params  # type: ignore[misc]
            rng = (None if qt.shared_from is not None or qt.table is not None
                   else [float(f"{r:.6g}") for r in ranges[(qt.range_from, qt.wide)]])
            report[v.name or ""] = {"range": rng, "scale": float(scale), "zero_point": int(zp),
                                    "bits": 16 if qt.wide else 8}
        self.details["activations"] = report

        param_values: dict[ir.Value, tuple[ir.Value, ir.Value]] = {}
        for v in plan.order:
            qt = plan.tensors[v]
            src = qt.shared_from if qt.shared_from is not None else v
            if src not in param_values:
                scale, zp = qt.params  # type: ignore[misc]
                stem = (src.name or "act").replace("/", "_")
                param_values[src] = (init(f"{stem}_scale", scale), init(f"{stem}_zero_point", zp))
            s_val, z_val = param_values[src]
            self._insert_qdq(graph, v, qt, s_val, z_val, qdq_domain(qt.wide), taken)
            self.count("qdq_pairs")

        # weights and biases
        weight_cache: dict[tuple[int, int | None], tuple[ir.Value, np.ndarray]] = {}
        w_scales: dict[tuple[int, int], np.ndarray] = {}
        for node, idx, axis in plan.weights:
            w_val = node.inputs[idx]
            assert w_val is not None
            axis = axis if self.options.per_channel else None
            key = (id(w_val), axis)
            if key not in weight_cache:
                w = constant_array(w_val)
                assert w is not None
                q, scale = _quantize_weight(w, axis)
                stem = (w_val.name or "weight").replace("/", "_")
                q_v = init(f"{stem}_quantized", q)
                s_v = init(f"{stem}_scale", scale)
                z_v = init(f"{stem}_zero_point", np.zeros(scale.shape, np.int8))
                attrs = {"axis": axis} if axis is not None else {}
                out = ir.Value(name=unique_name(graph, f"{stem}_dequantized", taken),
                               shape=w_val.shape, type=w_val.type)
                dq = ir.node("DequantizeLinear", [q_v, s_v, z_v], attrs, outputs=[out],
                             name=unique_name(graph, f"{stem}_DequantizeLinear", taken))
                graph.insert_before(graph.node(0), dq) if len(graph) else graph.append(dq)
                weight_cache[key] = (out, scale)
                self.count("weights_int8")
            out, scale = weight_cache[key]
            node.replace_input_with(idx, out)
            w_scales[(id(node), idx)] = scale
        for node, idx, x, w_idx, _axis in plan.biases:
            qx = plan.quantized(x)
            b_val = node.inputs[idx]
            wscale = w_scales.get((id(node), w_idx))
            if qx is None or b_val is None or wscale is None:
                continue
            xscale = plan.tensors[qx].params[0]  # type: ignore[index]
            b = constant_array(b_val)
            assert b is not None
            bscale = (xscale.astype(np.float32) * wscale.astype(np.float32)).astype(np.float32)
            if bscale.size == 1 and b.size != 1:
                bscale = np.full(b.shape, bscale.reshape(()), np.float32)
            if bscale.shape != b.shape:
                continue
            safe = np.where(bscale > 0, bscale, 1.0)
            bq = np.clip(np.round(b.astype(np.float64) / safe), -(2**31), 2**31 - 1).astype(np.int32)
            stem = (b_val.name or "bias").replace("/", "_")
            q_v = init(f"{stem}_quantized", bq)
            s_v = init(f"{stem}_scale", bscale)
            z_v = init(f"{stem}_zero_point", np.zeros(bscale.shape, np.int32))
            out = ir.Value(name=unique_name(graph, f"{stem}_dequantized", taken), shape=b_val.shape, type=b_val.type)
            dq = ir.node("DequantizeLinear", [q_v, s_v, z_v], {"axis": 0}, outputs=[out],
                         name=unique_name(graph, f"{stem}_DequantizeLinear", taken))
            graph.insert_before(node, dq)
            node.replace_input_with(idx, out)
            self.count("biases_int32")
        graph.sort()

    def _insert_qdq(self, graph: ir.Graph, v: ir.Value, qt: _QT, scale: ir.Value, zp: ir.Value,
                    domain: str, taken: set[str]) -> None:
        """Q(v)→DQ and every reader of ``v`` (or of the absorbed Relu's output) reads the DQ."""
        stem = (v.name or "act").replace("/", "_")
        q_out = ir.Value(name=unique_name(graph, f"{stem}_quantized", taken), shape=v.shape,
                         type=ir.TensorType(zp.dtype))  # type: ignore[arg-type]
        dq_out = ir.Value(name=unique_name(graph, f"{stem}_dequantized", taken), shape=v.shape, type=v.type)
        uses = list(v.uses())  # before the Q node becomes one
        q = ir.node("QuantizeLinear", [v, scale, zp], outputs=[q_out], domain=domain,
                    name=unique_name(graph, f"{stem}_QuantizeLinear", taken))
        dq = ir.node("DequantizeLinear", [q_out, scale, zp], outputs=[dq_out], domain=domain,
                     name=unique_name(graph, f"{stem}_DequantizeLinear", taken))
        for user, index in uses:
            user.replace_input_with(index, dq_out)
        producer = v.producer()
        if producer is not None:
            graph.insert_after(producer, [q, dq])
        else:
            graph.insert_before(graph.node(0), [q, dq])
        replaced = v
        if qt.absorbs is not None:
            relu = qt.absorbs
            replaced = relu.outputs[0]
            for user, index in list(replaced.uses()):
                user.replace_input_with(index, dq_out)
            graph.remove(relu, safe=True)
        self._take_output_name(graph, replaced, dq_out, taken)

    @staticmethod
    def _take_output_name(graph: ir.Graph, old: ir.Value, new: ir.Value, taken: set[str]) -> None:
        """If ``old`` is a graph output, ``new`` replaces it there under its name."""
        if old.is_graph_input():
            return  # a graph input passed straight through keeps its name and float value
        for i, out in enumerate(graph.outputs):
            if out is old:
                name = old.name
                old.name = unique_name(graph, f"{name}_float", taken)
                new.name = name
                graph.outputs[i] = new

    # --- SmoothQuant ------------------------------------------------------------------------
    def _smooth_quant(self, model: ir.Model, placement: Placement, data: Any) -> tuple[tuple[Any, ...], bool]:
        """Scale LayerNormalization outputs down per channel and the weights reading them up."""
        alpha = float(self.options.smooth_quant)  # type: ignore[arg-type]
        graph = model.graph
        ops = self._ops(placement)
        sites: list[tuple[ir.Node, list[ir.Node]]] = []
        skipped: list[dict[str, str]] = []
        for node in graph:
            if node.op_type not in ("MatMul", "Gemm") or node.op_type not in ops or node.domain not in ("", "ai.onnx"):
                continue
            x = node.inputs[0]
            if x is None:
                continue
            src = _through_reshapes(x)
            prod = src.producer()
            if prod is None:
                continue
            if any(prod is p for p, _ in sites) or any(s["site"] == (prod.name or "") for s in skipped):
                continue
            why = _smooth_reason(prod, src, x, graph)
            if why is None:
                readers = list(x.consumers())
                for r in readers:
                    ok, sel_why = self.selected(r)
                    if not ok:
                        why = f"reader {r.name} not quantized ({sel_why})"
                        break
            if why is not None:
                skipped.append({"site": prod.name or "", "reason": why})
                continue
            sites.append((prod, list(x.consumers())))
        self.details["smooth_quant"] = {"alpha": alpha, "applied": [p.name for p, _ in sites], "skipped": skipped}
        if not sites:
            return ("smooth", alpha, ()), False
        names = [p.outputs[0].name or "" for p, _ in sites]
        cache = self._cache(data)
        key = ("smooth-stats", self._source_key(), self.options.max_batches, tuple(names))
        if key not in cache:
            stats = {n: ChannelAbsMax() for n in names}
            for values in _stream(model, names, data, self.options.max_batches, self.options.progress,
                                  "quantize-static: smoothing"):
                for n, arr in values.items():
                    stats[n].update(arr)
            cache[key] = {n: s.values for n, s in stats.items()}
        act_max = cache[key]
        taken: set[str] = set()
        for prod, readers in sites:
            a = act_max[prod.outputs[0].name or ""]
            if a is None:
                continue
            ws = [constant_array(r.inputs[1]) for r in readers]
            # weight rows indexed by input channel: MatMul [K,N]; Gemm transB=1 [N,K]
            rows = [np.abs(w.T if (r.op_type == "Gemm" and r.attributes.get_int("transB", 0)) else w).max(axis=1)
                    for r, w in zip(readers, ws)]  # type: ignore[union-attr]
            wmax = np.maximum.reduce(rows)
            s = np.power(np.maximum(a, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1.0 - alpha)
            s = np.clip(s, 1e-4, 1e4).astype(np.float32)
            for i in _smooth_params(prod) or []:
                arr = constant_array(prod.inputs[i])
                prod.replace_input_with(i, _new_init(graph, f"{prod.inputs[i].name}_smooth",
                                                     (arr / s).astype(arr.dtype), taken))
            for r, w in zip(readers, ws):
                transb = r.op_type == "Gemm" and r.attributes.get_int("transB", 0)
                scaled = w * (s[None, :] if transb else s[:, None])  # type: ignore[index]
                r.replace_input_with(1, _new_init(graph, f"{r.inputs[1].name}_smooth", scaled.astype(w.dtype), taken))
            self.count("smooth_quant_sites")
        return ("smooth", alpha, tuple(names)), True


def _stream(model: ir.Model, names: list[str], data: Any, limit: int | None, progress: bool | None,
            description: str) -> Any:
    """``stream_tensors`` with ONNX Runtime's errors on a batch (wrong shape or dtype) turned into a
    CalibrationError that says which batch and what to fix."""
    it = stream_tensors(model, names, data, limit=limit, progress=progress, description=description)
    i = 0
    while True:
        try:
            values = next(it)
        except StopIteration:
            return
        except CalibrationError:
            raise
        except Exception as e:  # onnxruntime's InvalidArgument / Fail on a batch
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CalibrationError(
                f"quantize-static: the model cannot run calibration batch {i} ({msg}); make the arrays' "
                "shapes and dtypes match the model's inputs") from None
        yield values
        i += 1


def _new_init(graph: ir.Graph, base: str, array: np.ndarray, taken: set[str]) -> ir.Value:
    name = unique_name(graph, base, taken)
    v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                 const_value=ir.tensor(array, name=name))
    graph.register_initializer(v)
    return v


def _through_reshapes(x: ir.Value) -> ir.Value:
    """Walk up single-consumer Reshapes that keep the last (channel) axis (GPT-2's Conv1D
    flattens ``[B, S, C]`` to ``[B*S, C]`` before its Gemm)."""
    v = x
    while True:
        p = v.producer()
        if p is None or p.op_type != "Reshape" or p.domain not in ("", "ai.onnx") or not p.inputs:
            return v
        src = p.inputs[0]
        if src is None or src.shape is None or v.shape is None or len(src.shape) == 0 or len(v.shape) == 0:
            return v
        last_in, last_out = src.shape[-1], v.shape[-1]
        if not isinstance(last_in, int) or last_in != last_out or len(list(src.uses())) != 1:
            return v
        v = src


_NORMS = {("", "LayerNormalization"), ("", "RMSNormalization"), ("com.microsoft", "SimplifiedLayerNormalization"),
          ("", "SimplifiedLayerNormalization")}


def _smooth_params(prod: ir.Node) -> list[int] | None:
    """Inputs of ``prod`` holding per-channel constants that a division by ``s`` can absorb:
    a normalization's scale (and bias), or the constant operand of ``Mul(x, gamma)`` (the last op of
    a decomposed RMSNorm, as Llama exports)."""
    domain = "" if prod.domain == "ai.onnx" else prod.domain
    if (domain, prod.op_type) in _NORMS:
        return [i for i in (1, 2) if len(prod.inputs) > i and prod.inputs[i] is not None]
    if prod.op_type == "Mul" and domain == "" and len(prod.inputs) == 2:
        consts = [i for i in (0, 1) if constant_array(prod.inputs[i]) is not None]
        return consts if len(consts) == 1 else None
    return None


def _smooth_reason(prod: ir.Node, ln_out: ir.Value, x: ir.Value, graph: ir.Graph) -> str | None:
    """Why the producer of a MatMul input cannot absorb a per-channel division (None if it can)."""
    params = _smooth_params(prod)
    if params is None:
        return f"producer {prod.op_type} has no per-channel constant scale to fold into"
    if prod.op_type != "Mul" and prod.attributes.get_int("axis", -1) != -1 and not (
            ln_out.shape is not None and prod.attributes.get_int("axis", -1) == len(ln_out.shape) - 1):
        return f"{prod.op_type} does not normalize the last axis"
    if len(prod.outputs) > 1 and any(o is not None and o.consumers() for o in prod.outputs[1:]):
        return f"{prod.op_type}'s extra outputs are used"
    channels = ln_out.shape[-1] if ln_out.shape is not None and len(ln_out.shape) else None
    if not isinstance(channels, int):
        return "channel count unknown"
    scale = None
    for i in params:
        arr = constant_array(prod.inputs[i])
        if arr is None or arr.dtype != np.float32 or arr.shape[-1:] != (channels,) or arr.size != channels:
            return f"{prod.op_type} input {i} is not a per-channel float32 constant"
        scale = arr
    if scale is None:
        return f"{prod.op_type} has no scale"
    if x in graph.outputs or ln_out in graph.outputs:
        return f"{prod.op_type} output is a graph output"
    if ln_out is not prod.outputs[0]:
        return f"not the {prod.op_type}'s first output"
    for r in x.consumers():
        if r.op_type not in ("MatMul", "Gemm") or r.inputs[0] is not x or len(r.inputs) < 2:
            return f"output also read by {r.op_type} {r.name}"
        w = constant_array(r.inputs[1])
        if w is None or w.ndim != 2 or w.dtype != np.float32:
            return f"{r.name} weight is not a 2-D float32 constant"
        if r.op_type == "Gemm" and r.attributes.get_int("transA", 0):
            return f"{r.name} has transA=1"
        transb = r.op_type == "Gemm" and r.attributes.get_int("transB", 0)
        k = w.shape[1] if transb else w.shape[0]
        if k != channels:
            return f"{r.name} weight does not match the channel count"
    return None


def _activation_params(rmin: float, rmax: float, qmin: int, qmax: int, symmetric: bool,
                       npt: type) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32 scalar, zero point scalar) from a range that always includes 0."""
    rmin, rmax = min(float(rmin), 0.0), max(float(rmax), 0.0)
    if symmetric:
        amax = max(-rmin, rmax)
        half = (qmax - qmin) // 2
        scale = amax / half if amax > 0 else 1.0
        zp = 0 if qmin < 0 else (qmax + 1) // 2
    else:
        scale = (rmax - rmin) / (qmax - qmin) if rmax > rmin else 1.0
        zp = int(np.clip(round(qmin - rmin / scale), qmin, qmax))
    scale = max(scale, 1e-12)
    return np.array(scale, np.float32), np.array(zp, npt)


def _quantize_weight(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 in [-127, 127], per channel along ``axis`` (or per tensor)."""
    w64 = w.astype(np.float64)
    if axis is None:
        amax = np.array(np.abs(w64).max() if w64.size else 0.0)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.round(w64 / scale.astype(np.float64)), -127, 127).astype(np.int8)
        return q, scale
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w64).max(axis=reduce_axes) if w64.size else np.zeros(w.shape[axis])
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w64 / scale.astype(np.float64).reshape(shape)), -127, 127).astype(np.int8)
    return q, scale

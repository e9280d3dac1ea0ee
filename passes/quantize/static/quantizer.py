"""The ``quantize-static`` pass: optional SmoothQuant, then plan over every candidate (to
calibrate once for all later runs), calibrate, plan with include/exclude, and rewrite."""

from __future__ import annotations

from typing import Any, ClassVar

import onnx_ir as ir

from graphopt.calibration import CalibrationError
from graphopt.errors import PassFailedError, PipelineError

from ...ir_helpers import infer_shapes, model_opset
from ...opset import UpgradeOpsetPass
from ..base import QuantizePassBase
from .calibrate import ranges
from .expand import expand_functions
from .options import StaticOptions, check_options
from .plan import plan_graph
from .rewrite import apply
from .run import Run
from .select import choose_calibrator
from .smooth import smooth_quant

__all__ = ["QuantizeStaticPass"]


class QuantizeStaticPass(QuantizePassBase):
    """Static int8 QDQ quantization with calibration (per-channel int8 weights, int32 biases,
    uint8/int8/16-bit activations) placed so the backend fuses the groups into integer kernels.
    Needs calibration data (``calibration=`` / ``--calibration``)."""

    name = "quantize-static"
    modes: ClassVar[dict[str, dict[str, Any]]] = {"static": {}}
    Options = StaticOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        placement = check_options(self.options)
        data = self.calibration_data()
        if data is None:
            raise CalibrationError(
                "quantize-static needs calibration data: pass calibration=<.npz, folder or list of feed "
                "dicts> to optimize() (CLI: --calibration FILE), or the pass option calibration=PATH"
            )
        upgraded, per_axis = self._qdq_opset(model)
        expanded = expand_functions(model.graph, placement.expand)
        if expanded:
            self.count("expanded_functions", expanded)
        modified = infer_shapes(model) or upgraded or bool(expanded)
        run = Run(model, self.options, placement, data, self.context, self.details, self.count, self.selected)
        run.per_axis = per_axis
        smooth_key: tuple[Any, ...] = ()
        if self.options.smooth_quant is not None:
            smooth_key, changed = smooth_quant(run)
            modified = modified or changed

        # Plan over every candidate (selection ignored) to calibrate once for all later runs,
        # then the plan that honours include/exclude.
        full = plan_graph(run, use_selection=False)
        calibrator = self.options.calibrator
        if calibrator == "auto" and (full.tensors or full.weights):
            calibrator = choose_calibrator(run, full, smooth_key)
        calibrator = "mse" if calibrator == "auto" else calibrator
        act_ranges = ranges(run, full, smooth_key, calibrator)
        plan = plan_graph(run, use_selection=True)
        # A pass-through tensor (MaxPool, Reshape) shares its input's parameters in the full plan;
        # with a selection (one layer, for sensitivity) its input may stay float and it needs a
        # range of its own: calibrate what is missing (the statistics cache keeps the rest).
        own = {
            (qt.range_from, w)
            for qt in plan.tensors.values()
            if qt.shared_from is None and qt.table is None
            for w in (False, True)
        }
        if not own <= act_ranges.keys():
            act_ranges = {**act_ranges, **ranges(run, plan, smooth_key, calibrator)}
        for node, quantized, reason in plan.nodes:
            self.decide(node, quantized, reason)
        if not plan.tensors and not plan.weights:
            return ir.passes.PassResult(model, modified)
        apply(run, plan, act_ranges)
        return ir.passes.PassResult(model, True)

    def _qdq_opset(self, model: ir.Model) -> tuple[bool, bool]:
        """Bring a model below opset 13 to where per-channel QDQ exists: (upgraded, per_axis).

        QuantizeLinear/DequantizeLinear have an ``axis`` (per-channel weights) only from opset 13,
        and per-channel weights are what keeps depthwise convolutions accurate, so the model is
        upgraded to 13 (the ONNX converter's adapters, checked by ``upgrade-opset``). When the
        converter cannot (an op without an adapter, a subgraph), an opset-10..12 model keeps its
        opset and its weights are quantized per tensor (QDQ exists from opset 10); below 10 there
        is no QDQ at all."""
        opset = model_opset(model)
        if opset >= 13:
            return False, True
        try:
            UpgradeOpsetPass(version=13)(model)
        except PassFailedError as e:
            if opset < 10:
                raise PipelineError(
                    f"quantize-static: the model's opset {opset} has no QuantizeLinear and cannot be "
                    f"upgraded ({e}); convert it to opset 13 or newer first"
                ) from None
            self.details["opset"] = {"from": opset, "to": opset, "per_tensor_weights": str(e)}
            self.count("per_tensor_weights_old_opset")
            return False, False
        self.details["opset"] = {"from": opset, "to": model_opset(model)}
        self.count("opset_upgraded_from", opset)
        return True, True

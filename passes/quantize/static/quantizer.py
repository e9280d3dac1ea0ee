"""The ``quantize-static`` pass: optional SmoothQuant, then plan over every candidate (to
calibrate once for all later runs), calibrate, plan with include/exclude, and rewrite."""

from __future__ import annotations

from typing import Any, ClassVar

import onnx_ir as ir

from graphopt.calibration import CalibrationError
from graphopt.errors import PipelineError

from ...ir_helpers import infer_shapes
from ..base import QuantizePassBase
from .calibrate import ranges
from .options import StaticOptions, check_options
from .plan import plan_graph
from .rewrite import apply
from .run import Run
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
        opset = model.opset_imports.get("", model.graph.opset_imports.get("", 0))
        if opset < 13:
            raise PipelineError(
                f"quantize-static needs opset >= 13 (per-axis QDQ); the model has {opset}: "
                "run the upgrade-opset pass first"
            )
        modified = infer_shapes(model)
        run = Run(model, self.options, placement, data, self.context, self.details, self.count, self.selected)
        smooth_key: tuple[Any, ...] = ()
        if self.options.smooth_quant is not None:
            smooth_key, changed = smooth_quant(run)
            modified = modified or changed

        # Plan over every candidate (selection ignored) to calibrate once for all later runs,
        # then the plan that honours include/exclude.
        full = plan_graph(run, use_selection=False)
        act_ranges = ranges(run, full, smooth_key)
        plan = plan_graph(run, use_selection=True)
        for node, quantized, reason in plan.nodes:
            self.decide(node, quantized, reason)
        if not plan.tensors and not plan.weights:
            return ir.passes.PassResult(model, modified)
        apply(run, plan, act_ranges)
        return ir.passes.PassResult(model, True)

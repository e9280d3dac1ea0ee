"""The ``quantize-dynamic`` pass: plan every candidate on the float graph, decide the probe-driven
choices and the weights' rounding, then apply the transforms and lower each plan."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import onnx_ir as ir

from graphopt.errors import PipelineError

from ...ir_helpers import MS_DOMAIN, infer_shapes, model_opset
from ..base import QuantizePassBase
from .emit_attention import emit_mha, emit_qattention
from .emit_gather import emit_gather
from .emit_matmul import emit_matmul
from .emit_per_token import plan_zero_columns
from .gptq import apply_gptq
from .options import DynamicOptions, check_options
from .plan import Plan, candidates, decide_per_token, drop_outliers, per_token_for, plan_node
from .probe import probe
from .run import Run
from .summary import weight_summary
from .transforms import (
    apply_center,
    apply_smooth,
    apply_split,
    decide_copies,
    decide_levels,
    decide_smooth,
    decide_split,
)
from .unfuse import unfuse_matmuls

__all__ = ["QuantizeDynamicPass"]

logger = logging.getLogger("graphopt.passes.quantize.dynamic")


class QuantizeDynamicPass(QuantizePassBase):
    """Dynamic int8 quantization (ORT CPU): int8 per-channel weights, uint8 activations at run time.

    MatMul/Gemm with constant weights → DynamicQuantizeMatMul (bias fused); packed-QKV Attention →
    QAttention. Safe on any model: nodes whose weight is not constant or not float32 stay in float,
    with the reason in the report. Conv stays float (ORT's ConvInteger ran slower than its float
    Conv on the suite's CNNs): the report's ``summary`` says how much of the weights were quantized,
    and its ``notice`` (printed by the CLI) names the mode that would help when under half were.
    Run it after ``fuse`` on ort-cpu.
    """

    name: ClassVar[str] = "quantize-dynamic"
    modes: ClassVar[dict[str, dict[str, Any]]] = {"dynamic": {}}
    Options: ClassVar[type] = DynamicOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        check_options(self.options)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o = self.options
        calibration = self.calibration_data()
        if o.method == "gptq" and calibration is None:
            raise PipelineError(
                "quantize-dynamic: method=gptq needs calibration data (calibration=...); "
                "use method=rtn or auto without it"
            )
        run = Run(
            model, o, self.count, self.decide, self.details, calibration=calibration, opset=model_opset(model)
        )
        # Shapes first when some candidate's input has none (a pipeline of this pass alone).
        inferred = any(
            n.inputs and n.inputs[0] is not None and n.inputs[0].shape is None
            for n in candidates(model.graph, o.op_types)
        ) and infer_shapes(model)
        unfused = "MatMul" in o.op_types and unfuse_matmuls(run, lambda n: self.selected(n)[0]) > 0
        self._plan(run)
        use_gptq = self._decide(run)
        summary, notice = weight_summary(model, run.plans, self.decisions, o.op_types)
        self.details["summary"] = summary
        if notice is not None:
            self.details["notice"] = notice
            logger.info("%s", notice)
        modified = self._apply(run, use_gptq) or inferred or unfused
        if modified:
            _ensure_opset(model, MS_DOMAIN, 1)
        return ir.passes.PassResult(model, modified)

    def _plan(self, run: Run) -> None:
        """Check every candidate (the reason in the report for those that stay float)."""
        for node in candidates(run.graph, run.options.op_types):
            ok, reason = self.selected(node)
            if not ok:
                self.decide(node, False, reason)
                continue
            plan, reason = plan_node(run, node)
            if plan is None:
                self.decide(node, False, reason)
                continue
            run.plans.append(plan)
        for plan in run.plans:  # decided on the float graph, before smoothing and splitting edit it
            if plan.node.op_type in ("MatMul", "Gemm"):
                plan.per_token = plan.can_per_token and per_token_for(
                    run.options.activations, plan.node.inputs[0]
                )

    def _decide(self, run: Run) -> bool:
        """The probe-driven choices for each plan; returns whether the weights get GPTQ."""
        o = run.options
        if run.plans and (
            o.outlier_ratio > 0
            or o.smooth > 0
            or o.outlier_channels > 0
            or o.center
            or o.activations == "auto"
        ):
            names = sorted({p.node.inputs[0].name for p in run.plans if p.node.op_type != "Gather"})
            used: dict[str, Any] = {}
            run.stats = probe(
                run.model,
                names,
                run.calibration,
                o.probe_batches,
                run.ranges,
                run.token_ratio,
                o.probe_length,
                used,
            )
            self.details["probe"] = used
            if o.activations == "auto" and run.stats is not None:
                decide_per_token(run)
            if run.stats is None:
                self.count("probe:failed")
            else:
                if o.outlier_ratio > 0:
                    drop_outliers(run)
                if o.smooth > 0:
                    decide_smooth(run)
                if o.outlier_channels > 0:
                    decide_split(run)
                if o.activations != "per-tensor":
                    decide_levels(run)
                    if run.calibration is not None:
                        # Generated tokens do not make the massive activations real text does, so
                        # the split would be sized for the wrong tokens (no gain without real data).
                        decide_copies(run)
        use_gptq = o.method == "gptq" or (
            o.method == "auto" and run.calibration is not None and o.per_channel and o.symmetric
        )
        self.details["weights"] = "gptq" if use_gptq and run.plans else "rtn"
        self.details["activations"] = o.activations
        return use_gptq

    def _apply(self, run: Run, use_gptq: bool) -> bool:
        """Quantize the weights, apply the transforms, lower every plan; returns whether any was."""
        if use_gptq and run.plans:
            apply_gptq(run)  # on the float graph, before it is edited
        apply_smooth(run)
        apply_center(run)
        apply_split(run)
        run.zero_columns = plan_zero_columns(run)
        for plan in run.plans:
            _lower(run, plan)
            self.decide(plan.node, True, "")
        return bool(run.plans)


def _lower(run: Run, plan: Plan) -> None:
    """Replace ``plan.node`` by its int8 form."""
    node = plan.node
    if node.op_type == "Gather":
        emit_gather(run, node, plan.weight)
    elif node.op_type in ("MatMul", "Gemm"):
        add = plan.bias_add
        emit_matmul(
            run,
            plan,
            plan.bias,
            add.outputs[0] if add is not None else node.outputs[0],
            [add] if add is not None else [],
        )
    elif plan.per_token:
        assert plan.bias is not None
        emit_mha(run, node, plan, plan.bias, plan.attention_bias)
    else:
        assert plan.bias is not None
        emit_qattention(run, node, node.inputs[0], plan, plan.bias, plan.mask, plan.mask_plan)


def _ensure_opset(model: ir.Model, domain: str, version: int) -> None:
    if domain not in model.opset_imports:
        model.opset_imports[domain] = version
    if domain not in model.graph.opset_imports:
        model.graph.opset_imports[domain] = version

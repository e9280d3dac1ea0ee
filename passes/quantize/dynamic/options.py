"""Options of ``quantize-dynamic`` and their checks."""

from __future__ import annotations

import dataclasses
from typing import Literal

from graphopt.errors import PipelineError

from ..base import CommonOptions

__all__ = ["DEFAULT_OP_TYPES", "OP_TYPES", "DynamicOptions", "check_options"]

OP_TYPES = ("MatMul", "Gemm", "Attention", "Gather")
#: Gather (embedding tables) is opt-in: it shrinks the file (a small encoder's vocabulary table is
#: about half its bytes) but costs accuracy and gains no latency.
DEFAULT_OP_TYPES = ("MatMul", "Gemm", "Attention")


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclasses.dataclass
class DynamicOptions(CommonOptions):
    per_channel: bool = dataclasses.field(
        default=True, metadata=_doc("one weight scale per output channel (else one per tensor)")
    )
    symmetric: bool = dataclasses.field(
        default=True, metadata=_doc("symmetric int8 weights (zero point 0); else asymmetric")
    )
    reduce_range: bool = dataclasses.field(
        default=False, metadata=_doc("7-bit weights: avoids int16 saturation on x86 CPUs without VNNI")
    )
    op_types: list[str] = dataclasses.field(
        default_factory=lambda: list(DEFAULT_OP_TYPES),
        metadata=_doc("op types to quantize: MatMul, Gemm, Attention, Gather (embedding tables)"),
    )
    min_size: int = dataclasses.field(
        default=1024, metadata=_doc("leave weights with fewer elements than this in float")
    )
    smooth: float = dataclasses.field(
        default=0.5,
        metadata=_doc(
            "SmoothQuant migration strength alpha in [0, 1): divide each input channel by "
            "s = max|x|^a / max|w|^(1-a) (probed) and fold s into the weight; 0 = off"
        ),
    )
    outlier_channels: float = dataclasses.field(
        default=6.0,
        metadata=_doc(
            "input channels (of inputs that are not norm outputs) whose probed max exceeds "
            "this many times the median channel's are computed in float; 0 = off"
        ),
    )
    max_outlier_channels: int = dataclasses.field(
        default=16, metadata=_doc("at most this many float outlier channels per input")
    )
    outlier_ratio: float = dataclasses.field(
        default=0.0,
        metadata=_doc(
            "keep in float MatMuls whose input range / typical magnitude exceeds this "
            "(probe run); 0 turns the check off"
        ),
    )
    probe_batches: int = dataclasses.field(
        default=32,
        metadata=_doc(
            "without calibration data: how many generated inputs the probe runs (it sets "
            "smoothing, centering, outlier channels and per-token choices)"
        ),
    )
    probe_length: int = dataclasses.field(
        default=64,
        metadata=_doc(
            "without calibration data: the size given to the generated inputs' symbolic "
            "non-batch dims (sequence length); longer inputs show a trained model's "
            "massive-activation tokens more reliably (see "
            "benchmarks/results/quantize_dynamic.md)"
        ),
    )
    activations: Literal["auto", "per-token", "per-tensor"] = dataclasses.field(
        default="auto",
        metadata=_doc(
            "per-token: one 8-bit scale per row (token) of each activation, computed in the graph (ReduceMax, "
            "Div, QuantizeLinear → MatMulIntegerToFloat → Mul; attention as int8 QKV + MultiHeadAttention); "
            "per-tensor: one scale per tensor (DynamicQuantizeMatMul / QAttention: fewer nodes, much less "
            "accurate on trained transformers); auto: per-token where the probe finds a few tokens setting "
            "the range (see token_outlier_ratio), per-tensor elsewhere"
        ),
    )
    asymmetric: bool = dataclasses.field(
        default=True,
        metadata=_doc(
            "per-token inputs made by a normalization get asymmetric levels (the row's own range, "
            "a zero point per row that the int8 kernel takes as a few extra columns); false: "
            "symmetric levels after per-channel centering (fewer nodes, about twice the activation error)"
        ),
    )
    token_outlier_ratio: float = dataclasses.field(
        default=2.0,
        metadata=_doc(
            "activations=auto: an input is quantized per token when its probed largest token maximum "
            "exceeds this many times the median token's (trained transformers' norm outputs carry a few "
            "massive-activation tokens well above it; random-weight models mostly stay below)"
        ),
    )
    center: bool = dataclasses.field(
        default=True,
        metadata=_doc(
            "per-token inputs made by a normalization or an attention op are shifted per channel to the "
            "middle of their probed range before quantization, so each token's values are about "
            "symmetric (int8 levels are symmetric); the shift comes back exactly through the bias "
            "(folded into the norm's shift or the attention's V bias where possible, else one Add)"
        ),
    )
    channel_copies: int = dataclasses.field(
        default=16,
        metadata=_doc(
            "asymmetric per-token inputs: a channel whose (smoothed) probed maximum exceeds 1.5x the "
            "8th largest is divided by c and appended c−1 more times, its weight row repeated "
            "(outlier channel splitting: the same product, a c times smaller row range for tokens "
            "where that channel is massive); with calibration data only; at most this many extra "
            "columns per input, 0 = off"
        ),
    )
    method: Literal["auto", "rtn", "gptq"] = dataclasses.field(
        default="auto",
        metadata=_doc(
            "weight rounding: rtn (round to nearest) or gptq (error compensation "
            "from the calibration data's activations); auto = gptq when the "
            "pipeline has calibration data"
        ),
    )
    damp: float = dataclasses.field(
        default=0.01, metadata=_doc("GPTQ dampening, as a fraction of the Hessian's mean diagonal")
    )
    hessian_memory_mb: int = dataclasses.field(
        default=1024,
        metadata=_doc("GPTQ: most memory for the Hessians held at once (more: more calibration runs)"),
    )


def check_options(o: DynamicOptions) -> None:
    """Raise a PipelineError for option values the pass cannot run with."""
    bad = sorted(set(o.op_types) - set(OP_TYPES))
    if bad:
        raise PipelineError(f"quantize-dynamic: unknown op_types {bad}; use some of {list(OP_TYPES)}")
    if o.min_size < 0:
        raise PipelineError("quantize-dynamic: min_size must be >= 0")
    if o.outlier_ratio < 0:
        raise PipelineError("quantize-dynamic: outlier_ratio must be >= 0 (0 turns the check off)")
    if not 0 <= o.smooth < 1:
        raise PipelineError("quantize-dynamic: smooth must be in [0, 1) (0 turns smoothing off)")
    if o.outlier_channels < 0 or o.max_outlier_channels < 0:
        raise PipelineError(
            "quantize-dynamic: outlier_channels and max_outlier_channels must be >= 0 (0 = off)"
        )
    if o.probe_batches < 1:
        raise PipelineError("quantize-dynamic: probe_batches must be >= 1")
    if o.probe_length < 1:
        raise PipelineError("quantize-dynamic: probe_length must be >= 1")
    if o.method == "gptq" and not (o.per_channel and o.symmetric):
        raise PipelineError("quantize-dynamic: method=gptq needs per_channel=true and symmetric=true")
    if o.damp <= 0 or o.hessian_memory_mb < 1:
        raise PipelineError("quantize-dynamic: damp must be > 0 and hessian_memory_mb >= 1")

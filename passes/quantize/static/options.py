"""Options of ``quantize-static`` and their checks."""

from __future__ import annotations

import dataclasses

from graphopt.errors import PipelineError

from ..base import CommonOptions
from ..calibrators import CALIBRATORS
from .placement import PLACEMENTS, Placement

__all__ = ["STATIC_CALIBRATORS", "StaticOptions", "check_options"]

#: The calibrators of :mod:`..calibrators`, and ``auto``, which picks one per model (:mod:`.select`).
STATIC_CALIBRATORS = ("auto", *CALIBRATORS)


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclasses.dataclass
class StaticOptions(CommonOptions):
    calibrator: str = dataclasses.field(
        default="auto",
        metadata=_doc(
            f"how ranges are chosen: {', '.join(STATIC_CALIBRATORS)} (auto: mse, minmax or percentile, "
            "whichever keeps the model's outputs on the calibration data closest to the float model's; "
            "mse alone clips rare large values a later layer may depend on)"
        ),
    )
    percentile: float = dataclasses.field(
        default=99.999, metadata=_doc("percentile calibrator: keep this share of each tail")
    )
    activation_type: str = dataclasses.field(
        default="uint8", metadata=_doc("uint8 (ONNX Runtime CPU runs u8s8 fastest) or int8")
    )
    activation_symmetric: bool = dataclasses.field(
        default=False, metadata=_doc("symmetric activation ranges (zero point at the middle)")
    )
    per_channel: bool = dataclasses.field(default=True, metadata=_doc("per-channel int8 weights"))
    activations16: list[str] = dataclasses.field(
        default_factory=list,
        metadata=_doc("nodes (names, patterns, op types) whose activations get 16-bit QDQ"),
    )
    op_types: list[str] = dataclasses.field(
        default_factory=list, metadata=_doc("quantize only these op types (default: the placement's)")
    )
    max_batches: int | None = dataclasses.field(
        default=None, metadata=_doc("calibrate on at most this many batches")
    )
    progress: bool | None = dataclasses.field(
        default=None, metadata=_doc("progress bar while calibrating (default: on a terminal only)")
    )
    placement: str = dataclasses.field(
        default="ort-cpu", metadata=_doc(f"Q/DQ placement rules: {', '.join(PLACEMENTS)}")
    )
    embeddings: bool = dataclasses.field(
        default=False,
        metadata=_doc(
            "store constant lookup tables (Gather: embeddings) as per-tensor int8 too: a smaller "
            "file, but one scale per table, and ONNX Runtime 1.32 CPU dequantizes the table on "
            "every run instead of gathering int8 (measured on BERT)"
        ),
    )
    smooth_quant: float | None = dataclasses.field(
        default=None,
        metadata=_doc(
            "SmoothQuant alpha (e.g. 0.5): move activation outliers into MatMul/Gemm weights "
            "where a LayerNormalization's scale/bias can absorb the inverse scale"
        ),
    )


def check_options(o: StaticOptions) -> Placement:
    """Raise a PipelineError for option values the pass cannot run with; the placement to use."""
    if o.placement not in PLACEMENTS:
        raise PipelineError(
            f"quantize-static: placement must be one of {', '.join(PLACEMENTS)}, not {o.placement!r}"
        )
    if o.calibrator not in STATIC_CALIBRATORS:
        raise PipelineError(
            f"quantize-static: calibrator must be one of {', '.join(STATIC_CALIBRATORS)}, not {o.calibrator!r}"
        )
    if o.activation_type not in ("uint8", "int8"):
        raise PipelineError(
            f"quantize-static: activation_type must be uint8 or int8, not {o.activation_type!r}"
        )
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
            raise PipelineError(
                f"quantize-static: op_types {unknown} are not quantizable with placement "
                f"{placement.name} (choose from {', '.join(placement.op_types)})"
            )
    return placement

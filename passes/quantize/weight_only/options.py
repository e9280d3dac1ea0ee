"""Options of ``quantize-weight-only`` and their checks."""

from __future__ import annotations

import dataclasses
from typing import Literal

from graphopt.errors import PipelineError

from ..base import CommonOptions

__all__ = ["WeightOnlyOptions", "check_options"]


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclasses.dataclass
class WeightOnlyOptions(CommonOptions):
    """Options of ``quantize-weight-only``."""

    bits: int = dataclasses.field(
        default=4, metadata=_doc("weight bits: 4 (mode int4) or 8 (mode int8-weight)")
    )
    block_size: int = dataclasses.field(
        default=32, metadata=_doc("weights per scale along K: a power of two >= 16 (smaller = more accurate)")
    )
    symmetric: bool = dataclasses.field(
        default=True, metadata=_doc("True: no zero points; False: per-block zero points (asymmetric)")
    )
    block_offsets: Literal["off", "on-grid"] = dataclasses.field(
        default="off",
        metadata=_doc(
            "on-grid: a MatMul weight that already lies on a grid with a float minimum per block "
            "(a GGUF Q4_1-style source) keeps it exactly, its offsets run as extra K columns read "
            "against the input's block sums (not for a table an embedding reads); off: none"
        ),
    )
    accuracy_level: int = dataclasses.field(
        default=4,
        metadata=_doc(
            "MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute (fastest on CPU)"
        ),
    )
    method: Literal["auto", "rtn", "gptq", "awq", "awq-gptq"] = dataclasses.field(
        default="auto",
        metadata=_doc(
            "rtn (no data); with calibration data: gptq, awq (scales folded into the "
            "preceding norm, then rtn), awq-gptq (both); auto: gptq with data else rtn"
        ),
    )
    min_size: int = dataclasses.field(
        default=4096, metadata=_doc("leave weights with fewer than this many elements (K*N) in float")
    )
    quantize_embeddings: bool = dataclasses.field(
        default=True, metadata=_doc("Gather on a [vocab, hidden] constant -> GatherBlockQuantized")
    )
    lm_head: bool = dataclasses.field(
        default=True,
        metadata=_doc(
            "quantize a MatMul/Gemm whose result is a graph output (the LM head); False keeps it float"
        ),
    )
    damp: float = dataclasses.field(
        default=0.01, metadata=_doc("gptq: dampening added to H's diagonal, as a fraction of its mean")
    )
    gptq_min_tokens: float = dataclasses.field(
        default=1.0,
        metadata=_doc(
            "gptq: calibration tokens needed per input channel (K); a weight with fewer "
            "gets RTN (its X^T X is rank-deficient and GPTQ would overfit)"
        ),
    )
    tied_gptq: bool = dataclasses.field(
        default=False,
        metadata=_doc(
            "gptq: also GPTQ a table tied between the embedding and the LM head (the embedding "
            "then reads rows fitted to the LM head's input); False: RTN for it, as for any embedding"
        ),
    )
    act_order: bool = dataclasses.field(
        default=False, metadata=_doc("gptq: quantize columns by decreasing H diagonal (static groups)")
    )
    scale_search: bool = dataclasses.field(
        default=False,
        metadata=_doc(
            "per block, try clipping the range (ratios 1.0..0.75) and keep the scale "
            "with the least rounding error; False: plain full-range RTN"
        ),
    )
    int8_budget: float = dataclasses.field(
        default=0.0,
        metadata=_doc(
            "mixed precision: extra bytes for 8-bit weights, as a fraction of the all-`bits` "
            "size; weights are promoted in order of measured sensitivity per extra byte (0: none)"
        ),
    )
    mixed_batches: int = dataclasses.field(
        default=2,
        metadata=_doc(
            "mixed precision: input batches the sensitivity is measured on (calibration data, "
            "else generated inputs)"
        ),
    )
    mixed_outputs: list[str] | None = dataclasses.field(
        default=None,
        metadata=_doc(
            "mixed precision: the outputs whose error is the sensitivity (None: all float outputs)"
        ),
    )
    mixed_siblings: bool = dataclasses.field(
        default=True,
        metadata=_doc(
            "mixed precision: promote the weights that read one input (Q/K/V, gate/up) together, "
            "so that they still run as one packed product"
        ),
    )
    mixed_metric: Literal["relative-mse", "kl"] = dataclasses.field(
        default="relative-mse",
        metadata=_doc(
            "mixed precision: the outputs' error, relative squared error or (outputs that are "
            "logits) KL divergence of their softmax from the float model's"
        ),
    )
    calibration_batches: int | None = dataclasses.field(
        default=None, metadata=_doc("gptq: use at most this many calibration batches (None: all)")
    )
    sequential: bool = dataclasses.field(
        default=True,
        metadata=_doc(
            "gptq: calibrate the weights of each input activation on the model with the "
            "earlier weights already quantized (one calibration run each; False: one "
            "run, all from the float model)"
        ),
    )
    awq_grid: int = dataclasses.field(
        default=11,
        metadata=_doc("awq: exponents tried for the channel scales, evenly in [0, 1] (0 = no scaling)"),
    )
    awq_tokens: int = dataclasses.field(
        default=512, metadata=_doc("awq: calibration rows kept per activation to score the exponents")
    )
    awq_min_gain: float = dataclasses.field(
        default=0.05,
        metadata=_doc(
            "awq: keep a layer unscaled unless scaling cuts its output error on the kept "
            "rows by at least this fraction"
        ),
    )
    hessian_memory_mb: int = dataclasses.field(
        default=1024,
        metadata=_doc("gptq: Hessians held at once (float64); more weights = more calibration runs"),
    )


def check_options(o: WeightOnlyOptions) -> None:
    """Raise a PipelineError for option values the pass cannot run with."""
    if o.bits not in (4, 8):
        raise PipelineError(f"quantize-weight-only: bits must be 4 or 8, got {o.bits}")
    bs = o.block_size
    if bs < 16 or bs & (bs - 1):
        raise PipelineError(
            f"quantize-weight-only: block_size must be a power of two >= 16 (16, 32, 64, 128), got {bs}"
        )
    if o.accuracy_level not in (0, 1, 2, 3, 4):
        raise PipelineError(f"quantize-weight-only: accuracy_level must be 0..4, got {o.accuracy_level}")
    if o.min_size < 0:
        raise PipelineError(f"quantize-weight-only: min_size must be >= 0, got {o.min_size}")
    if not 0 <= o.damp < 1:
        raise PipelineError(f"quantize-weight-only: damp must be in [0, 1), got {o.damp}")
    if o.int8_budget < 0:
        raise PipelineError(f"quantize-weight-only: int8_budget must be >= 0, got {o.int8_budget}")
    if o.mixed_batches < 1:
        raise PipelineError(f"quantize-weight-only: mixed_batches must be >= 1, got {o.mixed_batches}")
    if o.calibration_batches is not None and o.calibration_batches < 1:
        raise PipelineError("quantize-weight-only: calibration_batches must be >= 1 (or None for all)")

"""Weight-only quantization: 4- or 8-bit block-wise weights for MatMul/Gemm/FusedMatMul (and
embeddings), lowered to ONNX Runtime's ``com.microsoft`` ``MatMulNBits`` and ``GatherBlockQuantized``.

Why weight-only: decoder LLMs on CPU are bound by reading weights, not by arithmetic, so shrinking
the weights 4-8x shrinks both the file and the memory traffic of every token, while activations
stay float (no activation calibration, little accuracy loss). Embedding tables hold most of a
small LLM's bytes, so they are quantized too; a table tied between the embedding and the LM head
(``x @ E^T``, which ``fuse-ort`` turns into FusedMatMul) is stored once, both ops reading the same
packed bytes (with ``method=gptq`` it is rounded to nearest unless ``tied_gptq``, since the
embedding reads it too).

Methods: ``rtn`` (round to nearest per block) needs no data; ``gptq`` uses calibration data (the
Hessian ``X^T X`` of each weight's input, streamed; see :mod:`.calibrate`); a weight with fewer
calibration tokens than K (``gptq_min_tokens``) gets RTN, since its Hessian is rank-deficient and
GPTQ would fit the calibration rows rather than the data; ``awq`` scales input channels where the
scale folds exactly (:mod:`.awq`); ``awq-gptq`` applies both. All numerics are numpy with one BLAS
thread, so the output bytes do not depend on the machine.

Modules: :mod:`.blocks` (block numerics and packing), :mod:`.sites` (candidate checks),
:mod:`.awq`, :mod:`.calibrate`, :mod:`.rewrite`, and the pass in :mod:`.quantizer`.
"""

from __future__ import annotations

from .._common.gptq import gptq_inverse_factor, gptq_sweep
from .blocks import (
    SEARCH_RATIOS,
    QuantizedWeight,
    block_params,
    dequantize,
    gptq_quantize,
    pack_blocks,
    quantize_rtn,
    unpack_blocks,
)
from .options import WeightOnlyOptions
from .quantizer import QuantizeWeightOnlyPass

__all__ = [
    "QuantizeWeightOnlyPass",
    "WeightOnlyOptions",
    "QuantizedWeight",
    "SEARCH_RATIOS",
    "block_params",
    "quantize_rtn",
    "gptq_inverse_factor",
    "gptq_quantize",
    "gptq_sweep",
    "dequantize",
    "pack_blocks",
    "unpack_blocks",
]

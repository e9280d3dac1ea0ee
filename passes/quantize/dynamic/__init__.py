"""Dynamic int8 quantization for ONNX Runtime CPU: int8 weights, activations quantized at run time.

Why: ORT's integer kernels (``DynamicQuantizeMatMul``, ``MatMulIntegerToFloat``, ``QAttention``)
run MatMuls on int8 weights without calibration data; the pass adds what keeps trained
transformers accurate on them. Per activation it chooses (from a probe run of the float model)
per-tensor levels, or per-token levels computed in the graph where a few massive-activation
tokens would otherwise set the range; smoothing, centering, outlier channels and channel copies
shrink the activation error; weights are per-channel round-to-nearest, or GPTQ with calibration
data. Every candidate's decision and the reason are in the report (``details["nodes"]``).

``reduce_range`` uses 7-bit weights: on x86 CPUs without VNNI, ORT's u8×s8 kernels add pairs of
products in int16 and can saturate; with VNNI (or AMX) full 8-bit weights are exact.

Modules: :mod:`.plan` (candidates and checks), :mod:`.probe`, :mod:`.transforms`, :mod:`.gptq`,
the lowerings :mod:`.emit_matmul`, :mod:`.emit_per_token`, :mod:`.emit_attention`,
:mod:`.emit_gather`, and the pass in :mod:`.quantizer` (its per-call state in :mod:`.run`).
"""

from __future__ import annotations

from .._common.gptq import gptq_int8
from .._common.int8 import quantize_weight
from .options import DynamicOptions
from .probe import probe_dims as _probe_dims  # noqa: F401 - its name before the split (tests use it)
from .quantizer import QuantizeDynamicPass

__all__ = ["DynamicOptions", "QuantizeDynamicPass", "gptq_int8", "quantize_weight"]

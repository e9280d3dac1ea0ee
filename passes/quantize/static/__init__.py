"""``quantize-static``: calibrated int8 (or 16-bit) QDQ quantization.

Calibration data runs through the float model once and gives each activation a clip range
(:mod:`.calibrate`); QuantizeLinear/DequantizeLinear pairs go on the activations, weights become
per-channel int8 initializers behind a DequantizeLinear and biases int32 (:mod:`.rewrite`). Where
the pairs go is the backend's choice (:mod:`.placement`), so that the backend fuses each group
into its integer kernels; :mod:`.plan` decides per node, and says why a node stays float.

Where it goes in a pipeline (ort-cpu): ``cleanup,fuse(domains=[standard]),quantize-static,cleanup``:
after BatchNorm folding and the standard fusions (MatMul+Add → Gemm gives QGemm an int32 bias),
before any com.microsoft fusion (FusedConv/FusedMatMul hide the op from ORT's QDQ fusion).
"""

from __future__ import annotations

from .options import StaticOptions
from .placement import PLACEMENTS, Placement
from .quantizer import QuantizeStaticPass

__all__ = ["PLACEMENTS", "Placement", "QuantizeStaticPass", "StaticOptions"]

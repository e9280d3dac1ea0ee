"""What the quantization modes share, in one place so that the modes import from here and never
from each other.

* :mod:`.norms`: the normalization ops and where each keeps its per-channel scale and shift;
* :mod:`.fold`: finding the norm or ``Mul`` that makes an activation's channels (through reshapes
  that keep the channel axis) and folding a per-channel factor into its constants;
* :mod:`.int8`: symmetric/asymmetric int8 weights, per channel or per tensor;
* :mod:`.gptq`: GPTQ's inverse-Hessian factor and column sweep, and its per-channel int8 form;
* :mod:`.hessians`: ``X^T X`` of activations streamed over calibration data, in runs that fit a
  memory budget.
"""

"""Where Q/DQ pairs go, per backend (:class:`Placement`): ``ort-cpu`` follows ONNX Runtime's CPU
QDQ transformer so that it fuses each group into QLinearConv / QLinearMatMul / QGemm /
QLinearAdd ... and runs the int8 kernels; ``tensorrt`` puts symmetric int8 pairs on the inputs
only (TensorRT propagates them itself)."""

from __future__ import annotations

import dataclasses

__all__ = ["PLACEMENTS", "Placement"]


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where Q/DQ pairs go for one backend.

    * ``compute``: ops with a constant weight (quantized offline, per channel) and activation
      input(s); MatMul with two activations quantizes both;
    * ``output_required``: compute ops whose output must be quantized for the backend to fuse
      them (ORT has QLinearConv but no float-output integer Conv); other compute ops quantize
      their output only when a quantized consumer reads it (ORT then fuses MatMul into
      MatMulIntegerToFloat and Gemm into a float-output QGemm);
    * ``qlinear``: ops with their own int8 kernel: all inputs and the output quantized, the output
      with its own calibrated range (when ``quantize_outputs``);
    * ``passthrough``: ops that move or select values: quantized only when their input already
      is, the output(s) reusing the input's scale and zero point (ORT then drops the pair and runs
      the op on uint8; a Split whose pieces had their own ranges ran in float between a
      DequantizeLinear and one QuantizeLinear per piece: C2f blocks of YOLO detectors);
    * ``removable``: activations absorbed by the previous Q when its zero point is ``qmin``
      (Relu's output range starts at 0), as ORT's quantizer does;
    * ``symmetric``/``activation_type``: forced activation settings (None: the pass options);
    * ``constant_operands``: quantize a constant operand of Add/Mul/Concat as int8 (else the node
      stays float: quantizing a bias Add's constant to 8 bits costs accuracy);
    * ``embedding``: lookups in a constant table (Gather): the table as per-tensor int8 and the
      output Q sharing its scale (the pattern ORT's quantizer writes; smaller files, off unless the
      ``embeddings`` option asks, since ORT CPU then dequantizes the whole table each run);
    * ``quantize_bias``: Conv/Gemm bias as int32 at ``input_scale * weight_scale`` (ORT's integer
      kernels take it so); TensorRT keeps float biases and folds them itself;
    * ``float_norm_residuals``: Adds whose output feeds a normalization (a transformer's residual
      stream) or a Softmax (scores plus attention mask) stay float;
    * ``float_islands``: ``qlinear`` ops that no quantized compute op reaches through other
      quantized ops stay float (ORT would run each as Q → QLinear op → DQ between float
      neighbours; TensorRT instead fuses Q/DQ on an Add's inputs into the producer's epilogue);
    * ``expand``: ops the backend runs as their ONNX function body, expanded before placement
      (:mod:`.expand`) so the pairs sit where the backend's ops will be.
    """

    name: str
    compute: frozenset[str]
    output_required: frozenset[str]
    qlinear: frozenset[str]
    passthrough: frozenset[str]
    removable: frozenset[str]
    quantize_outputs: bool = True
    symmetric: bool | None = None
    activation_type: str | None = None
    constant_operands: bool = False
    quantize_bias: bool = True
    embedding: frozenset[str] = frozenset()
    #: Leave float the transformer Adds one per-tensor 8-bit scale cannot hold: those feeding a
    #: normalization (the residual stream carries a few channels hundreds of times larger than the
    #: rest) and those feeding Softmax (the attention mask's -1e4…-3e38 share the scores' tensor).
    float_norm_residuals: bool = False
    float_islands: bool = False
    expand: frozenset[str] = frozenset()

    def kind(self, op_type: str) -> str | None:
        for kind in ("compute", "qlinear", "passthrough", "removable", "embedding"):
            if op_type in getattr(self, kind):
                return kind
        return None

    @property
    def op_types(self) -> list[str]:
        return sorted(self.compute | self.qlinear | self.passthrough | self.removable | self.embedding)


PLACEMENTS: dict[str, Placement] = {
    "ort-cpu": Placement(
        name="ort-cpu",
        compute=frozenset({"Conv", "MatMul", "Gemm"}),
        output_required=frozenset({"Conv"}),
        qlinear=frozenset(
            {"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu"}
        ),
        passthrough=frozenset(
            {"MaxPool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Split"}
        ),
        removable=frozenset({"Relu", "Clip"}),
        embedding=frozenset({"Gather"}),
        float_norm_residuals=True,
        float_islands=True,
        expand=frozenset({"HardSwish"}),
    ),
    # TensorRT: symmetric int8 (zero points 0) on the inputs of the ops it runs in int8, both
    # inputs of a residual Add; it propagates scales through pooling/reshapes and fuses ReLU.
    "tensorrt": Placement(
        name="tensorrt",
        compute=frozenset({"Conv", "MatMul", "Gemm"}),
        output_required=frozenset(),
        qlinear=frozenset({"Add", "Concat", "AveragePool", "GlobalAveragePool"}),
        passthrough=frozenset(),
        removable=frozenset(),
        quantize_outputs=False,
        symmetric=True,
        activation_type="int8",
        quantize_bias=False,
    ),
}

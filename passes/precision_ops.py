"""Which ops ``convert-float16`` runs in reduced precision, which keep float32 and why, and the
fp16 limits it checks values against (the data the pass's decisions read; the pass is in
:mod:`graphopt.passes.precision`)."""

from __future__ import annotations

import numpy as np

from .ir_helpers import MS_DOMAIN as _MS

__all__ = [
    "COMPUTE",
    "ANY_INPUT",
    "CONVERTIBLE",
    "FP16_MAX",
    "FP16_MIN_NORMAL",
    "GATHERS",
    "HEAVY",
    "KEEP_FP32",
    "KEEP_INPUTS",
    "KEEP_OUTPUTS",
    "SENTINEL",
]

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)  # 6.1e-05
#: Constants at least this large are "infinity" sentinels (finfo(float32).min masks): clamped.
SENTINEL = 1e30


#: (domain, op) that run in reduced precision. Compute ops have fp16 kernels in ONNX Runtime's
#: CUDA provider that accumulate in float32 (MatMul/Gemm/Conv via cuBLAS/cuDNN, Softmax, the
#: Standard compute ops with fp16 kernels that accumulate in float32 (converted, and HEAVY).
COMPUTE = (
    "MatMul",
    "Gemm",
    "Conv",
    "ConvTranspose",
    "Einsum",
    "Attention",
    "LayerNormalization",
    "RMSNormalization",
    "SimplifiedLayerNormalization",
    "BatchNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "Softmax",
    "LogSoftmax",
)

#: normalizations, attention); the rest move or combine elements without growing them.
CONVERTIBLE: frozenset[tuple[str, str]] = frozenset(
    [
        ("", op)
        for op in (
            *COMPUTE,
            "MaxPool",
            "AveragePool",
            "GlobalAveragePool",
            "GlobalMaxPool",
            # activations (bounded or linear growth)
            "Relu",
            "LeakyRelu",
            "PRelu",
            "Gelu",
            "Erf",
            "Tanh",
            "Sigmoid",
            "HardSigmoid",
            "HardSwish",
            "Elu",
            "Selu",
            "Celu",
            "Mish",
            "Clip",
            "Abs",
            "Neg",
            "Sign",
            "Floor",
            "Ceil",
            "Round",
            # elementwise arithmetic (ranges checked with calibration data)
            "Add",
            "Sub",
            "Mul",
            "Div",
            "Sqrt",
            "Reciprocal",
            "Max",
            "Min",
            "Where",
            "Sum",
            "Mean",
            # reductions that cannot grow values
            "ReduceMean",
            "ReduceMax",
            "ReduceMin",
            # data movement
            "Identity",
            "Reshape",
            "Flatten",
            "Squeeze",
            "Unsqueeze",
            "Transpose",
            "Concat",
            "Split",
            "Slice",
            "Gather",
            "GatherElements",
            "GatherND",
            "Expand",
            "Tile",
            "Pad",
            "Resize",
            "DepthToSpace",
            "SpaceToDepth",
        )
    ]
    + [
        (_MS, op)
        for op in (
            "Attention",
            "MultiHeadAttention",
            "GroupQueryAttention",
            "SkipLayerNormalization",
            "SkipSimplifiedLayerNormalization",
            "BiasGelu",
            "FastGelu",
            "Gelu",
            "QuickGelu",
            "BiasAdd",
            "BiasSplitGelu",
            "RotaryEmbedding",
            "FusedMatMul",
            "MatMulNBits",
            "GemmFastGelu",
        )
    ]
)

#: Ops kept in float32 on purpose, with the reason (any op not in CONVERTIBLE is kept too).
KEEP_FP32: dict[str, str] = {
    **dict.fromkeys(("Pow", "Exp", "Softplus"), "grows values past fp16's 65504 (x², eˣ)"),
    **dict.fromkeys(("Log",), "loses the precision of small inputs"),
    **dict.fromkeys(
        (
            "ReduceSum",
            "ReduceSumSquare",
            "ReduceProd",
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "CumSum",
        ),
        "sums or products of many terms overflow",
    ),
    **dict.fromkeys(("Cos", "Sin"), "angles (positions × frequencies) need float32's mantissa"),
    **dict.fromkeys(("Range", "ConstantOfShape", "EyeLike"), "shape and position computations"),
    **dict.fromkeys(
        (
            "RandomNormal",
            "RandomUniform",
            "RandomNormalLike",
            "RandomUniformLike",
            "Multinomial",
            "Bernoulli",
        ),
        "sampling",
    ),
    **dict.fromkeys(("TopK", "ArgMax", "ArgMin"), "rounding creates ties that change the indices"),
    **dict.fromkeys(
        ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"), "rounding changes comparison results"
    ),
    **dict.fromkeys(("NonMaxSuppression", "RoiAlign", "GridSample"), "coordinates need float32"),
    **dict.fromkeys(
        ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"), "quantization scales stay float32"
    ),
    "FusedConv": "ONNX Runtime's FusedConv kernels are float32 only",
}

#: Inputs / outputs that keep their type although the op converts (type constraints other than T).
KEEP_INPUTS: dict[tuple[str, str], frozenset[int]] = {
    ("", "Resize"): frozenset({1, 2}),  # roi, scales
}
KEEP_OUTPUTS: dict[tuple[str, str], frozenset[int]] = {
    ("", "LayerNormalization"): frozenset({1, 2}),  # mean, inv_std_dev: U (float32 stash type)
    ("", "SimplifiedLayerNormalization"): frozenset({1}),
    (_MS, "SkipLayerNormalization"): frozenset({1, 2}),
    (_MS, "SkipSimplifiedLayerNormalization"): frozenset({1, 2}),
}
#: Compute ops that convert whenever an activation (not a position/shape value) reaches them,
#: even from a float32 producer: one kept op early in a graph must not keep the rest in fp32.
HEAVY = frozenset([("", op) for op in COMPUTE] + [k for k in CONVERTIBLE if k[0] == _MS])
#: Ops that read rows of a constant table: fp16 from the start (embedding lookups).
GATHERS = frozenset({("", "Gather"), ("", "GatherElements"), ("", "GatherND")})
#: Ops whose float inputs may have any type (no cast needed either way).
ANY_INPUT = frozenset({("", "Shape"), ("", "Size"), ("", "Cast"), ("", "IsNaN"), ("", "IsInf")})

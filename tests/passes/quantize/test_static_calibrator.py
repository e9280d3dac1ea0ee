"""quantize-static's default calibrator (``auto``, issue 18 defect 5): chosen by the error on the
model's outputs on held-out calibration data, so it does not lose to ``mse`` where mse clips the
rare large values the model depends on, nor to ONNX Runtime's quantize_static default."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.pipeline import Pipeline


def spot_detector(seed: int = 0) -> onnx.ModelProto:
    """Conv-Relu, MaxPool 8x8, Linear, Softmax: the classes depend on a few bright spots, rare
    values that mse's range clips (they are ~0.2% of the conv output) while the max pooling hands
    them to the classifier."""
    rng = np.random.default_rng(seed)
    arrays = {
        "w1": (rng.standard_normal((8, 1, 3, 3)) * 0.5).astype(np.float32),
        "b1": (rng.standard_normal(8) * 0.1).astype(np.float32),
        "wf": (rng.standard_normal((128, 3)) * 0.3).astype(np.float32),
        "bf": np.zeros(3, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "spots",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def spots(n: int, seed: int) -> dict[str, np.ndarray]:
    """Background noise and two bright pixels of random amplitude (2..40) per image."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, 1, 32, 32)) * 0.3).astype(np.float32)
    for i in range(n):
        for _ in range(2):
            x[i, 0, rng.integers(32), rng.integers(32)] += rng.uniform(2, 40)
    return {"x": x}


def outputs(model_bytes: bytes, data: list[dict[str, np.ndarray]]) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, d)[0] for d in data]).ravel().astype(np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def graphopt_static(proto: onnx.ModelProto, calibration, options: str = ""):
    m, report = Pipeline.parse(f"quantize-static({options}),cleanup").run(
        graphopt.load(proto), context={"calibration": calibration}
    )
    return graphopt.to_bytes(m), report.passes[0]


def ort_static_default(proto: onnx.ModelProto, calibration) -> bytes:
    """quantize_static as its docs suggest for CPU: QDQ, per-channel, uint8 activations, MinMax."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    class Reader:
        def __init__(self) -> None:
            self.it = iter(calibration)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "m.onnx"), os.path.join(d, "q.onnx")
        onnx.save(proto, src)
        quantize_static(
            src,
            dst,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        with open(dst, "rb") as f:
            return f.read()


def test_default_calibrator_beats_mse_where_mse_clips_what_matters() -> None:
    proto = spot_detector()
    calibration = [spots(16, s) for s in range(4)]
    test = [spots(64, 100 + s) for s in range(8)]  # held out
    ref = outputs(proto.SerializeToString(), test)

    default, row = graphopt_static(proto, calibration)
    mse, _ = graphopt_static(proto, calibration, "calibrator=mse")
    ort_q = ort_static_default(proto, calibration)

    auto = row.details["auto_calibrator"]
    assert auto["chosen"] != "mse" and auto["validated_on"].startswith("held-out batches")
    assert set(auto["candidates"]) == {"mse", "minmax", "percentile"}
    got, got_mse, got_ort = (cosine(ref, outputs(b, test)) for b in (default, mse, ort_q))
    assert got > got_mse + 1e-4, (got, got_mse)
    assert got >= got_ort - 1e-4, (got, got_ort)


def test_auto_validates_once_and_reuses_the_choice() -> None:
    proto = spot_detector()
    shared = {"calibration": [spots(16, s) for s in range(4)]}
    model = graphopt.load(proto)
    _, r1 = Pipeline.parse("quantize-static").run(model.clone(), context=shared)
    _, r2 = Pipeline.parse("quantize-static(exclude=[Gemm])").run(model.clone(), context=shared)
    a1, a2 = r1.passes[0].details["auto_calibrator"], r2.passes[0].details["auto_calibrator"]
    assert not a1["cached"] and a2["cached"] and a1["chosen"] == a2["chosen"]


def test_one_batch_is_split_by_rows_for_validation() -> None:
    proto = spot_detector()
    _, row = graphopt_static(proto, [spots(32, 0)])
    assert row.details["auto_calibrator"]["validated_on"] == "held-out rows (2 folds)"


def test_static_batch_model_keeps_minmax() -> None:
    proto = spot_detector()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 32  # half a batch is refused
    _, row = graphopt_static(proto, [spots(32, 0)])
    auto = row.details["auto_calibrator"]
    assert auto["chosen"] == "minmax" and auto["validated_on"].startswith("nothing (the model cannot run")


def test_too_few_rows_to_validate_keep_minmax() -> None:
    """Four single-image batches: held-out scores are noise, so ORT's default (minmax) stays."""
    proto = spot_detector()
    _, row = graphopt_static(proto, [spots(1, s) for s in range(4)])
    auto = row.details["auto_calibrator"]
    assert auto["chosen"] == "minmax" and "held-out rows per fold" in auto["validated_on"]


def test_single_image_batches_are_validated_when_there_are_enough() -> None:
    """A static batch of 1 (most detection and OCR models): 32 single-image batches make two folds
    of 16 held-out rows, so auto validates instead of keeping minmax unseen (8 batches never could)."""
    proto = spot_detector()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    _, row = graphopt_static(proto, [spots(1, s) for s in range(40)])
    auto = row.details["auto_calibrator"]
    assert auto["validated_on"] == "held-out batches (2 folds)", auto
    assert set(auto["candidates"]) == {"mse", "minmax", "percentile"}

"""quantize-weight-only mixed precision: the weights promoted to 8 bits are the ones whose 4-bit
round trip moves the outputs most per extra byte, within the byte budget, and the result is closer
to float than all-4-bit."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graphopt.passes.quantize.weight_only.mixed import quantized_bytes
from graphopt.pipeline import Pipeline
from graphopt.verify import run_model

MS = "com.microsoft"


def _value(name: str, array: np.ndarray) -> ir.Value:
    return ir.Value(
        name=name,
        type=ir.TensorType(ir.DataType.FLOAT),
        shape=ir.Shape(array.shape),
        const_value=ir.tensor(array, name=name),
    )


def two_branch_model(loud: float) -> ir.Model:
    """y = x @ a + (x @ b) * loud: ``b``'s error reaches the output ``loud`` times stronger, though
    ``a`` and ``b`` have the same values and so the same weight-space error."""
    from graphopt.passes.cleanup import ShapeInferencePass

    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", 128]))
    a, b = _value("a", w), _value("b", w.copy())
    k = _value("k", np.array(loud, np.float32))
    ma = ir.node("MatMul", [x, a], name="mm_a")
    mb = ir.node("MatMul", [x, b], name="mm_b")
    scaled = ir.node("Mul", [mb.outputs[0], k], name="loud")
    add = ir.node("Add", [ma.outputs[0], scaled.outputs[0]], name="add")
    y = add.outputs[0]
    y.name, y.dtype = "y", ir.DataType.FLOAT
    graph = ir.Graph([x], [y], nodes=[ma, mb, scaled, add], initializers=[a, b, k], opset_imports={"": 21})
    model = ir.Model(graph, ir_version=10)
    ShapeInferencePass()(model)
    return model


def _run(spec: str, model: ir.Model, **context):
    out, report = Pipeline.parse(spec).run(model.clone(), context=context)
    row = [p for p in report.passes if p.name == "quantize-weight-only"][-1]
    bits = {
        n.name: n.attributes.get_int("bits")
        for n in out.graph
        if n.domain == MS and n.op_type == "MatMulNBits"
    }
    return out, row, bits


@pytest.mark.parametrize(
    ("bits", "symmetric", "block"), [(4, True, 32), (8, True, 32), (4, False, 16), (4, False, 32)]
)
def test_quantized_bytes_is_what_the_pass_writes(bits, symmetric, block):
    model = two_branch_model(1.0)
    spec = f"quantize-weight-only(bits={bits},symmetric={str(symmetric).lower()},block_size={block})"
    out, _, _ = _run(spec, model)
    (node, _) = [n for n in out.graph if n.op_type == "MatMulNBits"]
    written = sum(v.const_value.nbytes for v in node.inputs[1:] if v is not None)
    assert written == quantized_bytes(64, 128, bits, block, symmetric, 4)


def test_the_weight_that_moves_the_output_most_gets_8_bits_within_the_budget():
    model = two_branch_model(loud=20.0)
    x = np.random.default_rng(1).standard_normal((16, 128)).astype(np.float32)
    ref = run_model(model, {"x": x})[0][1]
    one = quantized_bytes(64, 128, 8, 32, True, 4) - quantized_bytes(64, 128, 4, 32, True, 4)
    total = 2 * quantized_bytes(64, 128, 4, 32, True, 4)
    budget = 1.5 * one / total  # room for one weight, not two
    feeds = [{"x": x}]
    mixed, row, bits = _run(
        f"quantize-weight-only(int8_budget={budget},mixed_siblings=false)", model, calibration=feeds
    )
    assert bits == {"mm_a": 4, "mm_b": 8}
    info = row.details["mixed_precision"]
    assert info["promoted"] == 1 and info["spent_bytes"] <= info["budget_bytes"]
    assert [w["bits"] for w in info["most_sensitive"]] == [8, 4]
    plain, _, plain_bits = _run("quantize-weight-only", model)
    assert set(plain_bits.values()) == {4}
    err_mixed = np.abs(run_model(mixed, {"x": x})[0][1] - ref).mean()
    err_plain = np.abs(run_model(plain, {"x": x})[0][1] - ref).mean()
    assert err_mixed < 0.5 * err_plain


def test_without_data_the_sensitivity_is_measured_on_generated_inputs():
    model = two_branch_model(loud=20.0)
    _, row, bits = _run("quantize-weight-only(int8_budget=0.5,mixed_siblings=false)", model)
    assert bits == {"mm_a": 4, "mm_b": 8}
    assert row.details["method"] == "rtn"


def test_the_kl_metric_ranks_like_the_error_on_logits():
    model = two_branch_model(loud=20.0)
    _, row, bits = _run("quantize-weight-only(int8_budget=0.5,mixed_metric=kl,mixed_siblings=false)", model)
    assert bits == {"mm_a": 4, "mm_b": 8}
    scores = [w["error"] for w in row.details["mixed_precision"]["most_sensitive"]]
    assert scores[0] > scores[1] > 0


def test_weights_on_one_input_are_promoted_together():
    """``a`` and ``b`` read the same x (like Q/K/V): both or neither, so they still pack."""
    model = two_branch_model(loud=20.0)
    _, row, bits = _run("quantize-weight-only(int8_budget=0.5)", model)
    assert set(bits.values()) == {4} and row.details["mixed_precision"]["promoted"] == 0
    _, row, bits = _run("quantize-weight-only(int8_budget=0.9)", model)
    assert bits == {"mm_a": 8, "mm_b": 8}


def test_a_budget_too_small_for_any_weight_promotes_none():
    _, row, bits = _run("quantize-weight-only(int8_budget=0.01)", two_branch_model(20.0))
    assert set(bits.values()) == {4}
    assert row.details["mixed_precision"]["promoted"] == 0

"""quantize-weight-only ``block_offsets``: a weight on a 4-bit grid with a float minimum per block
(what a GGUF Q4_1 file dequantizes to) is kept exactly, by an offset per block that ONNX Runtime
reads against the input's block sums; weights off such a grid are left to the plain quantizer."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

from graphopt.passes.lowering.pack_nbits import pack_sibling_nbits
from graphopt.passes.quantize.weight_only.blocks import (
    dequantize,
    on_grid,
    quantize_offset,
    quantize_rtn,
)
from graphopt.passes.quantize.weight_only.mixed import offset_extra_bytes, quantized_bytes
from graphopt.passes.quantize.weight_only.options import WeightOnlyOptions
from graphopt.pipeline import Pipeline
from graphopt.verify import run_model

K, N = 128, 48


def q4_1(n: int, k: int, seed: int = 0) -> np.ndarray:
    """``[n, k]`` as GGUF Q4_1 dequantizes: ``d * q + m`` per block of 32, fp16 ``d`` and ``m``,
    the block's minimum at level 0 and its maximum at level 15."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15
    d = rng.uniform(0.002, 0.02, (n, k // 32, 1)).astype(np.float16).astype(np.float32)
    m = (-rng.uniform(0.1, 0.9, (n, k // 32, 1)) * 15 * d).astype(np.float16).astype(np.float32)
    return (d * q + m).reshape(n, k).astype(np.float32)


def test_a_q4_1_weight_is_reproduced_and_recognised():
    w = q4_1(N, K)
    qw = quantize_offset(w, 4, 32)
    assert on_grid(w, qw)
    exact = (qw.q - qw.zero_points[..., None].astype(np.float32)) * qw.scales[..., None] + qw.offsets[
        ..., None
    ]
    assert np.abs(exact.reshape(N, K) - w).max() < 1e-6
    # As stored (the offsets rounded to 4 bits themselves) it is still far closer than integer
    # zero points can get.
    err = np.square(dequantize(qw) - w).sum()
    assert err < 0.05 * np.square(dequantize(quantize_rtn(w, 4, 32, symmetric=False)) - w).sum()


def test_a_q4_0_weight_needs_no_offsets():
    """GGUF Q4_0 (``d * (q - 8)``, the largest magnitude at level 0) is symmetric int4 already:
    plain RTN reproduces it, so only Q4_1-style blocks need offsets."""
    rng = np.random.default_rng(5)
    q = rng.integers(1, 16, (N, K // 32, 32))
    q[..., 0] = 0
    d = rng.uniform(0.002, 0.02, (N, K // 32, 1)) * rng.choice([-1, 1], (N, K // 32, 1))
    w = (d.astype(np.float16).astype(np.float32) * (q - 8)).reshape(N, K).astype(np.float32)
    assert np.abs(dequantize(quantize_rtn(w, 4, 32, symmetric=True)) - w).max() == 0


def test_a_weight_off_the_grid_is_not_taken_for_one():
    w = np.random.default_rng(0).standard_normal((N, K)).astype(np.float32)
    qw = quantize_offset(w, 4, 32)
    assert not on_grid(w, qw)
    # The least-squares offset never does worse than the integer zero point alone.
    assert (
        np.square(dequantize(qw) - w).sum() <= np.square(dequantize(quantize_rtn(w, 4, 32, False)) - w).sum()
    )


def _model(weights: list[np.ndarray], *, rank: int = 3, opset: int = 21) -> ir.Model:
    """``y_i = x @ W_i.T`` for each ``[N, K]`` weight, all on one input ``x``."""
    from graphopt.passes.cleanup import ShapeInferencePass

    dims: list[int | str] = ["B", "S", weights[0].shape[1]] if rank == 3 else ["B", weights[0].shape[1]]
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(dims))
    nodes, inits, outs = [], [], []
    for i, w in enumerate(weights):
        wt = np.ascontiguousarray(w.T)
        v = ir.Value(
            name=f"w{i}",
            type=ir.TensorType(ir.DataType.FLOAT),
            shape=ir.Shape(wt.shape),
            const_value=ir.tensor(wt),
        )
        inits.append(v)
        mm = ir.node("MatMul", [x, v], name=f"mm{i}")
        mm.outputs[0].name, mm.outputs[0].dtype = f"y{i}", ir.DataType.FLOAT
        nodes.append(mm)
        outs.append(mm.outputs[0])
    graph = ir.Graph([x], outs, nodes=nodes, initializers=inits, opset_imports={"": opset})
    model = ir.Model(graph, ir_version=10 if opset >= 21 else 7)
    ShapeInferencePass()(model)
    return model


def _quantize(model: ir.Model, options: str) -> tuple[ir.Model, dict]:
    out, report = Pipeline.parse(f"quantize-weight-only(min_size=0,accuracy_level=1,{options})").run(
        model.clone()
    )
    return out, [p for p in report.passes if p.name == "quantize-weight-only"][-1].details


def _error(model: ir.Model, quantized: ir.Model, rank: int = 3) -> float:
    shape = (2, 5, K) if rank == 3 else (7, K)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    ref = run_model(model, {"x": x})
    out = run_model(quantized, {"x": x})
    return max(float(np.abs(o - r).max() / np.abs(r).max()) for (_, o), (_, r) in zip(out, ref, strict=True))


@pytest.mark.parametrize(("rank", "opset"), [(3, 21), (2, 21), (3, 11)])
def test_on_grid_weights_run_exactly_on_ort(rank, opset):
    model = _model([q4_1(N, K)], rank=rank, opset=opset)
    with_offsets, details = _quantize(model, "block_offsets=on-grid")
    plain, _ = _quantize(model, "symmetric=false")
    assert details["block_offsets"]["weights"] == 1
    ops = collections.Counter(n.op_type for n in with_offsets.graph)
    assert ops["Concat"] == 1 and ops["ReduceSum"] == 1 and ops["MatMulNBits"] == 1
    node = next(n for n in with_offsets.graph if n.op_type == "MatMulNBits")
    assert node.attributes.get_int("K") == K + K // 32
    err, plain_err = _error(model, with_offsets, rank), _error(model, plain, rank)
    assert err < 5e-3
    assert err < 0.1 * plain_err


def test_on_grid_leaves_other_weights_to_the_plain_quantizer():
    rng = np.random.default_rng(2)
    model = _model([q4_1(N, K), rng.standard_normal((N, K)).astype(np.float32)])
    out, details = _quantize(model, "block_offsets=on-grid")
    assert details["block_offsets"]["weights"] == 1
    ks = sorted(n.attributes.get_int("K") for n in out.graph if n.op_type == "MatMulNBits")
    assert ks == [K, K + K // 32]
    none, _ = _quantize(model, "block_offsets=off")
    assert "Concat" not in {n.op_type for n in none.graph}


def test_a_k_off_the_blocks_gets_no_offsets():
    w = q4_1(N, 96)[:, :48]  # on a grid, but K = 48 is not a multiple of 32
    _, details = _quantize(_model([w], rank=2), "block_offsets=on-grid")
    assert details["block_offsets"]["weights"] == 0


def test_siblings_share_the_block_sums_and_still_pack():
    model = _model([q4_1(N, K, seed=s) for s in range(3)])
    out, _ = _quantize(model, "block_offsets=on-grid")
    assert collections.Counter(n.op_type for n in out.graph)["Concat"] == 1
    assert pack_sibling_nbits(out) == 1
    ops = collections.Counter(n.op_type for n in out.graph)
    assert ops["MatMulNBits"] == 1 and ops["Split"] == 1
    assert _error(model, out) < 5e-3


def test_offset_bytes_come_out_of_the_int8_budget_and_exact_weights_stay_4_bit():
    rng = np.random.default_rng(4)
    model = _model([q4_1(N, K), rng.standard_normal((N, K)).astype(np.float32)], rank=2)
    extra = offset_extra_bytes([q4_1(N, K)], WeightOnlyOptions())
    assert extra == quantized_bytes(N, K + K // 32, 4, 32, False, 4) - quantized_bytes(N, K, 4, 32, True, 4)
    one = quantized_bytes(N, K, 8, 32, True, 4) - quantized_bytes(N, K, 4, 32, True, 4)
    total = 2 * quantized_bytes(N, K, 4, 32, True, 4)
    opts = "mixed_siblings=false,block_offsets=on-grid"
    # Room for one promotion: the off-grid weight takes it, the exact one is not a candidate.
    out, details = _quantize(model, f"int8_budget={(one + extra + 16) / total},{opts}")
    assert details["mixed_precision"]["measured"] == 1
    bits = sorted(n.attributes.get_int("bits") for n in out.graph if n.op_type == "MatMulNBits")
    assert bits == [4, 8]
    # The same budget less the offsets' bytes: no room left.
    _, details = _quantize(model, f"int8_budget={(one + extra - 16) / total},{opts}")
    assert details["mixed_precision"]["promoted"] == 0

"""The quantization modes' shared home (passes/quantize/_common): the norm table, the channel
walk and fold, int8 weights, the Hessian run budget."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.quantize._common.fold import channel_chain, channel_params, divided_by, fold_into
from graphopt.passes.quantize._common.hessians import budget_groups
from graphopt.passes.quantize._common.int8 import int8_symmetric, quantize_weight
from graphopt.passes.quantize._common.norms import NORMS, norm_of

MS = "com.microsoft"


def _const(name: str, array: np.ndarray) -> ir.Value:
    return ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.FLOAT),
        const_value=ir.tensor(array, name=name),
    )


def _norm_graph() -> tuple[ir.Graph, ir.Node, ir.Value]:
    """x -> LayerNormalization(gamma, beta) -> Reshape to 2-D (channels last) -> y."""
    x = ir.Value(name="x", shape=ir.Shape([1, 4, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    gamma, beta = _const("gamma", np.full(8, 2.0, np.float32)), _const("beta", np.arange(8, dtype=np.float32))
    shape = ir.Value(
        name="shape",
        shape=ir.Shape([2]),
        type=ir.TensorType(ir.DataType.INT64),
        const_value=ir.tensor(np.array([4, 8], np.int64), name="shape"),
    )
    ln = ir.Node("", "LayerNormalization", [x, gamma, beta], num_outputs=1, name="ln")
    ln.outputs[0].name, ln.outputs[0].shape = "normed", ir.Shape([1, 4, 8])
    reshape = ir.Node("", "Reshape", [ln.outputs[0], shape], num_outputs=1, name="flat")
    y = reshape.outputs[0]
    y.name, y.shape = "y", ir.Shape([4, 8])
    graph = ir.Graph([x], [y], nodes=[ln, reshape], initializers=[gamma, beta, shape], opset_imports={"": 17})
    return graph, ln, y


def test_norm_table_lookup_checks_the_domain() -> None:
    assert norm_of(ir.Node(MS, "SkipLayerNormalization", [])) is NORMS["SkipLayerNormalization"]
    assert norm_of(ir.Node("", "SkipLayerNormalization", [])) is None  # not a default-domain op
    assert norm_of(ir.Node("", "RMSNormalization", [])).params == (1,)
    assert norm_of(ir.Node("", "Relu", [])) is None


def test_channel_chain_reaches_the_norm_through_a_reshape_and_folds_into_it() -> None:
    graph, ln, y = _norm_graph()
    chain = channel_chain(y)
    assert [v.name for v in chain] == ["y", "normed"] and chain[-1].producer() is ln
    assert channel_chain(y, channels=16) == [y]  # the channel count must match
    assert channel_params(ln) == [1, 2]
    s = np.full(8, 2.0, np.float32)
    fold_into(graph, ln, [1, 2], divided_by(s), lambda v, _i: f"{v.name}_folded", set())
    np.testing.assert_array_equal(ln.inputs[1].const_value.numpy(), np.ones(8, np.float32))
    np.testing.assert_array_equal(ln.inputs[2].const_value.numpy(), np.arange(8, dtype=np.float32) / 2)
    assert ln.inputs[1].name == "gamma_folded" and "gamma_folded" in graph.initializers


def test_channel_params_of_a_mul_needs_one_constant_operand() -> None:
    x = ir.Value(name="x")
    assert channel_params(ir.Node("", "Mul", [x, _const("g", np.ones(4, np.float32))])) == [1]
    assert channel_params(ir.Node("", "Mul", [x, x])) is None
    skip = ir.Node(MS, "SkipLayerNormalization", [x, x, _const("g", np.ones(4, np.float32))])
    assert channel_params(skip) == [2] and channel_params(skip, skip_norms=False) is None


def test_int8_symmetric_matches_quantize_weight_per_channel_and_per_tensor() -> None:
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    for per_channel in (True, False):
        q, scale, zp = quantize_weight(w, per_channel=per_channel)
        q2, scale2 = int8_symmetric(w, (0,) if per_channel else None, float32_scale=False)
        np.testing.assert_array_equal(q, q2)
        np.testing.assert_array_equal(scale, scale2)
        assert scale.shape == ((8,) if per_channel else ()) and not zp.any()
        assert np.abs(q.astype(np.float32) * scale - w).max() <= scale.max() / 2 + 1e-6


def test_budget_groups_split_runs_and_share_held_activations() -> None:
    needs = {"a": ({"x"}, 4), "b": ({"x"}, 4), "c": ({"y"}, 4)}
    size = 4 * 4 * 8
    assert budget_groups(list(needs), needs.__getitem__, 10 * size) == [["a", "b", "c"]]
    assert budget_groups(list(needs), needs.__getitem__, size) == [["a", "b"], ["c"]]  # b reuses x's Hessian
    assert budget_groups(list(needs), needs.__getitem__, 10 * size, run_per_activation=True) == [
        ["a", "b"],
        ["c"],
    ]

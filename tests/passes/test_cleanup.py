"""Cleanup passes: each rule fires where it is safe, stays away where it is not, outputs unchanged.

Also one regression test per known bug class of graph optimizers (see the foundation issue).
"""

from __future__ import annotations

import resource
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from corpus import assert_same, run

import graphopt
from graphopt.pipeline import Pipeline


def parse(text: str) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto)
    return proto


def optimize_and_compare(
    proto: onnx.ModelProto, feeds: dict[str, Any], pipeline: str = "cleanup"
) -> ir.Model:
    """Optimize with ``pipeline`` and assert ORT outputs are identical to the original's."""
    expected = run(proto.SerializeToString(), feeds)
    result = graphopt.optimize(graphopt.load(proto), pipeline=pipeline, verify_each=True)
    got = run(graphopt.to_bytes(result.model), feeds)
    assert len(got) == len(expected)
    for i, (r, g) in enumerate(zip(expected, got)):
        assert_same(r, g, where=f"output {i}")
    out_names = [o.name for o in proto.graph.output]
    assert [o.name for o in result.model.graph.outputs] == out_names, "graph outputs renamed"
    return result.model


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)]


X = {"x": np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5}


# --- no-op removal: positive and negative ----------------------------------------------------


def test_identity_dropout_and_same_type_cast_are_removed() -> None:
    m = optimize_and_compare(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] y) {
            a = Identity (x)
            b = Dropout (a)
            c = Cast <to = 1> (b)
            y = Relu (c)
        }"""),
        X,
    )
    assert ops(m) == ["Relu"]


def test_cast_to_other_type_and_dropout_in_training_mode_are_kept() -> None:
    m = optimize_and_compare(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x, bool t) => (float[2, 3] y, int32[2, 3] z) {
            b = Dropout (x, , t)
            y = Relu (b)
            z = Cast <to = 6> (x)
        }"""),
        {**X, "t": np.array(False)},
    )
    assert sorted(ops(m)) == ["Cast", "Dropout", "Relu"]


def test_dropout_whose_mask_is_used_keeps_a_correct_mask() -> None:
    # Either the Dropout stays or its mask becomes the constant all-true inference mask.
    optimize_and_compare(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] y, bool[2, 3] mask) {
            b, mask = Dropout (x)
            y = Relu (b)
        }"""),
        X,
    )


def test_reshape_expand_transpose_noops_removed_but_real_ones_kept() -> None:
    m = optimize_and_compare(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[3, 2] y) {
            s = Constant <value = int64[2] {2, 3}> ()
            a = Reshape (x, s)
            e = Constant <value = int64[2] {1, 3}> ()
            b = Expand (a, e)
            c = Transpose <perm = [0, 1]> (b)
            d = Transpose <perm = [1, 0]> (c)
            y = Relu (d)
        }"""),
        X,
    )
    assert ops(m) == ["Transpose", "Relu"]


def test_neutral_arithmetic_removed_only_when_it_cannot_broadcast() -> None:
    m = optimize_and_compare(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float[N, 3] y, float[1, N, 3] z, float[N, 3] w)
        <float zero = {0.}, float[1, 1] one = {1.}, float[1, 1, 1] one3 = {1.}, float[3] twos = {2., 2., 2.}>
        {
            a = Add (x, zero)
            b = Mul (one, a)
            c = Div (b, one)
            y = Sub (c, zero)
            z = Mul (x, one3)
            w = Mul (x, twos)
        }"""),
        X,
    )
    # The last Sub stays: removing it would make graph output y the graph input x.
    assert ops(m) == ["Sub", "Mul", "Mul"]


def test_reshape_to_a_different_shape_is_kept() -> None:
    m = optimize_and_compare(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[3, 2] y) {
            s = Constant <value = int64[2] {3, -1}> ()
            y = Reshape (x, s)
        }"""),
        X,
    )
    assert ops(m) == ["Reshape"]


def test_reshape_with_unknown_input_shape_is_kept() -> None:
    m = optimize_and_compare(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float[N, 3] y) {
            s = Constant <value = int64[2] {2, 3}> ()
            y = Reshape (x, s)
        }"""),
        X,
    )
    assert ops(m) == ["Reshape"]


def test_inverse_transpose_pair_removed_other_pairs_kept() -> None:
    x = {"x": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)}
    m = optimize_and_compare(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3, 4] x) => (float[2, 3, 4] y, float[3, 4, 2] z) {
            a = Transpose <perm = [2, 0, 1]> (x)
            b = Transpose <perm = [1, 2, 0]> (a)
            y = Relu (b)
            c = Transpose <perm = [1, 0, 2]> (x)
            z = Transpose <perm = [0, 2, 1]> (c)
        }"""),
        x,
    )
    assert ops(m).count("Transpose") == 2


def test_expand_that_broadcasts_is_kept() -> None:
    m = optimize_and_compare(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[4, 2, 3] y) {
            e = Constant <value = int64[3] {4, 2, 3}> ()
            y = Expand (x, e)
        }"""),
        X,
    )
    assert ops(m) == ["Expand"]


# --- known bug classes ---------------------------------------------------------------------------


def test_intermediate_value_that_is_also_a_graph_output() -> None:
    # `h` is an output and also feeds an Identity whose result is another output: removing the
    # Identity by renaming `h` would lose one of the two outputs.
    m = optimize_and_compare(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] h, float[2, 3] y, float[2, 3] z) {
            h = Relu (x)
            y = Identity (h)
            z = Identity (x)
        }"""),
        X,
    )
    assert [o.name for o in m.graph.outputs] == ["h", "y", "z"]


def test_transpose_with_identity_perm_is_removed() -> None:
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)}
    m = optimize_and_compare(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3, 4] x) => (float[2, 3, 4] y) {
            t = Transpose <perm = [0, 1, 2]> (x)
            y = Sigmoid (t)
        }"""),
        x,
    )
    assert ops(m) == ["Sigmoid"]


def test_transpose_as_graph_output_of_graph_input_is_kept() -> None:
    m = optimize_and_compare(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] y) {
            y = Transpose <perm = [0, 1]> (x)
        }"""),
        X,
    )
    assert ops(m) == ["Transpose"]


IF_INIT = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x, bool c) => (float[2, 3] y)
    <float[3] w = {1., 2., 3.}>
    {
        y = If (c) <
            then_branch = t () => (float[2, 3] ty) { ty = Mul (x, w) },
            else_branch = e () => (float[2, 3] ey) { ey = Neg (x) }
        >
    }"""


@pytest.mark.parametrize("cond", [True, False])
def test_initializer_used_only_inside_if_branch_is_kept(cond: bool) -> None:
    m = optimize_and_compare(parse(IF_INIT), {**X, "c": np.array(cond)})
    assert "w" in m.graph.initializers


def test_loop_and_if_bodies_with_outer_scope_references() -> None:
    proto = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x, int64 n) => (float[2, 3] y)
        <float[3] scale = {0.5, 1., 2.}>
        {
            k = Constant <value = float {3.}> ()
            kk = Add (k, k)
            t = Constant <value = bool {1}> ()
            y = Loop (n, t, x) <body = body (int64 i, bool cin, float[2, 3] acc) => (bool cout, float[2, 3] out) {
                cout = Identity (cin)
                a = Mul (acc, scale)
                six = Identity (kk)
                p = Constant <value = bool {1}> ()
                out = If (p) <
                    then_branch = t2 () => (float[2, 3] r1) { s = Add (a, six) r1 = Identity (s) },
                    else_branch = e2 () => (float[2, 3] r2) { r2 = Identity (a) }
                >
            }>
        }""")
    optimize_and_compare(proto, {**X, "n": np.array(3, dtype=np.int64)})


def test_fp16_initializers_through_folding() -> None:
    proto = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float16[2, 3] x) => (float16[2, 3] y)
        <float[3] w = {0.1, 0.25, 3.}>
        {
            wc = Cast <to = 10> (w)
            w2 = Mul (wc, wc)
            y = Add (x, w2)
        }""")
    m = optimize_and_compare(proto, {"x": np.arange(6).reshape(2, 3).astype(np.float16)})
    assert ops(m) == ["Add"]
    (w,) = list(m.graph.initializers.values())
    assert w.const_value.dtype == ir.DataType.FLOAT16


def test_bf16_initializers_through_folding() -> None:
    # ORT CPU has few bf16 kernels; the model casts around them as exported models do.
    proto = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] y)
        <bfloat16[3] wb = {0, 0, 0}, float[3] w = {0.1, 0.2, 0.3}>
        {
            a = Cast <to = 1> (wb)
            b = Cast <to = 16> (w)
            c = Cast <to = 1> (b)
            s = Add (a, c)
            y = Add (x, s)
        }""")
    proto.graph.initializer[0].CopyFrom(
        onnx.helper.make_tensor("wb", onnx.TensorProto.BFLOAT16, [3], [0.1, 0.25, 3.0])
    )
    m = optimize_and_compare(proto, X)
    assert ops(m) == ["Add"]
    (w,) = list(m.graph.initializers.values())
    assert w.const_value.dtype == ir.DataType.FLOAT
    expected = np.array([0.1, 0.25, 3.0], np.float32)
    assert not np.allclose(
        w.const_value.numpy(), expected + np.array([0.1, 0.2, 0.3], np.float32), atol=0, rtol=1e-7
    )


def test_integer_overflow_in_folding_matches_onnxruntime() -> None:
    # numpy wraps, ORT's int64 ReduceProd saturates: overflowing integer arithmetic is not
    # folded; the same ops on small values are.
    m = optimize_and_compare(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int32[2] x) => (int32[2] y, int64[1] s, int32[2] z, int64[1] t)
        <int32[2] a = {2147483647, -2147483648}, int32[2] b = {2, 3}, int64[2] d = {4611686018427387904, 4},
         int64[2] e = {5, 7}>
        {
            m = Mul (a, b)
            y = Add (x, m)
            s = ReduceProd <keepdims = 1> (d)
            bb = Mul (b, b)
            z = Add (x, bb)
            t = ReduceProd <keepdims = 1> (e)
        }"""),
        {"x": np.array([1, 2], dtype=np.int32)},
    )
    assert ops(m).count("Mul") == 1
    assert ops(m).count("ReduceProd") == 1


@pytest.mark.parametrize("op", ["Div", "Mod"])
def test_integer_division_by_zero_is_never_folded(op: str, recwarn: pytest.WarningsRecorder) -> None:
    # numpy gives 0 (with a warning on stderr) where the op defines no value; ONNX Runtime refuses
    # to run it. Folding it would turn a model that fails into one that silently adds 0.
    m = graphopt.optimize(
        graphopt.load(
            parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[1] x) => (int64[1] y)
        <int64[1] a = {{7}}, int64[1] zero = {{0}}, int64[1] two = {{2}}>
        {{
            q = {op} (a, zero)
            y0 = Add (x, q)
            r = {op} (a, two)
            y = Add (y0, r)
        }}""")
        ),
        pipeline="cleanup",
    ).model
    assert ops(m).count(op) == 1  # a / 0 kept; a / 2 folded
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    rows = graphopt.optimize(
        graphopt.load(
            parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[1] x) => (int64[1] y)
        <int64[1] a = {{7}}, int64[1] zero = {{0}}>
        {{
            q = {op} (a, zero)
            y = Add (x, q)
        }}""")
        ),
        pipeline="fold-constants",
    ).report.passes
    assert rows[0].stats.get("skipped_undefined") == 1


@pytest.mark.parametrize(
    "body",
    [
        "big = ConstantOfShape <value = float[1] {1.}> (shape)",
        "big = Expand (one, shape)",
        "big = Tile (one2, shape)",
    ],
)
def test_huge_constant_outputs_are_not_materialised(body: str) -> None:
    # 50000 x 50000 float32 = 10 GB: folding would exhaust memory; it must be left alone, fast.
    proto = parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 1] x) => (float[50000, 50000] y)
        <int64[2] shape = {{50000, 50000}}, float[1] one = {{1.}}, float[1, 1] one2 = {{1.}}>
        {{
            {body}
            y = Add (big, x)
        }}""")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = graphopt.optimize(graphopt.load(proto), pipeline="cleanup")
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert rss_after - rss_before < 1_000_000  # kB: well under the 10 GB a fold would take
    assert len(list(result.model.graph)) == 2
    assert graphopt.ir.total_tensor_bytes(result.model) < 1000


def test_deeply_nested_subgraphs() -> None:
    depth = 24
    inner = "r0 = Neg (x)"
    for i in range(depth):
        inner = (
            f"r{i + 1} = If (c) <then_branch = t{i} () => (float[2, 3] o{i}) {{ {inner} o{i} = Identity (r{i}) }},"
            f" else_branch = e{i} () => (float[2, 3] q{i}) {{ q{i} = Identity (x) }}>"
        )
    proto = parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x, bool c) => (float[2, 3] y) {{
            {inner}
            y = Identity (r{depth})
        }}""")
    for cond in (True, False):
        optimize_and_compare(proto, {**X, "c": np.array(cond)})


def test_overridable_initializer_is_not_folded() -> None:
    # IR >= 4: an initializer that is also a graph input is a default the caller may override.
    proto = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x, float[3] w) => (float[2, 3] y)
        <float[3] w = {1., 2., 3.}>
        {
            w2 = Mul (w, w)
            y = Add (x, w2)
        }""")
    feeds = {**X, "w": np.array([5.0, 6.0, 7.0], dtype=np.float32)}
    m = optimize_and_compare(proto, feeds)
    assert "Mul" in ops(m)


def test_random_ops_are_neither_folded_nor_merged() -> None:
    proto = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] y) {
            a = RandomNormal <shape = [2, 3], seed = 1.> ()
            b = RandomNormal <shape = [2, 3], seed = 1.> ()
            c = Add (a, b)
            y = Add (x, c)
        }""")
    result = graphopt.optimize(graphopt.load(proto), pipeline="cleanup")
    assert ops(result.model).count("RandomNormal") == 2


def test_cse_merges_duplicates_and_dedup_shares_weights() -> None:
    m = optimize_and_compare(
        parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] y)
        <float[3] w1 = {1., 2., 3.}, float[3] w2 = {1., 2., 3.}>
        {
            a = Mul (x, w1)
            b = Mul (x, w2)
            a2 = Sigmoid (a)
            b2 = Sigmoid (b)
            y = Add (a2, b2)
        }"""),
        X,
    )
    assert ops(m) == ["Mul", "Sigmoid", "Add"]
    assert len(m.graph.initializers) == 1


def test_functions_are_handled() -> None:
    proto = parse("""
        <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        g (float[2, 3] x) => (float[2, 3] y) {
            y = local.twice (x)
        }
        <domain: "local", opset_import: ["" : 17]>
        twice (a) => (b) {
            c = Identity (a)
            two = Constant <value = float {2.}> ()
            b = Mul (c, two)
        }""")
    optimize_and_compare(proto, X)


def test_shape_computations_of_an_export_fold() -> None:
    # The Shape → Gather → Unsqueeze → Concat → Reshape chains exporters emit.
    proto = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3, 4] x) => (float[2, 12] y) {
            s = Shape (x)
            i0 = Constant <value = int64 {0}> ()
            d0 = Gather (s, i0)
            ax = Constant <value = int64[1] {0}> ()
            u0 = Unsqueeze (d0, ax)
            m1 = Constant <value = int64[1] {-1}> ()
            shp = Concat <axis = 0> (u0, m1)
            y = Reshape (x, shp)
        }""")
    x = {"x": np.random.default_rng(2).standard_normal((2, 3, 4)).astype(np.float32)}
    m = optimize_and_compare(proto, x)
    assert ops(m) == ["Reshape"]


def test_cleanup_is_idempotent() -> None:
    proto = parse(IF_INIT)
    once = graphopt.optimize(graphopt.load(proto)).model
    twice = graphopt.optimize(once).model
    assert graphopt.to_bytes(once) == graphopt.to_bytes(twice)


def test_pipeline_without_fold_keeps_constants() -> None:
    _, report = Pipeline.parse("cleanup(fold=false)").run(graphopt.load(parse(IF_INIT)))
    assert not any(r.name.endswith("fold-constants") for r in report.passes)


def test_reshape_reshape_merge_keeps_an_initializer_named_like_its_new_shape() -> None:
    """onnxscript's Reshape∘Reshape rule names its new shape ``<output>/shape``, and its rewriter
    overwrites an initializer of that name: here the model's own ``y/shape`` (used by ``z``)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.array(a, dtype=np.int64), n)
        for n, a in [("s1", [6, 4]), ("s2", [24]), ("y/shape", [7, 8, 9])]
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "s1"], ["t"]),
            helper.make_node("Reshape", ["t", "s2"], ["y"]),
            helper.make_node("Add", ["n", "y/shape"], ["z"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4]),
            helper.make_tensor_value_info("n", TensorProto.INT64, [3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [24]),
            helper.make_tensor_value_info("z", TensorProto.INT64, [3]),
        ],
        initializer=inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    feeds = {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "n": np.array([1, 2, 3], dtype=np.int64)}
    m = optimize_and_compare(proto, feeds)
    assert ops(m).count("Reshape") == 1

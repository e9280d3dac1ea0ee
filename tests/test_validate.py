"""Input validation: models invalid by the ONNX spec are refused (exit 2, one line naming the node,
value or tensor, nothing written) before any pass runs; valid ones (out of order, contrib ops,
non-UTF-8 string data, ONNX's own function-body quirks) are optimized."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from corpus import assert_same, run
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.cli import main
from graphopt.errors import InvalidModelError

X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
FEEDS = {"x": np.arange(8, dtype=np.float32).reshape(2, 4) - 3}


def model(nodes, inputs=(X,), outputs=(Y,), inits=(), opset=17, functions=(), extra_opsets=()):
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(inits))
    opsets = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, v) for d, v in extra_opsets]]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8, functions=list(functions))


def raw(name, dtype, dims, data: bytes) -> TensorProto:
    t = TensorProto(name=name, data_type=dtype, dims=dims)
    t.raw_data = data
    return t


def then_else(then_nodes, then_out, outer_value="x"):
    then = helper.make_graph(
        then_nodes, "then", [], [helper.make_tensor_value_info(then_out, TensorProto.FLOAT, [2, 4])]
    )
    other = helper.make_graph(
        [helper.make_node("Identity", [outer_value], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 4])],
    )
    return dict(then_branch=then, else_branch=other)


C = helper.make_tensor_value_info("c", TensorProto.BOOL, [])


def _recursive_function():
    f = helper.make_function(
        "loc",
        "F",
        ["a"],
        ["b"],
        [helper.make_node("F", ["a"], ["b"], domain="loc")],
        [helper.make_opsetid("", 17), helper.make_opsetid("loc", 1)],
    )
    return model(
        [helper.make_node("F", ["x"], ["y"], domain="loc", name="call")],
        functions=[f],
        extra_opsets=[("loc", 1)],
    )


def _non_utf8_doc_string():
    m = model([helper.make_node("Relu", ["x"], ["y"], doc_string="DOCX")])
    return m.SerializeToString().replace(b"DOCX", b"DO\xffX")


def _non_utf8_attribute():
    m = model(
        [helper.make_node("Resize", ["x", "", "s"], ["y"], mode="NEARX", name="rs")],
        inits=[numpy_helper.from_array(np.float32([1, 1]), "s")],
    )
    return m.SerializeToString().replace(b"NEARX", b"NE\xffRX")


#: name -> (model or serialized bytes, text the one-line error must contain). Items 3, 4 and 6 of
#: the "hostile and malformed input" issue.
INVALID = {
    # exit 3 before
    "dangling-input": (
        lambda: model([helper.make_node("Add", ["x", "nope"], ["y"], name="add")]),
        "node 'add' (Add) reads 'nope'",
    ),
    "missing-graph-input": (
        lambda: model([helper.make_node("Relu", ["x"], ["y"], name="r")], inputs=[]),
        "node 'r' (Relu) reads 'x'",
    ),
    "cycle": (
        lambda: model(
            [
                helper.make_node("Add", ["x", "b"], ["a"], name="n1"),
                helper.make_node("Relu", ["a"], ["b"], name="n2"),
                helper.make_node("Relu", ["a"], ["y"], name="n3"),
            ]
        ),
        "form a cycle: node 'n1' (Add) -> node 'n2' (Relu) -> node 'n1' (Add)",
    ),
    "self-loop": (
        lambda: model(
            [helper.make_node("Add", ["x", "a"], ["a"], name="loop"), helper.make_node("Relu", ["a"], ["y"])]
        ),
        "node 'loop' (Add) reads its own output",
    ),
    "empty-graph": (
        lambda: model([]),
        "graph output 'y' is not a graph input, initializer or output of any node",
    ),
    "no-outputs": (lambda: model([helper.make_node("Relu", ["x"], ["y"])], outputs=[]), "no outputs"),
    "empty-output-name": (
        lambda: model(
            [helper.make_node("Relu", ["x"], [""])],
            outputs=[helper.make_tensor_value_info("", TensorProto.FLOAT, [2, 4])],
        ),
        "graph output #0 has an empty name",
    ),
    "undefined-outer-value": (
        lambda: model(
            [
                helper.make_node(
                    "If",
                    ["c"],
                    ["y"],
                    name="if",
                    **then_else([helper.make_node("Relu", ["ghost"], ["t"], name="in")], "t"),
                )
            ],
            inputs=[X, C],
        ),
        "node 'in' (Relu) in a subgraph of node 'if' (If) reads 'ghost'",
    ),
    "defined-twice": (
        lambda: model(
            [
                helper.make_node("Relu", ["x"], ["y"], name="a"),
                helper.make_node("Neg", ["x"], ["y"], name="b"),
            ]
        ),
        "value 'y' is defined twice (node 'a' (Relu) and node 'b' (Neg))",
    ),
    "non-utf8-doc-string": (_non_utf8_doc_string, "doc_string field of a NodeProto is not UTF-8 text"),
    "non-utf8-string-attribute": (
        _non_utf8_attribute,
        "string attribute 'mode' holds bytes that are not UTF-8",
    ),
    # exit 1 before
    "cast-to-999": (
        lambda: model([helper.make_node("Cast", ["x"], ["y"], to=999, name="cast")]),
        "node 'cast' (Cast): Attribute to does not specify a valid type",
    ),
    "truncated-raw-data": (
        lambda: model(
            [helper.make_node("Add", ["x", "w"], ["y"])], inits=[raw("w", TensorProto.FLOAT, [4], b"\0" * 10)]
        ),
        "initializer 'w' has 10 bytes of data but dims [4] of FLOAT need 16",
    ),
    "too-much-raw-data": (
        lambda: model(
            [helper.make_node("Add", ["x", "w"], ["y"])], inits=[raw("w", TensorProto.FLOAT, [4], b"\0" * 20)]
        ),
        "initializer 'w' has 20 bytes of data but dims [4] of FLOAT need 16",
    ),
    "negative-dims": (
        lambda: model(
            [helper.make_node("Add", ["x", "w"], ["y"])], inits=[raw("w", TensorProto.FLOAT, [-4, 4], b"")]
        ),
        "initializer 'w' has a negative dimension in [-4, 4]",
    ),
    "huge-dims": (
        lambda: model(
            [helper.make_node("Add", ["x", "w"], ["y"])],
            inits=[raw("w", TensorProto.FLOAT, [2**40, 4], b"\0" * 16)],
        ),
        "initializer 'w' has 16 bytes of data but dims [1099511627776, 4]",
    ),
    # exit 0 before: ONNX Runtime refuses these
    "unknown-op": (
        lambda: model([helper.make_node("Frobnicate", ["x"], ["y"], name="f")]),
        "node 'f' (Frobnicate): No Op registered for Frobnicate",
    ),
    "empty-op-type": (lambda: model([helper.make_node("", ["x"], ["y"])]), "'op_type' of 'node' is required"),
    "opset-0": (
        lambda: model([helper.make_node("Relu", ["x"], ["y"], name="r")], opset=0),
        "node 'r' (Relu): No Op registered for Relu with domain_version of 0",
    ),
    "wrong-input-dtype": (
        lambda: model(
            [helper.make_node("Add", ["x", "i"], ["y"], name="add")],
            inputs=[X, helper.make_tensor_value_info("i", TensorProto.INT64, [2, 4])],
        ),
        "node 'add' (Add): B has inconsistent type tensor(int64)",
    ),
    "bogus-attribute": (
        lambda: model([helper.make_node("Relu", ["x"], ["y"], name="r", foo=3)]),
        "node 'r' (Relu): Unrecognized attribute: foo",
    ),
    "attribute-of-wrong-type": (
        lambda: model([helper.make_node("Softmax", ["x"], ["y"], name="s", axis="a")]),
        "node 's' (Softmax): Mismatched attribute type",
    ),
    "reshape-two-minus-ones": (
        lambda: model(
            [helper.make_node("Reshape", ["x", "shape"], ["y"], name="rs")],
            inits=[numpy_helper.from_array(np.int64([-1, -1]), "shape")],
        ),
        "node 'rs' (Reshape): Target shape may not have multiple -1 dimensions",
    ),
    "reshape-two-minus-ones-computed": (
        lambda: model(
            [
                helper.make_node("Concat", ["m1", "m1"], ["shape"], axis=0),
                helper.make_node("Reshape", ["x", "shape"], ["y"], name="rs"),
            ],
            inits=[numpy_helper.from_array(np.int64([-1]), "m1")],
        ),
        "node 'rs' (Reshape): Target shape may not have multiple -1 dimensions",
    ),
    "huge-constant-16-bytes": (
        lambda: model(
            [
                helper.make_node(
                    "Constant",
                    [],
                    ["c"],
                    name="k",
                    value=raw("", TensorProto.FLOAT, [100000, 100000], b"\0" * 16),
                ),
                helper.make_node("Add", ["x", "c"], ["y"]),
            ]
        ),
        "attribute 'value' of node 'k' (Constant) has 16 bytes of data but dims [100000, 100000]",
    ),
    "recursive-local-function": (_recursive_function, "Model-local functions must not be recursive"),
    "unknown-contrib-op": (
        lambda: model(
            [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.microsoft", name="f")],
            extra_opsets=[("com.microsoft", 1)],
        ),
        "node 'f' (Frobnicate): com.microsoft::Frobnicate is not an operator of ONNX Runtime's com.microsoft domain",
    ),
    "contrib-op-unknown-attribute": (
        lambda: model(
            [helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft", name="g", perm=[1, 0])],
            extra_opsets=[("com.microsoft", 1)],
        ),
        "node 'g' (FastGelu): com.microsoft::FastGelu has no attribute 'perm'",
    ),
    "contrib-op-too-many-inputs": (
        lambda: model(
            [helper.make_node("FastGelu", ["x", "x", "x"], ["y"], domain="com.microsoft", name="g")],
            extra_opsets=[("com.microsoft", 1)],
        ),
        "node 'g' (FastGelu): com.microsoft::FastGelu takes 1-2 inputs and 1 outputs, not 3 and 1",
    ),
    "contrib-opset-5": (
        lambda: model([helper.make_node("Relu", ["x"], ["y"])], extra_opsets=[("com.microsoft", 5)]),
        "com.microsoft opset 5 is newer than this ONNX Runtime knows",
    ),
    "ml-opset-99": (
        lambda: model([helper.make_node("Relu", ["x"], ["y"])], extra_opsets=[("ai.onnx.ml", 99)]),
        "ai.onnx.ml opset 99 is newer than this onnx package supports",
    ),
    "function-call-too-many-inputs": (
        lambda: model(
            [helper.make_node("F", ["x", "x", "x"], ["y"], domain="loc", name="call")],
            functions=[
                helper.make_function(
                    "loc",
                    "F",
                    ["a"],
                    ["b"],
                    [helper.make_node("Relu", ["a"], ["b"])],
                    [helper.make_opsetid("", 17)],
                )
            ],
            extra_opsets=[("loc", 1)],
        ),
        "node 'call' (F) calls function 'F' with 3 inputs and 1 outputs; it takes at most 1 and 1",
    ),
    "function-call-without-a-needed-input": (
        lambda: model(
            [helper.make_node("F", ["x", ""], ["y"], domain="loc", name="call")],
            functions=[
                helper.make_function(
                    "loc",
                    "F",
                    ["a", "b"],
                    ["c"],
                    [helper.make_node("Add", ["a", "b"], ["c"])],
                    [helper.make_opsetid("", 17)],
                )
            ],
            extra_opsets=[("loc", 1)],
        ),
        "node 'call' (F) gives no value for input 'b' of function 'F', which its body needs",
    ),
    "contrib-op-input-of-a-wrong-type": (
        lambda: model(
            [helper.make_node("FastGelu", ["i"], ["y"], domain="com.microsoft", name="g")],
            inputs=[helper.make_tensor_value_info("i", TensorProto.INT32, [2, 4])],
            extra_opsets=[("com.microsoft", 1)],
        ),
        "node 'g' (FastGelu): input 'i' is tensor(int32), which com.microsoft::FastGelu does not take",
    ),
    "contrib-op-inputs-of-different-types": (
        lambda: model(
            [helper.make_node("FastGelu", ["x", "b"], ["y"], domain="com.microsoft", name="g")],
            inits=[numpy_helper.from_array(np.ones(4, np.float16), "b")],
            extra_opsets=[("com.microsoft", 1)],
        ),
        "inputs 'x' (tensor(float)) and 'b' (tensor(float16)) must have the same type",
    ),
    "call-of-no-function": (
        lambda: model(
            [helper.make_node("Pow", ["x"], ["y"], domain="loc", name="p")],
            functions=[
                helper.make_function(
                    "loc",
                    "F",
                    ["a"],
                    ["b"],
                    [helper.make_node("Relu", ["a"], ["b"])],
                    [helper.make_opsetid("", 17)],
                )
            ],
            extra_opsets=[("loc", 1)],
        ),
        "node 'p' (Pow) calls 'loc::Pow', which no function of the model defines",
    ),
    "undefined-element-type": (
        lambda: model(
            [helper.make_node("Relu", ["x"], ["y"])], inputs=[helper.make_tensor_value_info("x", 0, [2, 4])]
        ),
        "value 'x' is declared with element type 0",
    ),
    "element-type-999": (
        lambda: model(
            [helper.make_node("Relu", ["x"], ["y"])],
            outputs=[helper.make_tensor_value_info("y", 999, [2, 4])],
        ),
        "value 'y' is declared with element type 999",
    ),
    "data-type-999": (
        lambda: model([helper.make_node("Add", ["x", "w"], ["y"])], inits=[raw("w", 999, [1], b"\0" * 4)]),
        "initializer 'w' has data type 999, which is not an ONNX data type",
    ),
    "output-declared-int64": (
        lambda: model(
            [helper.make_node("Relu", ["x"], ["y"], name="r")],
            outputs=[helper.make_tensor_value_info("y", TensorProto.INT64, [2, 4])],
        ),
        "node 'r' (Relu): Inferred elem type differs",
    ),
}


def _write(tmp_path, case) -> str:
    built = case()
    path = tmp_path / "in.onnx"
    path.write_bytes(built if isinstance(built, bytes) else built.SerializeToString())
    return str(path)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_model_is_refused_with_one_line_naming_where(tmp_path, capsys, name) -> None:
    build, expected = INVALID[name]
    path = _write(tmp_path, build)
    for command in (["optimize", path, "-o", str(tmp_path / "out.onnx")], ["inspect", path]):
        code = main(command)
        err = capsys.readouterr().err.strip("\n").splitlines()
        assert code == 2, (code, err)
        assert len(err) == 1 and err[0].startswith("graphopt: error:") and "Traceback" not in err[0], err
        assert expected in err[0], err[0]
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]
    with pytest.raises(graphopt.GraphoptError):
        graphopt.load(path)


# --- valid models that used to fail --------------------------------------------------------------


def _optimize_and_compare(tmp_path, capsys, proto: onnx.ModelProto, feeds=FEEDS, *extra) -> onnx.ModelProto:
    path = tmp_path / "in.onnx"
    path.write_bytes(proto.SerializeToString())
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(path), "-o", str(out), *extra])
    assert code == 0, capsys.readouterr().err
    expected = run(proto.SerializeToString(), feeds)
    got = run(out.read_bytes(), feeds)
    for r, g in zip(expected, got):
        assert_same(r, g)
    return onnx.load(str(out))


def test_nodes_out_of_topological_order_are_sorted_not_refused(tmp_path, capsys) -> None:
    proto = model([helper.make_node("Relu", ["h"], ["y"]), helper.make_node("Neg", ["x"], ["h"])])
    before = proto.SerializeToString()
    assert [n.op_type for n in _optimize_and_compare(tmp_path, capsys, proto).graph.node] == ["Neg", "Relu"]
    assert proto.SerializeToString() == before  # the caller's proto is untouched
    loaded = graphopt.load(proto)
    assert [n.op_type for n in loaded.graph] == ["Neg", "Relu"]


def test_subgraph_reading_an_outer_value_produced_later_in_the_list(tmp_path, capsys) -> None:
    """The If reads 'h' (produced after it in the node list) from inside its branch: sorted, not refused."""
    branch = then_else(
        [helper.make_node("Neg", ["h"], ["t0"]), helper.make_node("Relu", ["t0"], ["t"])],
        "t",
        outer_value="h",
    )
    proto = model(
        [helper.make_node("If", ["c"], ["y"], **branch), helper.make_node("Abs", ["x"], ["h"])], inputs=[X, C]
    )
    for c in (True, False):
        _optimize_and_compare(tmp_path, capsys, proto, {**FEEDS, "c": np.array(c)})


def test_non_utf8_strings_are_data_not_errors(tmp_path, capsys) -> None:
    s = helper.make_tensor("s", TensorProto.STRING, [2], [b"\xff\xfe", b"ok"])
    z = helper.make_tensor_value_info("z", TensorProto.STRING, [2])
    k = helper.make_tensor_value_info("k", TensorProto.STRING, [2])
    z = helper.make_tensor_value_info("z", TensorProto.STRING, [3])
    proto = model(
        [
            helper.make_node("Relu", ["x"], ["y"]),
            helper.make_node("Concat", ["s", "in"], ["z"], axis=0),
            helper.make_node("Constant", [], ["k"], value_strings=[b"\xfa", b"b"]),
        ],
        inputs=[X, helper.make_tensor_value_info("in", TensorProto.STRING, [1])],
        outputs=[Y, z, k],
        inits=[s],
    )
    path, out_path = tmp_path / "in.onnx", tmp_path / "out.onnx"
    path.write_bytes(proto.SerializeToString())
    assert main(["optimize", str(path), "-o", str(out_path)]) == 0, capsys.readouterr().err
    out = onnx.load(str(out_path))  # (ONNX Runtime's Python binding cannot return non-UTF-8 strings)
    strings = {
        t.name: list(t.string_data) for t in out.graph.initializer if t.data_type == TensorProto.STRING
    }
    assert strings["s"] == [b"\xff\xfe", b"ok"]
    (k_value,) = [t for t in out.graph.initializer if t.name == "k"] or [
        n.attribute[0].t for n in out.graph.node if n.output[0] == "k"
    ]
    assert list(k_value.string_data) == [b"\xfa", b"b"]


def test_folding_a_string_initializer_keeps_a_saveable_model(tmp_path, capsys) -> None:
    # fold-constants leaves string results alone (ir.Tensor cannot serialize them). UTF-8 text, so
    # that ONNX Runtime's Python binding can return the output for the comparison; non-UTF-8
    # strings surviving a save are checked above.
    s = helper.make_tensor("s", TensorProto.STRING, [1], [b"ok"])
    proto = model(
        [helper.make_node("Identity", ["s"], ["z"]), helper.make_node("Relu", ["x"], ["y"])],
        outputs=[Y, helper.make_tensor_value_info("z", TensorProto.STRING, [1])],
        inits=[s],
    )
    _optimize_and_compare(tmp_path, capsys, proto)


def test_contrib_ops_and_allowed_custom_domains_are_valid(tmp_path, capsys) -> None:
    proto = model(
        [helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")],
        extra_opsets=[("com.microsoft", 1)],
    )
    _optimize_and_compare(tmp_path, capsys, proto)
    custom = model(
        [helper.make_node("Foo", ["x"], ["h"], domain="my.ops"), helper.make_node("Relu", ["h"], ["y"])],
        extra_opsets=[("my.ops", 1)],
    )
    path = tmp_path / "custom.onnx"
    path.write_bytes(custom.SerializeToString())
    assert main(["optimize", str(path), "-o", str(tmp_path / "c.onnx"), "--allow-custom-domains"]) == 0


def test_onnx_function_body_quirk_is_not_the_models_fault(tmp_path, capsys) -> None:
    """ONNX's strict inference fails inside MeanVarianceNormalization's own function body for every
    model; ONNX Runtime runs it, so graphopt must too."""
    x4 = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4])
    proto = model(
        [helper.make_node("MeanVarianceNormalization", ["x"], ["y"])],
        inputs=[x4],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 4])],
        opset=13,
    )
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 2, 3, 4)).astype(np.float32)}
    _optimize_and_compare(tmp_path, capsys, proto, feeds)
    # ... but a real error next to it is still found.
    bad = model(
        [
            helper.make_node("MeanVarianceNormalization", ["x"], ["m"]),
            helper.make_node("Cast", ["m"], ["y"], to=999, name="cast"),
        ],
        inputs=[x4],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 4])],
        opset=13,
    )
    with pytest.raises(InvalidModelError, match="node 'cast' .Cast."):
        graphopt.load(bad)


def test_the_checker_never_sees_large_weights(monkeypatch) -> None:
    seen = []
    real = onnx.checker.check_model
    monkeypatch.setattr(
        onnx.checker, "check_model", lambda m, *a, **k: (seen.append(m.ByteSize()), real(m))[1]
    )
    w = numpy_helper.from_array(np.ones((4, 1 << 17), np.float32), "w")  # 2 MiB
    proto = model(
        [helper.make_node("MatMul", ["x4", "w"], ["y"])],
        inputs=[helper.make_tensor_value_info("x4", TensorProto.FLOAT, [2, 4])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1 << 17])],
        inits=[w],
    )
    m = graphopt.load(proto)
    assert seen and max(seen) < 4096
    np.testing.assert_array_equal(m.graph.initializers["w"].const_value.numpy(), np.ones((4, 1 << 17)))
    # The placeholder keeps dtype and shape: a wrong shape is still found.
    bad = model(
        [helper.make_node("MatMul", ["x4", "w"], ["y"], name="mm")],
        inputs=[helper.make_tensor_value_info("x4", TensorProto.FLOAT, [2, 3])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1 << 17])],
        inits=[w],
    )
    with pytest.raises(InvalidModelError, match="node 'mm' .MatMul."):
        graphopt.load(bad)


def test_invalid_model_the_checker_misses_is_still_bad_input(tmp_path, capsys) -> None:
    """A Conv bias of the wrong length passes ONNX's checker and crashed fuse-batchnorm (exit 3);
    ONNX Runtime cannot run it either, so it is bad input (exit 2), saying both."""
    rng = np.random.default_rng(0)
    init = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        for name, shape in [
            ("k", (4, 2, 3, 3)),
            ("kb", (3,)),
            ("s", (4,)),
            ("b", (4,)),
            ("m", (4,)),
            ("v", (4,)),
        ]
    ]
    proto = model(
        [
            helper.make_node("Conv", ["x", "k", "kb"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"]),
        ],
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        inits=init,
    )
    path = tmp_path / "in.onnx"
    path.write_bytes(proto.SerializeToString())
    code = main(["optimize", str(path), "-o", str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err.strip("\n").splitlines()
    assert code == 2 and len(err) == 1, err
    assert "ONNX Runtime cannot run it either" in err[0] and "bias must be a 1D tensor" in err[0], err[0]
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]


def test_graph_io_without_a_shape_is_an_unknown_rank_not_an_error(tmp_path, capsys) -> None:
    """ONNX's checker wants a shape on the main graph's inputs and outputs; ONNX Runtime does not."""
    proto = model([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])])
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    proto.graph.output[0].type.tensor_type.ClearField("shape")
    _optimize_and_compare(tmp_path, capsys, proto)
    # ... and what is wrong downstream of such an input is still found.
    bad = model(
        [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Cast", ["h"], ["y"], to=999, name="c")]
    )
    bad.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(InvalidModelError, match="node 'c' .Cast."):
        graphopt.load(bad)


def test_a_declared_shape_that_contradicts_inference_is_tolerated_like_onnx_runtime(tmp_path, capsys) -> None:
    """Stale declared shapes are common in exported models; ONNX Runtime warns and uses the inferred
    shape (a contradicting element type it refuses, and so does graphopt: see INVALID)."""
    proto = model(
        [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 7])],
    )
    proto.graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [5]))
    out = _optimize_and_compare(tmp_path, capsys, proto)
    # ... and, like ONNX Runtime, uses the inferred shapes: the stale ones are neither trusted nor kept.
    assert [d.dim_value for d in out.graph.output[0].type.tensor_type.shape.dim] == [2, 4]
    assert all(
        v.name != "h" or [d.dim_value for d in v.type.tensor_type.shape.dim] == [2, 4]
        for v in out.graph.value_info
    )
    assert graphopt.load(proto).graph.outputs[0].shape == ir.Shape([2, 4])


def test_a_function_input_the_body_takes_as_optional_may_be_left_out(tmp_path, capsys) -> None:
    f = helper.make_function(
        "loc",
        "F",
        ["a", "lo"],
        ["c"],
        [helper.make_node("Clip", ["a", "lo"], ["c"])],
        [helper.make_opsetid("", 17)],
    )
    proto = model(
        [helper.make_node("F", ["x", ""], ["y"], domain="loc")], functions=[f], extra_opsets=[("loc", 1)]
    )
    _optimize_and_compare(tmp_path, capsys, proto)


def test_a_stale_declared_shape_does_not_hide_an_error_after_it() -> None:
    """A contradicting declared shape stops shape inference early; the rest is still checked."""
    proto = model(
        [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")],
        inits=[numpy_helper.from_array(np.ones((3, 4), np.float32), "w")],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    proto.graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [7, 7]))  # stale
    with pytest.raises(InvalidModelError, match="node 'mm' .MatMul."):
        graphopt.load(proto)

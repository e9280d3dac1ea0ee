"""Fuzzing `graphopt optimize`: seed models, deterministic mutations, and a worker process that runs
each case through the CLI's own code path and classifies the outcome against the exit-code contract.

Used by tests/test_fuzz.py; run by hand for a larger campaign:
``python tests/fuzzing.py --cases 1000 --seed 0`` prints the outcome counts.

Outcomes: ``refused`` (exit 2, one clean line, nothing written), ``correct`` (exit 0, the output
loads and ONNX Runtime gives the same outputs as on the input), ``accepted-unverifiable`` (exit 0,
the output loads, but ONNX Runtime cannot run the input or its inputs cannot be generated, so
there is nothing to compare), ``ort-input`` (ONNX Runtime itself crashed or hung on the input
while comparing: not graphopt's doing). Everything else breaks the contract: ``exit-1``,
``exit-3``, ``exit-N``, ``messy-refusal``, ``wrong-output``, ``broken-output``, ``hang``, ``crash``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

GOOD = ("refused", "correct", "accepted-unverifiable", "ort-input")

# ---------------------------------------------------------------------------------------------
# Seed models: small, valid, and ONNX Runtime runs them


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _model(nodes, inputs, outputs, inits=(), opset=17, functions=(), extra=()):
    graph = helper.make_graph(nodes, "seed", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, v) for d, v in extra]]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8, functions=list(functions))


def seeds() -> dict[str, onnx.ModelProto]:
    rng = np.random.default_rng(0)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    mlp = _model(
        [
            helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.float32([2.0]))),
            helper.make_node("Mul", ["b1", "two"], ["b2"]),
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Identity", ["h"], ["hi"]),
            helper.make_node("Add", ["hi", "b2"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["r"]),
            helper.make_node("Dropout", ["r"], ["d"]),
            helper.make_node("MatMul", ["d", "w2"], ["y"]),
        ],
        [_vi("x", TensorProto.FLOAT, ["N", 8])],
        [_vi("y", TensorProto.FLOAT, ["N", 4])],
        [
            numpy_helper.from_array(w(8, 16), "w1"),
            numpy_helper.from_array(w(16), "b1"),
            numpy_helper.from_array(w(16, 4), "w2"),
        ],
    )
    conv = _model(
        [
            helper.make_node("Conv", ["x", "k", "kb"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"]),
            helper.make_node("Relu", ["n"], ["r"]),
            helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "g", "gb"], ["y"], transB=1),
        ],
        [_vi("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [_vi("y", TensorProto.FLOAT, [1, 3])],
        [
            numpy_helper.from_array(w(4, 2, 3, 3), "k"),
            numpy_helper.from_array(w(4), "kb"),
            numpy_helper.from_array(np.abs(w(4)) + 0.5, "s"),
            numpy_helper.from_array(w(4), "b"),
            numpy_helper.from_array(w(4), "m"),
            numpy_helper.from_array(np.abs(w(4)) + 0.5, "v"),
            numpy_helper.from_array(w(3, 16), "g"),
            numpy_helper.from_array(w(3), "gb"),
        ],
    )
    shapes = _model(
        [
            helper.make_node("Shape", ["x"], ["sh"]),
            helper.make_node("Gather", ["sh", "zero"], ["n"], axis=0),
            helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
            helper.make_node("Concat", ["n1", "minus1"], ["tgt"], axis=0),
            helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
            helper.make_node("Reshape", ["t", "tgt"], ["flat"]),
            helper.make_node("Softmax", ["flat"], ["sm"], axis=-1),
            helper.make_node("ReduceMean", ["sm"], ["mean"], axes=[1], keepdims=1),
            helper.make_node("Greater", ["sm", "mean"], ["mask"]),
            helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
            helper.make_node("Where", ["mask", "sm", "maskf"], ["y"]),
        ],
        [_vi("x", TensorProto.FLOAT, ["B", 3, 4])],
        [_vi("y", TensorProto.FLOAT, ["B", 12])],
        [
            numpy_helper.from_array(np.int64(0), "zero"),
            numpy_helper.from_array(np.int64([0]), "zero1"),
            numpy_helper.from_array(np.int64([-1]), "minus1"),
        ],
        opset=17,
    )
    then = helper.make_graph(
        [helper.make_node("Mul", ["x", "a"], ["t"])], "then", [], [_vi("t", TensorProto.FLOAT, [2, 3])]
    )
    other = helper.make_graph(
        [helper.make_node("Sub", ["x", "a"], ["e"])], "else", [], [_vi("e", TensorProto.FLOAT, [2, 3])]
    )
    branches = _model(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["c"]),
            helper.make_node("If", ["c"], ["i"], then_branch=then, else_branch=other),
            helper.make_node("Tanh", ["i"], ["y"]),
        ],
        [_vi("x", TensorProto.FLOAT, [2, 3])],
        [_vi("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(w(2, 3), "a"), numpy_helper.from_array(np.float32(0), "zero")],
    )
    fn = helper.make_function(
        "local",
        "AddMul",
        ["p", "q"],
        ["r"],
        [helper.make_node("Add", ["p", "q"], ["s"]), helper.make_node("Mul", ["s", "q"], ["r"])],
        [helper.make_opsetid("", 17)],
    )
    function = _model(
        [
            helper.make_node("AddMul", ["x", "c"], ["f"], domain="local"),
            helper.make_node("Sigmoid", ["f"], ["y"]),
        ],
        [_vi("x", TensorProto.FLOAT, [3, 5])],
        [_vi("y", TensorProto.FLOAT, [3, 5])],
        [numpy_helper.from_array(w(3, 5), "c")],
        functions=[fn],
        extra=[("local", 1)],
    )
    contrib = _model(
        [
            helper.make_node("FastGelu", ["x", "bias"], ["g"], domain="com.microsoft"),
            helper.make_node("LayerNormalization", ["g", "gamma", "beta"], ["y"], axis=-1),
        ],
        [_vi("x", TensorProto.FLOAT, ["N", 8])],
        [_vi("y", TensorProto.FLOAT, ["N", 8])],
        [
            numpy_helper.from_array(w(8), "bias"),
            numpy_helper.from_array(w(8), "gamma"),
            numpy_helper.from_array(w(8), "beta"),
        ],
        extra=[("com.microsoft", 1)],
    )
    w_ext = numpy_helper.from_array(np.zeros((8, 4), np.float32), "w")  # w.bin: 4096 zero bytes (campaign)
    w_ext.ClearField("raw_data")
    w_ext.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", "128")):
        w_ext.external_data.add(key=key, value=value)
    sparse_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "seed",
        [_vi("x", TensorProto.FLOAT, ["N", 8])],
        [_vi("y", TensorProto.FLOAT, ["N", 4])],
        [w_ext],
    )
    sparse_graph.sparse_initializer.append(
        helper.make_sparse_tensor(
            numpy_helper.from_array(np.float32([1.5, -2.0]), "b"),
            numpy_helper.from_array(np.int64([1, 3]), "b_i"),
            [4],
        )
    )
    external = helper.make_model(sparse_graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    out = {
        "external": external,
        "mlp": mlp,
        "conv": conv,
        "shapes": shapes,
        "branches": branches,
        "function": function,
        "contrib": contrib,
    }
    for name, m in out.items():
        if name != "external":  # (its data file is written next to each case)
            onnx.checker.check_model(m, full_check=True)
    return out


# ---------------------------------------------------------------------------------------------
# Mutations

_OPS = sorted({s.name for s in onnx.defs.get_all_schemas() if s.domain == ""})
_WEIRD_INTS = [-(2**63), -(2**40), -2, -1, 0, 1, 2, 3, 7, 999, 2**31, 2**40]
_LOCATIONS = ["secret.bin", "../secret.bin", "/etc/passwd", "w.bin", "sub/../w.bin", "", "w.bin\x00x"]


def _graphs(g: onnx.GraphProto) -> list[onnx.GraphProto]:
    out = [g]
    for n in g.node:
        for a in n.attribute:
            if a.HasField("g"):
                out.extend(_graphs(a.g))
            for sub in a.graphs:
                out.extend(_graphs(sub))
    return out


def _values(g: onnx.GraphProto) -> list[str]:
    names = [v.name for v in g.input] + [t.name for t in g.initializer]
    return names + [o for n in g.node for o in n.output]


def mutate(proto: onnx.ModelProto, rng: random.Random) -> bytes:
    """One hostile variant of ``proto``: byte-level damage, or 1-3 structured mutations."""
    if rng.random() < 0.3:
        return _mutate_bytes(proto.SerializeToString(), rng)
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    for _ in range(rng.randint(1, 3)):
        rng.choice(_STRUCTURED)(m, rng)
    data = m.SerializeToString()
    return _mutate_bytes(data, rng) if rng.random() < 0.1 else data


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del b[rng.randrange(1, len(b)) :]
    elif kind == 2:
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == 3:
        i = rng.randrange(len(b))
        j = min(len(b), i + rng.randint(1, 64))
        b[j:j] = b[i:j]
    else:
        i = rng.randrange(len(b))
        b[i : i + rng.randint(1, 16)] = bytes(rng.randint(1, 16))
    return bytes(b)


def _some_node(m, rng):
    g = rng.choice(_graphs(m.graph))
    return g, (rng.choice(g.node) if g.node else None)


def _rename_input(m, rng):
    g, n = _some_node(m, rng)
    if n is not None and n.input:
        i = rng.randrange(len(n.input))
        n.input[i] = rng.choice(["ghost", "", *_values(g)])


def _drop_or_add_input(m, rng):
    g, n = _some_node(m, rng)
    if n is None:
        return
    if n.input and rng.random() < 0.5:
        del n.input[rng.randrange(len(n.input))]
    else:
        n.input.append(rng.choice(_values(g) or ["x"]))


def _rename_output(m, rng):
    g, n = _some_node(m, rng)
    if n is not None and n.output:
        n.output[0] = rng.choice(["", "dup", *_values(g)])


def _reorder(m, rng):
    g = rng.choice(_graphs(m.graph))
    nodes = list(g.node)
    rng.shuffle(nodes)
    copies = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        copies.append(c)
    del g.node[:]
    g.node.extend(copies)


def _op_type(m, rng):
    _, n = _some_node(m, rng)
    if n is not None:
        n.op_type = rng.choice([*rng.sample(_OPS, 3), "Frob", "", "relu"])
        if rng.random() < 0.2:
            n.domain = rng.choice(["com.microsoft", "ai.onnx.ml", "nowhere", "local"])


def _attribute(m, rng):
    _, n = _some_node(m, rng)
    if n is None:
        return
    kind = rng.randrange(4)
    if kind == 0 or not n.attribute:
        n.attribute.append(
            helper.make_attribute(
                rng.choice(["axis", "to", "perm", "foo", "kernel_shape"]),
                rng.choice([rng.choice(_WEIRD_INTS), [rng.choice(_WEIRD_INTS)], "abc", 1.5]),
            )
        )
        return
    a = rng.choice(n.attribute)
    if kind == 1:
        n.attribute.remove(a)
    elif kind == 2 and a.type == onnx.AttributeProto.INT:
        a.i = rng.choice(_WEIRD_INTS)
    elif kind == 2 and a.type == onnx.AttributeProto.INTS and a.ints:
        a.ints[rng.randrange(len(a.ints))] = rng.choice(_WEIRD_INTS)
    else:
        a.type = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 11])


def _initializer(m, rng):
    inits = [t for g in _graphs(m.graph) for t in g.initializer]
    if not inits:
        return
    t = rng.choice(inits)
    kind = rng.randrange(6)
    if kind == 0:
        t.data_type = rng.choice([0, 2, 3, 6, 7, 8, 9, 10, 11, 16, 17, 21, 22, 999])
    elif kind == 1 and t.dims:
        t.dims[rng.randrange(len(t.dims))] = rng.choice(_WEIRD_INTS)
    elif kind == 1:
        t.dims.append(rng.choice(_WEIRD_INTS))
    elif kind == 2 and t.HasField("raw_data"):
        t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data) + 1)]
    elif kind == 3 and t.HasField("raw_data"):
        t.raw_data = t.raw_data + bytes(rng.randint(1, 8))
    elif kind == 4:
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value=rng.choice(_LOCATIONS))
        if rng.random() < 0.5:
            t.external_data.add(key="offset", value=str(rng.choice([0, 4, -8, 10**12])))
    else:
        del t.dims[:]


def _io(m, rng):
    g = m.graph
    kind = rng.randrange(5)
    if kind == 0 and g.input:
        del g.input[rng.randrange(len(g.input))]
    elif kind == 1 and g.output:
        del g.output[rng.randrange(len(g.output))]
    elif kind == 2 and g.output:
        g.output[0].name = rng.choice(["", "ghost", *_values(g)])
    elif kind == 3:
        v = rng.choice([*g.input, *g.output])
        v.type.tensor_type.elem_type = rng.choice([0, 2, 6, 7, 9, 10, 11, 16, 999])
    else:
        v = rng.choice([*g.input, *g.output])
        dims = v.type.tensor_type.shape.dim
        if dims:
            dims[rng.randrange(len(dims))].dim_value = rng.choice([0, 1, 2, 5, 2**31])


def _versions(m, rng):
    if rng.random() < 0.3:
        m.ir_version = rng.choice([0, 1, 3, 4, 7, 10, 11, 99])
    elif rng.random() < 0.5:
        m.opset_import[0].version = rng.choice([0, 1, 6, 7, 11, 13, 14, 18, 21, 30, 999])
    elif len(m.opset_import) > 1:
        del m.opset_import[rng.randrange(1, len(m.opset_import))]
    else:
        m.opset_import.add(domain=rng.choice(["com.microsoft", "x"]), version=rng.choice([0, 1, 5]))


def _nodes(m, rng):
    g = rng.choice(_graphs(m.graph))
    if not g.node:
        return
    i = rng.randrange(len(g.node))
    if rng.random() < 0.5:
        del g.node[i]
    else:
        g.node.add().CopyFrom(g.node[i])


def _value_info(m, rng):
    g = m.graph
    name = rng.choice(_values(g) or ["x"])
    g.value_info.append(
        helper.make_tensor_value_info(
            name, rng.choice([1, 6, 7, 9]), rng.choice([None, [], [1], [2, 3], ["Z", 2]])
        )
    )


def _strings(m, rng):
    g, n = _some_node(m, rng)
    target = n if n is not None else g
    target.doc_string = rng.choice(["ok", "é", "\u202e"])
    if n is not None:
        n.name = rng.choice(["", "n", "a/b", "x" * 300, "é"])


def _special_values(m, rng):
    """Valid: an initializer's values become zeros, NaN, infinities, huge or tiny numbers."""
    inits = [
        t
        for g in _graphs(m.graph)
        for t in g.initializer
        if t.data_type in (TensorProto.FLOAT, TensorProto.INT64)
    ]
    if not inits:
        return
    t = rng.choice(inits)
    try:
        arr = numpy_helper.to_array(t).copy()
    except Exception:  # an earlier mutation broke it already
        return
    if arr.size:
        flat = arr.reshape(-1)
        pick = [rng.randrange(flat.size) for _ in range(rng.randint(1, flat.size))]
        if arr.dtype == np.float32:
            flat[pick] = rng.choice([0.0, -0.0, np.nan, np.inf, -np.inf, 3e38, 1e-45, -1.0])
        else:
            flat[pick] = rng.choice([0, -1, 1, 2**62])
    t.CopyFrom(numpy_helper.from_array(arr, t.name))


def _valid_attribute(m, rng):
    """Usually valid: an int attribute takes a small value (-1, 0, 1, 2), ints a permutation."""
    _, n = _some_node(m, rng)
    if n is None or not n.attribute:
        return
    a = rng.choice(n.attribute)
    if a.type == onnx.AttributeProto.INT:
        a.i = rng.choice([-1, 0, 1, 2])
    elif a.type == onnx.AttributeProto.INTS and a.ints:
        values = list(a.ints)
        rng.shuffle(values)
        a.ints[:] = values
    elif a.type == onnx.AttributeProto.FLOAT:
        a.f = rng.choice([0.0, 0.5, 1.0, -2.0, 1e-12])


def _loosen(m, rng):
    """Valid: the declared output dims become symbolic (and value_info goes), so mutations that change
    sizes keep the model valid."""
    for v in m.graph.output:
        for i, d in enumerate(v.type.tensor_type.shape.dim):
            d.dim_param = f"d{i}"
    del m.graph.value_info[:]


_STRUCTURED = [
    _special_values,
    _valid_attribute,
    _loosen,
    _loosen,
    _rename_input,
    _drop_or_add_input,
    _rename_output,
    _reorder,
    _op_type,
    _attribute,
    _initializer,
    _io,
    _versions,
    _nodes,
    _value_info,
    _strings,
]


def cases(n: int, seed: int) -> list[tuple[str, bytes]]:
    """``n`` deterministic cases (name, model bytes), cycling over the seed models."""
    models = seeds()
    names = sorted(models)
    out = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        name = names[i % len(names)]
        out.append((f"{name}-{i}", mutate(models[name], rng)))
    return out


# ---------------------------------------------------------------------------------------------
# Running one case (inside the worker process)


def _ort_session(model: str | bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _same(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind in "fc":
        return bool(
            np.allclose(
                a.astype(np.complex128 if a.dtype.kind == "c" else np.float64),
                b.astype(np.complex128 if b.dtype.kind == "c" else np.float64),
                rtol=1e-3,
                atol=1e-4,
                equal_nan=True,
            )
        )
    return bool(np.array_equal(a, b))


_RANDOM_OPS = frozenset(
    {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial", "Bernoulli"}
)


@contextlib.contextmanager
def _captured_fds():
    """What the CLI writes to file descriptors 1 and 2, C++ libraries' logs included (which
    contextlib.redirect_stderr would miss); the dict is filled when the block ends."""
    result: dict[str, str] = {}
    saved = [os.dup(1), os.dup(2)]
    files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        for fd, f in zip((1, 2), files):
            os.dup2(f.fileno(), fd)
        yield result
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
        for key, f in zip(("stdout", "stderr"), files):
            f.seek(0)
            result[key] = f.read().decode("utf-8", "replace")
            f.close()


def run_case(
    path: str, out_dir: str, phase=lambda name: None, check_refusals: bool = False
) -> dict[str, Any]:
    """``graphopt optimize PATH -o OUT_DIR/out.onnx`` in this process, then the contract checks."""
    from graphopt.cli import main

    out = os.path.join(out_dir, "out.onnx")
    phase("optimize")
    with _captured_fds() as captured:
        code = main(["optimize", path, "-o", out])
    stderr_text = captured["stderr"]
    err = stderr_text.strip("\n").splitlines()
    line = err[0] if err else ""
    written = sorted(os.listdir(out_dir))
    if code == 2:
        clean = (
            len(err) == 1
            and line.startswith("graphopt: error:")
            and "Traceback" not in stderr_text
            and written == []
        )
        result = {
            "outcome": "refused" if clean else "messy-refusal",
            "code": code,
            "line": line,
            "written": written,
        }
        if check_refusals:  # does ONNX Runtime accept what graphopt refused? (for the report)
            phase("ort-input")
            try:
                _ort_session(path)
                result["ort_accepts"] = True
            except Exception:
                result["ort_accepts"] = False
        return result
    if code != 0:
        return {"outcome": f"exit-{code}", "code": code, "line": line}
    import graphopt
    from graphopt.inputs import generate_inputs

    try:  # (not ONNX's checker: it refuses what the input may have had too, e.g. I/O without a shape)
        graphopt.load(out)
    except Exception as e:
        return {"outcome": "broken-output", "code": 0, "line": f"{type(e).__name__}: {str(e)[:200]}"}

    if any(n.op_type in _RANDOM_OPS for n in onnx.load_from_string(open(path, "rb").read()).graph.node):
        return {
            "outcome": "accepted-unverifiable",
            "code": 0,
            "line": "random ops: outputs differ run to run",
        }
    phase("ort-input")
    try:
        feeds = generate_inputs(graphopt.load(path))
        expected = _ort_session(path).run(None, feeds)  # from its path: external data resolves
    except Exception as e:
        return {"outcome": "accepted-unverifiable", "code": 0, "line": f"{type(e).__name__}: {str(e)[:120]}"}
    if any(np.asarray(v).dtype.kind in "fc" and not np.isfinite(np.asarray(v)).all() for v in expected):
        # Overflow and NaN are where fused or reassociated float arithmetic may legitimately differ.
        return {"outcome": "accepted-unverifiable", "code": 0, "line": "the input's outputs are not finite"}
    phase("ort-output")
    try:
        got = _ort_session(out).run(None, feeds)
    except Exception as e:
        return {"outcome": "broken-output", "code": 0, "line": f"ORT: {type(e).__name__}: {str(e)[:200]}"}
    if len(got) != len(expected) or not all(_same(a, b) for a, b in zip(expected, got)):
        return {"outcome": "wrong-output", "code": 0, "line": "outputs differ from the input model's"}
    return {"outcome": "correct", "code": 0, "line": ""}


def worker() -> None:
    """Read case paths from stdin (one per line), answer with JSON lines; the CLI's own output is
    kept off the protocol channel."""
    import resource

    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    proto_out = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)

    def phase(name: str) -> None:
        proto_out.write(json.dumps({"phase": name}) + "\n")

    import graphopt.cli  # noqa: F401  (imported before the first case, not inside its timeout)

    proto_out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        path, out_dir = json.loads(line)
        try:
            result = run_case(
                path, out_dir, phase, check_refusals=bool(os.environ.get("FUZZ_CHECK_REFUSALS"))
            )
        except BaseException as e:  # the contract checks themselves failed
            result = {"outcome": "crash", "line": f"{type(e).__name__}: {str(e)[:200]}"}
        proto_out.write(json.dumps(result) + "\n")


# ---------------------------------------------------------------------------------------------
# Driving the worker (in the test process)


class Runner:
    """Runs cases in a worker process with a per-case timeout; restarts it after a hang or crash."""

    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self._buffer = b""

    def _start(self) -> None:
        env = dict(
            os.environ,
            PYTHONPATH=os.path.dirname(os.path.abspath(__file__))
            + os.pathsep
            + os.environ.get("PYTHONPATH", ""),
            OMP_NUM_THREADS="1",
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import fuzzing; fuzzing.worker()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            bufsize=0,
        )
        self._buffer = b""
        msg = self._read(120.0)
        if msg is None or not msg.get("ready"):
            raise RuntimeError("fuzz worker did not start")

    def _read(self, timeout: float) -> dict | None:
        """The next JSON line (None on timeout); raw reads, so no line waits in a Python buffer
        while select() says there is nothing to read."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return {"eof": True}
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, path: str, out_dir: str) -> dict[str, Any]:
        if self.proc is None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps([path, out_dir]) + "\n").encode())
        self.proc.stdin.flush()
        phase = "start"
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._read(max(0.0, deadline - time.monotonic()))
            if msg is None or msg.get("eof"):
                how = "hang" if msg is None else "crash"
                self.stop()
                if phase == "ort-input":  # ONNX Runtime on the untouched input: not graphopt's doing
                    return {"outcome": "ort-input", "line": f"ONNX Runtime {how} on the input"}
                return {"outcome": how, "line": f"{how} during {phase}"}
            if "phase" in msg:
                phase = msg["phase"]
                continue
            return msg


def campaign(n: int, seed: int, timeout: float = 60.0, keep: str | None = None) -> tuple[Counter, list]:
    """Run ``n`` cases; returns the outcome counts and the contract-breaking cases."""
    counts: Counter = Counter()
    bad = []
    refused_but_loadable: list = []
    runner = Runner(timeout)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name, data in cases(n, seed):
                case_dir = os.path.join(keep or tmp, name)
                os.makedirs(case_dir, exist_ok=True)
                out_dir = os.path.join(case_dir, "out")
                os.makedirs(out_dir, exist_ok=True)
                path = os.path.join(case_dir, "model.onnx")
                with open(path, "wb") as f:
                    f.write(data)
                with open(os.path.join(case_dir, "w.bin"), "wb") as f:  # for mutated external references
                    f.write(bytes(4096))
                result = runner.run(path, out_dir)
                counts[result["outcome"]] += 1
                if result.get("ort_accepts"):
                    counts["refused, ONNX Runtime loads it"] += 1
                    refused_but_loadable.append((name, result["line"]))
                if result["outcome"] not in GOOD:
                    bad.append((name, result))
        finally:
            runner.stop()
    if os.environ.get("FUZZ_CHECK_REFUSALS"):
        for name, line in refused_but_loadable:
            print("refused, ONNX Runtime loads it:", name, line, file=sys.stderr)
    return counts, bad


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="keep every case's files under this folder")
    a = ap.parse_args()
    t0 = time.monotonic()
    counts, bad = campaign(a.cases, a.seed, keep=a.keep)
    print(
        json.dumps(
            {
                "cases": a.cases,
                "seed": a.seed,
                "seconds": round(time.monotonic() - t0, 1),
                "outcomes": dict(counts.most_common()),
            },
            indent=2,
        )
    )
    for name, result in bad:
        print(name, result)

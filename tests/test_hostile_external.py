"""Sparse initializers' external data is resolved against the model's folder (never the working
directory) and passes every check dense external data passes; external STRING tensors are refused."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from corpus import run
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

import graphopt
from graphopt.cli import main
from graphopt.errors import ModelLoadError, UnsafeExternalDataError

W = np.zeros((8, 4), np.float32)
W[1, 2], W[5, 0], W[7, 3] = 1.5, -2.0, 4.0
VALUES = W[W != 0].astype(np.float32)  # 12 bytes
INDICES = np.flatnonzero(W).astype(np.int64)
SECRET = np.float32([111, 222, 333]).tobytes()


def sparse_model(
    location: str, *, offset: int = 0, length: int | None = None, indices_external: bool = False
) -> onnx.ModelProto:
    """x[2, 8] @ w[8, 4] where w is a sparse initializer whose values live in ``location``."""
    values = numpy_helper.from_array(VALUES, "w")
    set_external_data(values, location=location, offset=offset, length=12 if length is None else length)
    values.ClearField("raw_data")
    values.data_location = TensorProto.EXTERNAL
    indices = numpy_helper.from_array(INDICES, "w_indices")
    if indices_external:
        set_external_data(indices, location=location, offset=offset + 12, length=24)
        indices.ClearField("raw_data")
        indices.data_location = TensorProto.EXTERNAL
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [8, 4]))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def write(folder, proto, name="model.onnx"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(proto.SerializeToString())
    return path


def test_sparse_external_data_is_not_read_from_the_working_directory(tmp_path, monkeypatch, capsys) -> None:
    """The reproducer: a sparse initializer naming secret.bin pulled the victim's file into the output."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret.bin").write_bytes(SECRET)
    model = write(tmp_path / "attacker", sparse_model("secret.bin"))
    monkeypatch.chdir(victim)
    out = victim / "out.onnx"
    code = main(["optimize", str(model), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        code == 2 and len(err) == 1 and "secret.bin" in err[0] and "not found next to the model" in err[0]
    ), err
    assert not out.exists()
    with pytest.raises(ModelLoadError, match="not found next to the model"):
        graphopt.load(model)


@pytest.mark.parametrize("indices_external", [False, True])
def test_sparse_external_data_next_to_the_model_loads_from_any_working_directory(
    tmp_path, monkeypatch, capsys, indices_external
) -> None:
    folder = tmp_path / "m"
    model = write(folder, sparse_model("w.bin", indices_external=indices_external))
    (folder / "w.bin").write_bytes(VALUES.tobytes() + INDICES.tobytes())
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    m = graphopt.load(model)
    np.testing.assert_array_equal(m.graph.initializers["w"].const_value.numpy(), W)
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(model), "-o", str(out)]) == 0, capsys.readouterr().err
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    np.testing.assert_allclose(run(out.read_bytes(), {"x": x})[0], x @ W, rtol=1e-6)
    # Handed over as bytes, the folder must be given, and then works the same.
    with pytest.raises(ModelLoadError, match="base_dir"):
        graphopt.load(model.read_bytes())
    np.testing.assert_array_equal(
        graphopt.load(model.read_bytes(), base_dir=folder).graph.initializers["w"].const_value.numpy(), W
    )


def _secret(tmp_path):
    (tmp_path / "secret.bin").write_bytes(SECRET)


UNSAFE = {
    "absolute": lambda t: write(t / "m", sparse_model(str(t / "secret.bin"))),
    "dotdot": lambda t: write(t / "m", sparse_model("../secret.bin")),
    "symlink": lambda t: (
        write(t / "m", sparse_model("w.bin")),
        os.symlink(t / "secret.bin", t / "m" / "w.bin"),
    )[0],
    "hard-link": lambda t: (
        write(t / "m", sparse_model("w.bin")),
        os.link(t / "secret.bin", t / "m" / "w.bin"),
    )[0],
    "past-end": lambda t: (
        write(t / "m", sparse_model("w.bin", offset=8)),
        (t / "m" / "w.bin").write_bytes(SECRET),
    )[0],
    "short-length": lambda t: (
        write(t / "m", sparse_model("w.bin", length=4)),
        (t / "m" / "w.bin").write_bytes(SECRET),
    )[0],
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_sparse_external_data_is_refused(tmp_path, case, capsys) -> None:
    _secret(tmp_path)
    path = UNSAFE[case](tmp_path)
    with pytest.raises(UnsafeExternalDataError) as e:
        graphopt.load(path)
    assert str(path) in str(e.value) and "sparse initializer 'w'" in str(e.value)
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(path), "-o", str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not out.exists()


def test_external_string_tensor_is_refused(tmp_path, capsys) -> None:
    t = TensorProto(name="s", data_type=TensorProto.STRING, dims=[2], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "s.bin"), ("offset", "0"), ("length", "2")):
        t.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.STRING, [2])],
        [t],
    )
    folder = tmp_path / "m"
    path = write(folder, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    (folder / "s.bin").write_bytes(b"ab")
    with pytest.raises(ModelLoadError, match="a STRING tensor cannot be stored as external data"):
        graphopt.load(path)
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "initializer 's'" in err[0] and not out.exists()


def test_sparse_indices_out_of_range_are_refused() -> None:
    values = numpy_helper.from_array(np.float32([1.0]), "w")
    indices = numpy_helper.from_array(np.int64([-1]), "w_indices")  # numpy would wrap it around
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(ModelLoadError, match="sparse_initializer:w.*out of range"):  # ONNX's checker
        graphopt.load(proto)
    from graphopt.external import densify_sparse_initializers

    with pytest.raises(ModelLoadError, match="sparse initializer 'w' is malformed .indices out of range"):
        densify_sparse_initializers(proto, "<m>", None)

"""graphopt.load/save/to_bytes: every source kind, lazy and safe external data, atomic writes,
input files never overwritten, byte-identical output for the same input."""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import FEEDS, W1, external_ref_model, mlp_proto, reference_output, save_external
from corpus import run

import graphopt
from graphopt.errors import (
    GraphoptError,
    ModelLoadError,
    OutputError,
    UnsafeExternalDataError,
    UnsupportedModelError,
)

# ``graphopt.ir`` the module (the package namespace also sees onnx_ir under that name at times).
gir = importlib.import_module("graphopt.ir")


def sha256(path: os.PathLike | str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def outputs_of(model_or_path) -> np.ndarray:
    if isinstance(model_or_path, ir.Model):
        data = graphopt.to_bytes(model_or_path)
    else:
        data = graphopt.to_bytes(graphopt.load(model_or_path))
    return run(data, FEEDS)[0]


def assert_one_line(err: BaseException) -> None:
    msg = str(err)
    assert msg and "\n" not in msg.strip(), f"message is not one line: {msg!r}"
    assert isinstance(err, GraphoptError)


def leftovers(folder) -> list[str]:
    """Temporary files _atomic_write may have left (dot-files ending in .tmp)."""
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp") or n.startswith("."))


# --- loading: every source kind ----------------------------------------------------------------


def test_load_accepts_path_str_bytes_proto_and_ir_model(mlp_path) -> None:
    proto = mlp_proto()
    from_path = graphopt.load(mlp_path)
    from_str = graphopt.load(str(mlp_path))
    from_bytes = graphopt.load(proto.SerializeToString())
    from_proto = graphopt.load(proto)
    assert graphopt.load(from_proto) is from_proto
    expected = graphopt.to_bytes(from_proto)
    for m in (from_path, from_str, from_bytes):
        assert isinstance(m, ir.Model)
        assert graphopt.to_bytes(m) == expected
    np.testing.assert_allclose(outputs_of(from_path), reference_output(), rtol=1e-5, atol=1e-5)


def test_load_keeps_external_data_lazy(mlp_ext_path, monkeypatch) -> None:
    def no_read(self):
        raise AssertionError("external data was read during load")

    monkeypatch.setattr(ir.ExternalTensor, "_load", no_read)
    model = graphopt.load(mlp_ext_path)
    tensors = {v.name: v.const_value for v in model.graph.initializers.values()}
    assert set(tensors) == {"w1", "b1", "w2"}
    assert all(isinstance(t, ir.ExternalTensor) for t in tensors.values())
    monkeypatch.undo()
    # Read on demand from the model's folder, whatever the working directory.
    monkeypatch.chdir(mlp_ext_path.parent.parent)
    np.testing.assert_array_equal(tensors["w1"].numpy(), W1)
    np.testing.assert_allclose(outputs_of(model), reference_output(), rtol=1e-5, atol=1e-5)


def test_external_data_from_bytes_needs_base_dir(mlp_ext_path) -> None:
    data = mlp_ext_path.read_bytes()
    with pytest.raises(ModelLoadError, match="base_dir") as e:
        graphopt.load(data)
    assert_one_line(e.value)
    model = graphopt.load(data, base_dir=mlp_ext_path.parent)
    np.testing.assert_allclose(outputs_of(model), reference_output(), rtol=1e-5, atol=1e-5)
    model = graphopt.load(
        onnx.load(str(mlp_ext_path), load_external_data=False), base_dir=mlp_ext_path.parent
    )
    np.testing.assert_allclose(outputs_of(model), reference_output(), rtol=1e-5, atol=1e-5)


# --- loading: refusing bad and unsafe files ----------------------------------------------------


def _write_model(folder, proto: onnx.ModelProto, name: str = "model.onnx"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(proto.SerializeToString())
    return path


DATA = np.arange(16, dtype=np.float32).tobytes()  # 64 bytes: one 4x4 float tensor


def _absolute(tmp_path):
    return _write_model(tmp_path / "m", external_ref_model("/etc/passwd"))


def _windows_absolute(tmp_path):
    return _write_model(tmp_path / "m", external_ref_model("C:\\x"))


def _dotdot(tmp_path):
    (tmp_path / "secret.bin").write_bytes(DATA)
    return _write_model(tmp_path / "m", external_ref_model("../secret.bin"))


def _dotdot_inside(tmp_path):
    (tmp_path / "secret.bin").write_bytes(DATA)
    return _write_model(tmp_path / "m", external_ref_model("sub/../../secret.bin"))


def _dotdot_backslash(tmp_path):
    (tmp_path / "secret.bin").write_bytes(DATA)
    return _write_model(tmp_path / "m", external_ref_model("..\\secret.bin"))


def _symlinked_file(tmp_path):
    (tmp_path / "secret.bin").write_bytes(DATA)
    path = _write_model(tmp_path / "m", external_ref_model("w.bin"))
    os.symlink(tmp_path / "secret.bin", tmp_path / "m" / "w.bin")
    return path


def _symlink_inside_folder(tmp_path):
    # A link whose target is inside the folder is refused too: links are never followed.
    path = _write_model(tmp_path / "m", external_ref_model("w.bin"))
    (tmp_path / "m" / "real.bin").write_bytes(DATA)
    os.symlink("real.bin", tmp_path / "m" / "w.bin")
    return path


def _symlinked_folder(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "w.bin").write_bytes(DATA)
    path = _write_model(tmp_path / "m", external_ref_model("sub/w.bin"))
    os.symlink(tmp_path / "elsewhere", tmp_path / "m" / "sub")
    return path


def _hard_link(tmp_path):
    (tmp_path / "secret.bin").write_bytes(DATA)
    path = _write_model(tmp_path / "m", external_ref_model("w.bin"))
    os.link(tmp_path / "secret.bin", tmp_path / "m" / "w.bin")
    return path


def _offset_past_end(tmp_path):
    path = _write_model(tmp_path / "m", external_ref_model("w.bin", offset=32))
    (tmp_path / "m" / "w.bin").write_bytes(DATA)
    return path


def _length_past_end(tmp_path):
    path = _write_model(tmp_path / "m", external_ref_model("w.bin", length=4096))
    (tmp_path / "m" / "w.bin").write_bytes(DATA)
    return path


def _short_length(tmp_path):
    path = _write_model(tmp_path / "m", external_ref_model("w.bin", length=8))
    (tmp_path / "m" / "w.bin").write_bytes(DATA)
    return path


def _attribute_dotdot(tmp_path):
    (tmp_path / "secret.bin").write_bytes(DATA)
    return _write_model(tmp_path / "m", external_ref_model("../secret.bin", as_attribute=True))


UNSAFE = {
    "absolute": _absolute,
    "windows-absolute": _windows_absolute,
    "dotdot": _dotdot,
    "dotdot-inside": _dotdot_inside,
    "dotdot-backslash": _dotdot_backslash,
    "symlinked-file": _symlinked_file,
    "symlink-inside-folder": _symlink_inside_folder,
    "symlinked-folder": _symlinked_folder,
    "hard-link": _hard_link,
    "offset-past-end": _offset_past_end,
    "length-past-end": _length_past_end,
    "length-shorter-than-tensor": _short_length,
    "constant-attribute-dotdot": _attribute_dotdot,
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_external_data_is_refused(tmp_path, case) -> None:
    path = UNSAFE[case](tmp_path)
    with pytest.raises(UnsafeExternalDataError) as e:
        graphopt.load(path)
    assert_one_line(e.value)
    assert str(path) in str(e.value)
    # The same proto handed over as bytes with its folder is checked the same way.
    with pytest.raises(UnsafeExternalDataError):
        graphopt.load(path.read_bytes(), base_dir=path.parent)


def test_valid_external_reference_loads(tmp_path) -> None:
    path = _write_model(tmp_path / "m", external_ref_model("w.bin", offset=64))
    (tmp_path / "m" / "w.bin").write_bytes(b"\0" * 64 + DATA)
    model = graphopt.load(path)
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy().ravel(), np.arange(16))


def test_missing_external_data_file_is_a_load_error(tmp_path) -> None:
    path = _write_model(tmp_path / "m", external_ref_model("w.bin"))
    with pytest.raises(ModelLoadError, match="w.bin") as e:
        graphopt.load(path)
    assert not isinstance(e.value, UnsafeExternalDataError)
    assert_one_line(e.value)


def _valid_bytes() -> bytes:
    return mlp_proto().SerializeToString()


BAD_FILES = {
    "truncated": lambda: _valid_bytes()[: len(_valid_bytes()) // 2],
    "png": lambda: b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10\x08\x06\0\0\0",
    "text": lambda: b"hello, this is not a model\n",
    "empty": lambda: b"",
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_model_files_are_load_errors(tmp_path, case) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(BAD_FILES[case]())
    with pytest.raises(ModelLoadError) as e:
        graphopt.load(path)
    assert_one_line(e.value)


def test_missing_file_and_folder_are_load_errors(tmp_path) -> None:
    for path in (tmp_path / "nope.onnx", tmp_path):
        with pytest.raises(ModelLoadError) as e:
            graphopt.load(path)
        assert_one_line(e.value)
    with pytest.raises(ModelLoadError):
        graphopt.load(12)  # type: ignore[arg-type]


def test_newer_opset_is_unsupported() -> None:
    proto = mlp_proto()
    proto.opset_import[0].version = 999
    with pytest.raises(UnsupportedModelError, match="999") as e:
        graphopt.load(proto)
    assert_one_line(e.value)


def test_newer_ir_version_is_unsupported() -> None:
    proto = mlp_proto()
    proto.ir_version = onnx.IR_VERSION + 1
    with pytest.raises(UnsupportedModelError, match="IR version") as e:
        graphopt.load(proto.SerializeToString())
    assert_one_line(e.value)


def test_unknown_custom_domain_is_unsupported_unless_allowed() -> None:
    proto = mlp_proto()
    proto.graph.node.append(onnx.helper.make_node("Foo", ["y"], ["z"], domain="my.custom.domain"))
    proto.graph.output[0].name = "z"
    proto.opset_import.append(onnx.helper.make_opsetid("my.custom.domain", 1))
    with pytest.raises(UnsupportedModelError, match="my.custom.domain::Foo") as e:
        graphopt.load(proto)
    assert_one_line(e.value)
    model = graphopt.load(proto, allow_custom_domains=True)
    assert any(n.domain == "my.custom.domain" for n in model.graph)


# --- saving ------------------------------------------------------------------------------------


def test_save_inline_round_trips_and_leaves_no_temp_files(tmp_path, mlp_path) -> None:
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    graphopt.save(graphopt.load(mlp_path), out)
    assert sorted(os.listdir(out.parent)) == ["m.onnx"]
    np.testing.assert_allclose(outputs_of(out), reference_output(), rtol=1e-5, atol=1e-5)
    assert out.read_bytes() == graphopt.to_bytes(graphopt.load(mlp_path))


def test_save_external_data_writes_name_data_next_to_the_model(tmp_path, mlp_path) -> None:
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    model = graphopt.load(mlp_path)
    graphopt.save(model, out, external_data=True)
    assert sorted(os.listdir(out.parent)) == ["m.onnx", "m.onnx.data"]
    proto = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"m.onnx.data"}  # w1 and w2 (>= 1 KiB); b1 stays inline
    assert out.stat().st_size < W1.nbytes
    # ONNX Runtime reads it from its path, and graphopt reloads it lazily with the same outputs.
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, FEEDS)[0], reference_output(), rtol=1e-5, atol=1e-5)
    reloaded = graphopt.load(out)
    assert isinstance(reloaded.graph.initializers["w1"].const_value, ir.ExternalTensor)
    np.testing.assert_array_equal(outputs_of(reloaded), outputs_of(model))
    # Saving did not rewire the in-memory model to the new file.
    assert not isinstance(model.graph.initializers["w1"].const_value, ir.ExternalTensor)


def test_save_external_with_custom_location(tmp_path, mlp_path) -> None:
    out = tmp_path / "m.onnx"
    graphopt.save(graphopt.load(mlp_path), out, external_data="w.bin")
    assert (tmp_path / "w.bin").is_file()
    np.testing.assert_allclose(outputs_of(out), reference_output(), rtol=1e-5, atol=1e-5)
    for bad in ("../w.bin", "/tmp/w.bin"):
        with pytest.raises(GraphoptError):
            graphopt.save(graphopt.load(mlp_path), tmp_path / "n.onnx", external_data=bad)
    assert not (tmp_path / "n.onnx").exists()


def test_model_with_external_data_saved_elsewhere_is_self_contained(tmp_path, mlp_ext_path) -> None:
    """Every tensor (the small ones too) is copied: nothing in the output points at the input folder."""
    model = graphopt.load(mlp_ext_path)
    for external_data in (True, False, None):
        folder = tmp_path / f"out-{external_data}"
        folder.mkdir()
        out = folder / "m.onnx"
        graphopt.save(model, out, external_data=external_data)
        moved = tmp_path / f"moved-{external_data}"
        shutil.copytree(folder, moved)
        shutil.rmtree(folder)
        np.testing.assert_allclose(outputs_of(moved / "m.onnx"), reference_output(), rtol=1e-5, atol=1e-5)
        proto = onnx.load(str(moved / "m.onnx"), load_external_data=False)
        for t in proto.graph.initializer:
            for e in t.external_data:
                assert e.key != "location" or e.value == "m.onnx.data", (t.name, e.value)


def test_external_constant_attribute_is_inlined_by_to_bytes_and_save(tmp_path) -> None:
    path = _write_model(tmp_path / "m", external_ref_model("w.bin", as_attribute=True))
    (tmp_path / "m" / "w.bin").write_bytes(DATA)
    model = graphopt.load(path)
    assert len(list(gir.external_tensors(model))) == 1
    x = {"x": np.ones((4, 4), np.float32)}
    expected = np.arange(16, dtype=np.float32).reshape(4, 4) + 1
    proto = onnx.load_from_string(graphopt.to_bytes(model))
    assert not onnx.external_data_helper.uses_external_data(proto.graph.node[0].attribute[0].t)
    np.testing.assert_array_equal(run(graphopt.to_bytes(model), x)[0], expected)
    out = tmp_path / "o" / "m.onnx"
    out.parent.mkdir()
    graphopt.save(model, out, external_data=False)
    np.testing.assert_array_equal(run(graphopt.to_bytes(graphopt.load(out)), x)[0], expected)


def _boom(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("external_data", [False, True])
def test_failed_save_keeps_the_old_output_and_leaves_no_temp_files(
    tmp_path, mlp_path, monkeypatch, external_data
) -> None:
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    old = graphopt.load(mlp_path)
    graphopt.save(old, out, external_data=external_data)
    before = {n: sha256(out.parent / n) for n in os.listdir(out.parent)}
    new = graphopt.load(mlp_path)
    new.graph.initializers["w1"].const_value = ir.Tensor(np.zeros_like(W1), name="w1")
    # Fail while writing the model file (after the data file, when there is one, was written).
    real_fsync = os.fsync
    calls = []

    def fsync_fails_on_model_file(fd):
        calls.append(fd)
        if len(calls) == (2 if external_data else 1):
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(gir.os, "fsync", fsync_fails_on_model_file)
    with pytest.raises(OutputError, match="No space left on device") as e:
        graphopt.save(new, out, external_data=external_data)
    monkeypatch.undo()
    assert_one_line(e.value)
    assert {n: sha256(out.parent / n) for n in os.listdir(out.parent)} == before
    np.testing.assert_allclose(outputs_of(out), reference_output(), rtol=1e-5, atol=1e-5)


def test_failed_rename_leaves_no_temp_files(tmp_path, mlp_path, monkeypatch) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    monkeypatch.setattr(gir.os, "replace", _boom)
    with pytest.raises(OutputError):
        graphopt.save(graphopt.load(mlp_path), out)
    monkeypatch.undo()
    assert out.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["in", "m.onnx"]


def test_save_refuses_to_overwrite_the_input_model(tmp_path, mlp_path, mlp_ext_path) -> None:
    for path in (mlp_path, mlp_ext_path):
        digest = sha256(path)
        model = graphopt.load(path)
        for target in (path, str(path), path.parent / "." / path.name):
            with pytest.raises(OutputError) as e:
                graphopt.save(model, target)
            assert_one_line(e.value)
        # Also after optimize (which works on a copy) and through a second spelling of the folder.
        result = graphopt.optimize(graphopt.load(path))
        with pytest.raises(OutputError):
            graphopt.save(result.model, path)
        assert sha256(path) == digest
        assert leftovers(path.parent) == []


def test_save_refuses_to_overwrite_the_input_external_data(tmp_path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    # The input model reads its weights from out.onnx.data: exactly what save(..., "out.onnx") would write.
    save_external(mlp_proto(), folder / "in.onnx", location="out.onnx.data")
    data_digest = sha256(folder / "out.onnx.data")
    model = graphopt.load(folder / "in.onnx")
    with pytest.raises(OutputError, match="input") as e:
        graphopt.save(model, folder / "out.onnx", external_data=True)
    assert_one_line(e.value)
    with pytest.raises(OutputError):  # automatic external data picks the same name
        graphopt.save(model, folder / "out.onnx")
    with pytest.raises(OutputError):  # the data file itself as the model output
        graphopt.save(model, folder / "out.onnx.data", external_data=False)
    with pytest.raises(OutputError):  # an explicit data file name equal to the input's
        graphopt.save(model, folder / "other.onnx", external_data="out.onnx.data")
    assert sha256(folder / "out.onnx.data") == data_digest
    assert sorted(os.listdir(folder)) == ["in.onnx", "out.onnx.data"]
    # The optimized copy still refuses.
    with pytest.raises(OutputError):
        graphopt.save(graphopt.optimize(model).model, folder / "out.onnx", external_data=True)
    assert sha256(folder / "out.onnx.data") == data_digest


def test_save_refuses_symlinked_destinations(tmp_path, mlp_path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me")
    link = tmp_path / "out.onnx"
    os.symlink(victim, link)
    with pytest.raises(OutputError, match="symbolic link") as e:
        graphopt.save(graphopt.load(mlp_path), link)
    assert_one_line(e.value)
    # The external data destination as a link is refused as an output problem too.
    os.symlink(victim, tmp_path / "o.onnx.data")
    with pytest.raises(OutputError, match="symbolic link"):
        graphopt.save(graphopt.load(mlp_path), tmp_path / "o.onnx", external_data=True)
    assert victim.read_bytes() == b"keep me"
    assert not (tmp_path / "o.onnx").exists()
    assert leftovers(tmp_path) == []


def test_save_refuses_hard_linked_destination_and_missing_folder(tmp_path, mlp_path) -> None:
    victim = tmp_path / "victim.onnx"
    victim.write_bytes(b"keep me")
    os.link(victim, tmp_path / "out.onnx")
    with pytest.raises(OutputError):
        graphopt.save(graphopt.load(mlp_path), tmp_path / "out.onnx")
    assert victim.read_bytes() == b"keep me"
    with pytest.raises(OutputError, match="does not exist") as e:
        graphopt.save(graphopt.load(mlp_path), tmp_path / "missing" / "out.onnx")
    assert_one_line(e.value)
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("external", [False, True])
def test_optimize_and_save_leave_the_input_files_unchanged(
    tmp_path, mlp_path, mlp_ext_path, external
) -> None:
    src = mlp_ext_path if external else mlp_path
    digests = {n: sha256(src.parent / n) for n in os.listdir(src.parent)}
    result = graphopt.optimize(graphopt.load(src))
    graphopt.save(result.model, tmp_path / "out.onnx", external_data=external)
    assert {n: sha256(src.parent / n) for n in os.listdir(src.parent)} == digests
    np.testing.assert_allclose(outputs_of(tmp_path / "out.onnx"), reference_output(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("external", [False, True])
def test_optimize_then_save_is_byte_identical(tmp_path, mlp_path, mlp_ext_path, external) -> None:
    src = mlp_ext_path if external else mlp_path
    files = []
    for run_id in ("a", "b"):
        folder = tmp_path / run_id
        folder.mkdir()
        graphopt.save(
            graphopt.optimize(graphopt.load(src)).model, folder / "out.onnx", external_data=external
        )
        files.append({n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))})
    assert files[0] == files[1]
    # optimize() names the target, so save() writes its run settings beside the model (deterministic too).
    assert sorted(files[0]) == (["out.onnx", "out.onnx.data"] if external else ["out.onnx"]) + [
        "out.settings.json"
    ]
    assert onnx.load_from_string(files[0]["out.onnx"]).metadata_props  # stamped, deterministically


def test_to_bytes_inlines_external_data_and_is_deterministic(mlp_ext_path) -> None:
    model = graphopt.load(mlp_ext_path)
    data = graphopt.to_bytes(model)
    assert data == graphopt.to_bytes(graphopt.load(mlp_ext_path))
    proto = onnx.load_from_string(data)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    np.testing.assert_allclose(run(data, FEEDS)[0], reference_output(), rtol=1e-5, atol=1e-5)
    # The model keeps its lazy external tensors afterwards.
    assert isinstance(model.graph.initializers["w1"].const_value, ir.ExternalTensor)


def test_to_bytes_refuses_models_over_the_protobuf_limit(monkeypatch, mlp_path) -> None:
    monkeypatch.setattr(gir, "total_tensor_bytes", lambda model: gir.PROTOBUF_LIMIT)
    with pytest.raises(OutputError, match="2 GB") as e:
        graphopt.to_bytes(graphopt.load(mlp_path))
    assert_one_line(e.value)


@pytest.mark.parametrize("coordinates", [False, True])
def test_sparse_initializers_load_dense_and_save_back_sparse(tmp_path, coordinates) -> None:
    """onnx_ir has no sparse tensors: load densifies them (as ONNX Runtime does) instead of dropping them."""
    from onnx import helper, numpy_helper

    w = np.zeros((32, 16), np.float32)
    w[3, :] = np.arange(16)
    w[7, 2] = -1
    nz = np.argwhere(w) if coordinates else np.flatnonzero(w)
    values = numpy_helper.from_array(w[tuple(np.argwhere(w).T)], "w")
    indices = numpy_helper.from_array(nz.astype(np.int64), "w_indices")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 32])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 16])],
    )
    graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [32, 16]))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = graphopt.load(proto)
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), w)
    assert len(proto.graph.sparse_initializer) == 1  # the caller's proto is untouched
    graphopt.save(model, tmp_path / "dense.onnx")
    graphopt.save(model, tmp_path / "sparse.onnx", sparse=True)
    saved = onnx.load(str(tmp_path / "sparse.onnx"))
    assert [s.values.name for s in saved.graph.sparse_initializer] == ["w"] and not saved.graph.initializer
    assert (tmp_path / "sparse.onnx").stat().st_size < (tmp_path / "dense.onnx").stat().st_size
    x = np.ones((2, 32), np.float32)
    assert graphopt.verify(tmp_path / "dense.onnx", tmp_path / "sparse.onnx", inputs={"x": x}).passed

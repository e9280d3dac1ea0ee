"""Hostile input files: special files (FIFOs, devices) and hostile calibration/input arrays are
refused with one line (exit 2) before anything blocks, inflates or is written."""

from __future__ import annotations

import io
import os
import threading
import time
import zipfile

import numpy as np
import pytest
from conftest import FEEDS

import graphopt
from graphopt.calibration import CalibrationData, CalibrationError
from graphopt.cli import main
from graphopt.errors import GraphoptError, ModelLoadError
from graphopt.inputs import load_inputs


def _cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main([os.fspath(a) for a in argv])
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, err.strip("\n").splitlines()


def _refused(capsys, out, *argv, match: str = "") -> str:
    code, err = _cli(capsys, *argv)
    assert code == 2 and len(err) == 1 and err[0].startswith("graphopt: error:"), (code, err)
    assert match in err[0], err
    if out is not None:
        assert not os.path.exists(out)
        assert not [n for n in os.listdir(os.path.dirname(out)) if n.endswith(".tmp")]
    return err[0]


@pytest.fixture
def fifo(tmp_path):
    """A FIFO; should anything block opening it, a writer comes along after 10 s and the read ends
    (so a regression fails the test instead of hanging the suite)."""
    path = tmp_path / "pipe.onnx"
    os.mkfifo(path)
    stop = threading.Event()

    def unblock() -> None:
        deadline = time.monotonic() + 10
        while not stop.wait(0.2):
            if time.monotonic() < deadline:
                continue
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # no reader blocked on it
                continue
            os.close(fd)

    t = threading.Thread(target=unblock, daemon=True)
    t.start()
    yield path
    stop.set()
    t.join()


# --- special files ---------------------------------------------------------------------------


def test_fifo_as_model_is_refused_without_blocking(tmp_path, capsys, fifo) -> None:
    t0 = time.monotonic()
    out = tmp_path / "o.onnx"
    _refused(capsys, out, "optimize", fifo, "-o", out, match="FIFO")
    _refused(capsys, None, "inspect", fifo, match="not a regular file")
    with pytest.raises(ModelLoadError, match="not a regular file"):
        graphopt.load(fifo)
    assert time.monotonic() - t0 < 5


def test_fifo_as_calibration_is_refused_without_blocking(tmp_path, capsys, fifo, mlp_path) -> None:
    calib = tmp_path / "calib.npz"
    os.rename(fifo, calib)
    t0 = time.monotonic()
    out = tmp_path / "o.onnx"
    _refused(
        capsys,
        out,
        "optimize",
        mlp_path,
        "-o",
        out,
        "--quantize",
        "static",
        "--calibration",
        calib,
        match="not a regular file",
    )
    _refused(
        capsys,
        out,
        "optimize",
        mlp_path,
        "-o",
        out,
        "--verify",
        "--inputs",
        calib,
        match="not a regular file",
    )
    assert time.monotonic() - t0 < 5


def test_fifo_in_a_calibration_folder_is_refused(tmp_path, fifo) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    os.rename(fifo, folder / "x.npy")
    with pytest.raises(CalibrationError, match="not a regular file"):
        CalibrationData.from_any(folder)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_device_as_model_is_refused_before_reading(tmp_path, capsys) -> None:
    out = tmp_path / "o.onnx"
    _refused(capsys, out, "optimize", "/dev/zero", "-o", out, match="character device")
    with pytest.raises(ModelLoadError, match="not a regular file"):
        graphopt.load("/dev/zero")


def test_model_larger_than_a_protobuf_is_refused_unread(tmp_path) -> None:
    big = tmp_path / "big.onnx"
    with open(big, "wb") as f:
        f.truncate(2**31)  # sparse: 2 GiB of holes
    with pytest.raises(
        ModelLoadError, match="more than the 2,147,483,647 it can hold"
    ):  # said before reading
        graphopt.load(big)


# --- hostile calibration and input arrays ----------------------------------------------------


def _npy(descr: str, shape: tuple, payload: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


def _npz(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name + ".npy", data)


HOSTILE_NPZ = {
    "object-array": lambda p: np.savez(p, x=np.array([{"evil": 1}, None], dtype=object)),
    "2**40-rows": lambda p: _npz(p, {"x": _npy("<f4", (2**40, 16), b"\0" * 64)}),
    "negative-dim": lambda p: _npz(p, {"x": _npy("<f4", (-1, 16), b"")}),
    "short-data": lambda p: _npz(p, {"x": _npy("<f4", (3, 16), b"\0" * 100)}),
    "not-npy-member": lambda p: zipfile.ZipFile(p, "w").writestr("x.txt", b"hello"),
    "garbage-header": lambda p: _npz(p, {"x": b"\x93NUMPY\x01\x00" + b"\x20\x00" + b"{junk" + b" " * 27}),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_NPZ))
def test_hostile_calibration_npz_is_refused_from_its_headers(tmp_path, capsys, mlp_path, case) -> None:
    calib = tmp_path / "calib.npz"
    HOSTILE_NPZ[case](calib)
    out = tmp_path / "o.onnx"
    _refused(capsys, out, "optimize", mlp_path, "-o", out, "--quantize", "static", "--calibration", calib)
    with pytest.raises(GraphoptError):
        load_inputs(calib)


def test_npz_bomb_is_refused_by_its_declared_shape_before_decompressing(
    tmp_path, capsys, mlp_path, monkeypatch
) -> None:
    calib = tmp_path / "bomb.npz"
    # 64 MiB of zeros in a ~64 KiB file, declared [N, 4]: the model's input is [N, 16].
    with zipfile.ZipFile(calib, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as m:
            m.write(_npy("<f4", (1 << 22, 4), b""))
            chunk = b"\0" * (1 << 20)
            for _ in range(64):
                m.write(chunk)
    assert calib.stat().st_size < 1 << 20
    import graphopt.files

    monkeypatch.setattr(
        graphopt.files.np.lib.format, "read_array", lambda *a, **k: pytest.fail("decompressed")
    )
    out = tmp_path / "o.onnx"
    msg = _refused(
        capsys, out, "optimize", mlp_path, "-o", out, "--quantize", "static", "--calibration", calib
    )
    assert "needs 16 on axis 1" in msg


def test_calibration_dtype_and_names_are_checked_before_reading(tmp_path, capsys, mlp_path) -> None:
    out = tmp_path / "o.onnx"
    calib = tmp_path / "c.npz"
    np.savez(calib, x=FEEDS["x"].astype(np.float64))
    _refused(
        capsys,
        out,
        "optimize",
        mlp_path,
        "-o",
        out,
        "--quantize",
        "static",
        "--calibration",
        calib,
        match="float64, but the model input is float32",
    )
    np.savez(calib, z=FEEDS["x"])
    _refused(
        capsys,
        out,
        "optimize",
        mlp_path,
        "-o",
        out,
        "--quantize",
        "static",
        "--calibration",
        calib,
        match="lacks model input(s) ['x']",
    )


@pytest.mark.parametrize("fill", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_non_finite_calibration_is_refused(tmp_path, capsys, mlp_path, fill, mode) -> None:
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.full((8, 16), fill, np.float32))
    out = tmp_path / "o.onnx"
    _refused(
        capsys,
        out,
        "optimize",
        mlp_path,
        "-o",
        out,
        "--quantize",
        mode,
        "--calibration",
        calib,
        match="holds 128 NaN/Inf values of 128",
    )


def test_a_few_non_finite_values_are_counted(tmp_path) -> None:
    x = np.ones((4, 16), np.float32)
    x[1, 3] = np.nan
    x[2, 0] = np.inf
    data = CalibrationData.from_any([{"x": x}])
    with pytest.raises(CalibrationError, match="holds 2 NaN/Inf values of 64"):
        list(data.batches())
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "x.npy", x)
    with pytest.raises(CalibrationError, match="holds 2 NaN/Inf values of 64"):
        list(CalibrationData.from_any(folder).batches())


def test_valid_calibration_still_works(tmp_path, capsys, mlp_path) -> None:
    calib = tmp_path / "c.npz"
    np.savez_compressed(calib, x=np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    out = tmp_path / "o.onnx"
    code, err = _cli(capsys, "optimize", mlp_path, "-o", out, "--quantize", "static", "--calibration", calib)
    assert code == 0, err
    assert out.exists()

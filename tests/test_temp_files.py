"""A save killed mid-write leaves a temporary file; the next save of the same output removes it,
while a temporary file a live writer still holds is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import graphopt
from graphopt.cli import main
from graphopt.files import _write_temp, clean_stale_temps

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and file locks")


def _killed_mid_write(path) -> str:
    """Start saving ``path`` in a child process and SIGKILL it halfway; returns the stranded file."""
    script = textwrap.dedent(f"""
        import os, signal
        from graphopt.files import _atomic_write

        def write(f):
            f.write(b"half a model" * 1000)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        _atomic_write({os.fspath(path)!r}, write)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (left,) = [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")]
    assert left.startswith("." + os.path.basename(path) + ".")
    return left


def test_next_save_removes_what_a_killed_save_left(tmp_path, mlp_path, capsys) -> None:
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    graphopt.save(graphopt.load(mlp_path), out)
    before = out.read_bytes()
    left = _killed_mid_write(out)
    assert out.read_bytes() == before  # the previous output is intact
    assert main(["optimize", str(mlp_path), "-o", str(out)]) == 0, capsys.readouterr().err
    assert not (out.parent / left).exists()
    assert sorted(os.listdir(out.parent)) == ["m.onnx", "m.settings.json"]


def test_external_data_temp_file_is_removed_too(tmp_path, mlp_path) -> None:
    out = tmp_path / "m.onnx"
    left = _killed_mid_write(tmp_path / "m.onnx.data")
    graphopt.save(graphopt.load(mlp_path), out, external_data=True)
    assert not (tmp_path / left).exists()
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []


def test_a_live_writers_temp_file_and_other_files_are_left_alone(tmp_path) -> None:
    out = tmp_path / "m.onnx"
    live = _write_temp(str(out), lambda f: f.write(b"in progress"))
    try:
        other = [
            tmp_path / ".m.onnx.notmine.tmp",
            tmp_path / ".other.onnx.abcdefgh.tmp",
            tmp_path / "m.onnx.tmp",
        ]
        for p in other:
            p.write_bytes(b"x")
        assert clean_stale_temps(str(out)) == []
        assert os.path.exists(live.path) and all(p.exists() for p in other)
    finally:
        live.discard()
    assert not os.path.exists(live.path)

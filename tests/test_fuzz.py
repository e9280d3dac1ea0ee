"""Fuzzing `graphopt optimize`: a few hundred mutated models (byte damage and structural mutations of
small valid models, fixed seed) must each end in a clean refusal (exit 2, one line, nothing written)
or a correct model (exit 0, loads, same outputs as the input on ONNX Runtime wherever it can run the
input); never exit 1 or 3, a crash or a hang. The cases and the worker live in tests/fuzzing.py
(``python tests/fuzzing.py --cases 1000`` for a larger run)."""

from __future__ import annotations

import os
import subprocess
import sys

import fuzzing
import pytest


def _campaign(n: int, seed: int) -> None:
    # A hang is caught by the per-case timeout; how fast the cases run is not asserted here
    # (speed is measured in benchmarks, not tests).
    counts, bad = fuzzing.campaign(n, seed, timeout=60.0)
    assert not bad, f"{len(bad)} of {n} cases broke the exit-code contract ({dict(counts)}): {bad[:5]}"
    # Both paths are exercised: a fuzzer that only produced garbage would prove little.
    assert counts["refused"] >= n * 0.3 and counts["correct"] >= n * 0.05, dict(counts)


def test_fuzzed_models_keep_the_exit_code_contract() -> None:
    _campaign(400, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fuzzed_models_keep_the_exit_code_contract_large(seed) -> None:
    _campaign(2000, seed=seed)


def test_a_handful_through_the_real_command(tmp_path) -> None:
    """The same contract seen from outside: the process's exit code and its whole stderr, C++
    libraries' output included."""
    seen = set()
    for name, data in fuzzing.cases(12, seed=0):
        folder = tmp_path / name
        (folder / "out").mkdir(parents=True)
        (folder / "model.onnx").write_bytes(data)
        out = folder / "out" / "model.onnx"
        proc = subprocess.run(
            [sys.executable, "-m", "graphopt.cli", "optimize", str(folder / "model.onnx"), "-o", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        seen.add(proc.returncode)
        assert proc.returncode in (0, 2), (name, proc.returncode, proc.stderr)
        if proc.returncode == 2:
            lines = proc.stderr.strip("\n").splitlines()
            assert len(lines) == 1 and lines[0].startswith("graphopt: error:"), (name, proc.stderr)
            assert os.listdir(folder / "out") == [], name
        else:
            assert out.exists(), name
    assert seen == {0, 2}

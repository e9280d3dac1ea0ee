"""The exit-code contract of `graphopt optimize`: 0 done; 1 verification failed, nothing else;
2 bad input (one line, no traceback, nothing written); 3 a genuine internal bug only."""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings

import numpy as np
import onnx_ir as ir
import pytest

import graphopt
from graphopt.cli import main
from graphopt.errors import (
    GraphoptError,
    PassChangedOutputsError,
    PassCrashedError,
    PassFailedError,
    VerificationError,
)
from graphopt.pipeline import Pass
from graphopt.registry import default_registry


@dataclasses.dataclass
class _Options:
    mode: str = "crash"


class _MisbehavingPass(Pass):
    """Misbehaves on purpose (test helper): crash, refuse, break or change the model's outputs."""

    name = "misbehave"
    Options = _Options

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        mode = self.options.mode
        if mode == "crash":
            raise IndexError("list index out of range")
        if mode == "refuse":
            raise PassFailedError("misbehave: cannot handle this model; remove the pass")
        if mode == "warn":
            np.sqrt(np.float32(-1.0))  # numpy's RuntimeWarning, as a pass meets on odd weights
            warnings.warn("something odd", UserWarning, stacklevel=1)
            raise PassFailedError("misbehave: cannot handle this model; remove the pass")
        node = next(n for n in model.graph if n.op_type == "Relu")
        node.op_type = "NoSuchOp" if mode == "invalid" else "Sigmoid"
        return ir.passes.PassResult(model, True)


@pytest.fixture
def registry(monkeypatch):
    reg = default_registry().copy()
    reg.register_pass("misbehave", _MisbehavingPass)
    monkeypatch.setattr(graphopt, "default_registry", lambda: reg)
    return reg


def _cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main([os.fspath(a) for a in argv])
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, err.strip("\n").splitlines()


def test_a_pass_crash_is_exit_3_not_1(tmp_path, capsys, mlp_path, registry) -> None:
    out = tmp_path / "o.onnx"
    code, err = _cli(capsys, "optimize", mlp_path, "-o", out, "--pipeline", "misbehave(mode=crash)")
    assert code == 3 and len(err) == 1 and err[0].startswith("graphopt: internal error:"), err
    assert "misbehave" in err[0] and "IndexError" in err[0]
    assert not out.exists()


def test_a_pass_that_breaks_the_model_is_exit_3(tmp_path, capsys, mlp_path, registry) -> None:
    out = tmp_path / "o.onnx"
    code, err = _cli(
        capsys, "optimize", mlp_path, "-o", out, "--pipeline", "misbehave(mode=invalid)", "--verify-each"
    )
    assert code == 3 and len(err) == 1 and "produced an invalid model" in err[0], err
    assert not out.exists()


def test_a_pass_refusal_is_exit_2(tmp_path, capsys, mlp_path, registry) -> None:
    out = tmp_path / "o.onnx"
    code, err = _cli(capsys, "optimize", mlp_path, "-o", out, "--pipeline", "misbehave(mode=refuse)")
    assert code == 2 and len(err) == 1 and err[0].startswith("graphopt: error: misbehave"), err
    assert not out.exists()


def test_changed_outputs_after_a_pass_is_a_verification_failure(tmp_path, capsys, mlp_path, registry) -> None:
    out = tmp_path / "o.onnx"
    code, err = _cli(
        capsys, "optimize", mlp_path, "-o", out, "--pipeline", "misbehave(mode=numeric)", "--numeric-each"
    )
    assert code == 1 and len(err) == 1 and err[0].startswith("graphopt: verification failed:"), err
    assert not out.exists()


def test_error_classes_carry_the_contract() -> None:
    assert issubclass(PassCrashedError, PassFailedError) and PassCrashedError.exit_code == 3
    assert issubclass(PassChangedOutputsError, VerificationError) and PassChangedOutputsError.exit_code == 1
    assert PassFailedError.exit_code == 2 and GraphoptError.exit_code == 2


def test_an_error_claiming_exit_1_is_still_exit_2_unless_it_is_a_verification(
    capsys, monkeypatch, mlp_path, tmp_path
) -> None:
    class Odd(GraphoptError):
        exit_code = 1

    def boom(*args, **kwargs):
        raise Odd("odd input; fix it")

    monkeypatch.setattr(graphopt, "optimize", boom)
    code, err = _cli(capsys, "optimize", mlp_path, "-o", tmp_path / "o.onnx")
    assert code == 2 and err == ["graphopt: error: odd input; fix it"]


def test_warnings_inside_a_pass_do_not_add_lines_to_an_error(
    tmp_path, capsys, mlp_path, registry, monkeypatch
) -> None:
    out = tmp_path / "o.onnx"

    def printed(msg: warnings.WarningMessage) -> None:  # what Python does outside pytest
        sys.stderr.write(warnings.formatwarning(msg.message, msg.category, msg.filename, msg.lineno))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "_showwarnmsg_impl", printed)
        code, err = _cli(capsys, "optimize", mlp_path, "-o", out, "--pipeline", "misbehave(mode=warn)")
    assert code == 2 and err == ["graphopt: error: misbehave: cannot handle this model; remove the pass"], err

"""The `graphopt` command: optimize/inspect/verify/passes, exit codes, one-line errors, nothing
written on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import FEEDS, W2, external_ref_model, mlp_proto, reference_output, save_external
from corpus import run
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.cli import main
from graphopt.pipeline import Pipeline

KNOWN_PASSES = ("cleanup", "fold-constants", "remove-noops", "cse")


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([os.fspath(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str) -> None:
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert "Traceback" not in err
    assert lines[0].startswith("graphopt: error:"), lines[0]


def node_count(path) -> int:
    return len(onnx.load(os.fspath(path), load_external_data=False).graph.node)


# --- optimize ----------------------------------------------------------------------------------


def test_optimize_writes_a_smaller_model_a_report_and_stamps_the_pipeline(tmp_path, capsys, mlp_path) -> None:
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code, stdout, err = cli(capsys, "optimize", mlp_path, "-o", out, "--report", report, "--verify")
    assert code == 0, err
    assert "wrote" in stdout and str(out) in stdout
    assert node_count(out) < node_count(mlp_path)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "Identity" not in ops and "Dropout" not in ops and "Constant" not in ops
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["graphopt.pipeline"]
    assert meta["graphopt.target"] == "ort-cpu"
    np.testing.assert_allclose(run(out.read_bytes(), FEEDS)[0], reference_output(), rtol=1e-4, atol=1e-5)

    data = json.loads(report.read_text())
    assert data["pipeline"] == meta["graphopt.pipeline"]
    assert data["passes"], "no per-pass rows"
    for row in data["passes"]:
        assert {"name", "wall_s", "modified", "before", "after"} <= set(row)
        assert row["wall_s"] >= 0
        assert {"nodes", "initializers", "initializer_bytes"} <= set(row["before"])
    assert any(r["modified"] for r in data["passes"])
    assert data["before"]["nodes"] == node_count(mlp_path)
    assert data["after"]["nodes"] == node_count(out) < data["before"]["nodes"]
    assert data["verification"] is not None
    assert sorted(os.listdir(tmp_path)) == ["in", "out.onnx", "out.settings.json", "report.json"]


def test_optimize_dump_dir_writes_one_model_per_pass_execution(tmp_path, capsys, mlp_path) -> None:
    dumps, report = tmp_path / "dumps", tmp_path / "r.json"
    code, _, err = cli(
        capsys, "optimize", mlp_path, "-o", tmp_path / "out.onnx", "--report", report, "--dump-dir", dumps
    )
    assert code == 0, err
    rows = json.loads(report.read_text())["passes"]
    models = sorted(p for p in os.listdir(dumps) if p.endswith(".onnx"))
    assert len(models) == len(rows) > 1
    assert models[0].startswith("001_") and models[-1].startswith(f"{len(rows):03d}_")
    last = graphopt.load(dumps / models[-1])
    assert sum(1 for _ in last.graph) == rows[-1]["after"]["nodes"]


PIPELINE = "remove-noops,fold-constants,remove-unused"


@pytest.mark.parametrize("form", ["text", "yaml", "json", "txt"])
def test_optimize_pipeline_as_text_or_file(tmp_path, capsys, mlp_path, form) -> None:
    if form == "text":
        spec = PIPELINE
    else:
        spec = tmp_path / f"pipe.{form}"
        steps = PIPELINE.split(",")
        if form == "yaml":
            spec.write_text("pipeline:\n" + "".join(f"  - {s}\n" for s in steps))
        elif form == "json":
            spec.write_text(json.dumps({"pipeline": steps}))
        else:
            spec.write_text("# cleanup without CSE\n" + ",\n".join(steps) + "\n")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, _, err = cli(capsys, "optimize", mlp_path, "-o", out, "--pipeline", spec, "--report", report)
    assert code == 0, err
    rows = json.loads(report.read_text())["passes"]
    assert [r["name"] for r in rows] == PIPELINE.split(",")
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["graphopt.pipeline"] == PIPELINE
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops == ["MatMul", "Add", "Relu", "MatMul"]


def test_optimize_with_external_data(tmp_path, capsys, mlp_ext_path) -> None:
    out = tmp_path / "out.onnx"
    code, _, err = cli(capsys, "optimize", mlp_ext_path, "-o", out, "--external-data", "--verify")
    assert code == 0, err
    assert (tmp_path / "out.onnx.data").is_file()
    np.testing.assert_allclose(
        run(graphopt.to_bytes(graphopt.load(out)), FEEDS)[0], reference_output(), rtol=1e-4, atol=1e-5
    )


def test_optimize_verify_with_inputs_npz(tmp_path, capsys, mlp_path) -> None:
    npz = tmp_path / "inputs.npz"
    np.savez(npz, **FEEDS)
    code, _, err = cli(capsys, "optimize", mlp_path, "-o", tmp_path / "o.onnx", "--verify", "--inputs", npz)
    assert code == 0, err


# --- optimize: bad input → exit 2, one line, nothing written -----------------------------------


def _copy_mlp(src_dir: Path) -> Path:
    path = src_dir / "model.onnx"
    onnx.save_model(mlp_proto(), os.fspath(path))
    return path


def _raw(data: bytes):
    def make(src_dir: Path) -> list:
        path = src_dir / "model.onnx"
        path.write_bytes(data)
        return [path]

    return make


def _ext(location: str, link_to: str | None = None, write: bool = False):
    def make(src_dir: Path) -> list:
        path = src_dir / "model.onnx"
        path.write_bytes(external_ref_model(location).SerializeToString())
        secret = src_dir.parent / "secret.bin"
        secret.write_bytes(np.zeros(16, np.float32).tobytes())
        if link_to is not None:
            os.symlink(secret, src_dir / link_to)
        if write:
            (src_dir / location).write_bytes(np.zeros(16, np.float32).tobytes())
        return [path]

    return make


def _proto(edit):
    def make(src_dir: Path) -> list:
        proto = mlp_proto()
        edit(proto)
        path = src_dir / "model.onnx"
        path.write_bytes(proto.SerializeToString())
        return [path]

    return make


def _opset_999(proto: onnx.ModelProto) -> None:
    proto.opset_import[0].version = 999


def _custom_domain(proto: onnx.ModelProto) -> None:
    proto.graph.node.append(helper.make_node("Foo", ["y"], ["z"], domain="my.custom.domain"))
    proto.graph.output[0].name = "z"
    proto.opset_import.append(helper.make_opsetid("my.custom.domain", 1))


def _with_args(*args: str):
    def make(src_dir: Path) -> list:
        return [_copy_mlp(src_dir), *args]

    return make


def _object_npz(src_dir: Path) -> list:
    npz = src_dir / "inputs.npz"
    np.savez(npz, x=np.array([{"evil": 1}, None], dtype=object))
    return [_copy_mlp(src_dir), "--verify", "--inputs", npz]


def _bad_pipeline_file(suffix: str, text: str):
    def make(src_dir: Path) -> list:
        spec = src_dir / f"pipe{suffix}"
        spec.write_text(text)
        return [_copy_mlp(src_dir), "--pipeline", spec]

    return make


VALID = mlp_proto().SerializeToString()
BAD_INPUTS = {
    "truncated": _raw(VALID[: len(VALID) // 2]),
    "png": _raw(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10\x08\x06\0\0\0"),
    "text": _raw(b"not a model at all\n"),
    "empty": _raw(b""),
    "missing-input": lambda src_dir: [src_dir / "nope.onnx"],
    "input-is-a-folder": lambda src_dir: [src_dir],
    "missing-external-data": _ext("w.bin"),
    "external-data-dotdot": _ext("../secret.bin"),
    "external-data-absolute": _ext("/etc/passwd"),
    "external-data-symlink": _ext("w.bin", link_to="w.bin"),
    "external-data-offset-past-end": lambda src_dir: _offset_past_end(src_dir),
    "opset-999": _proto(_opset_999),
    "custom-domain": _proto(_custom_domain),
    "unknown-pass": _with_args("--pipeline", "cleanup,no-such-pass"),
    "unknown-pass-option": _with_args("--pipeline", "cse(no_such_option=1)"),
    "bad-pass-option-value": _with_args("--pipeline", "remove-noops(identity=maybe)"),
    "pipeline-syntax": _with_args("--pipeline", "cleanup,(("),
    "pipeline-bad-yaml": _bad_pipeline_file(".yaml", "pipeline: [cleanup\n"),
    "pipeline-bad-json": _bad_pipeline_file(".json", "{not json"),
    "pipeline-unknown-pass-in-file": _bad_pipeline_file(".json", '{"pipeline": ["cleanup", "nope"]}'),
    "unknown-target": _with_args("--target", "no-such-target"),
    "quantize-unknown-mode": _with_args("--quantize", "int3"),
    "quantize-static-without-calibration": _with_args("--quantize", "static"),
    "calibration-missing-file": _with_args("--quantize", "static", "--calibration", "/nonexistent/data.npz"),
    "calibration-unused": lambda src_dir: _calibration_file(src_dir),
    "calibrator-without-quantize": _with_args("--calibrator", "entropy"),
    "quantize-option-not-for-mode": _with_args("--quantize", "dynamic", "--quantize-option", "block_size=32"),
    "quantize-with-pipeline": _with_args("--quantize", "dynamic", "--pipeline", "cleanup"),
    "prune-out-of-range": _with_args("--prune", "1.5"),
    "prune-unknown-mode": _with_args("--prune", "0.5", "--prune-mode", "diagonal"),
    "bad-dim": _with_args("--verify", "--dim", "N"),
    "inputs-missing-file": _with_args("--verify", "--inputs", "/nonexistent/inputs.npz"),
    "inputs-object-npz-not-unpickled": _object_npz,
}


def _calibration_file(src_dir: Path) -> list:
    """Calibration data without --quantize or --prune: nothing would use it."""
    path = src_dir / "model.onnx"
    path.write_bytes(VALID)
    np.savez(src_dir / "calib.npz", x=np.zeros((4, 4), np.float32))
    return [path, "--calibration", src_dir / "calib.npz"]


def _offset_past_end(src_dir: Path) -> list:
    path = src_dir / "model.onnx"
    path.write_bytes(external_ref_model("w.bin", offset=60).SerializeToString())
    (src_dir / "w.bin").write_bytes(np.zeros(16, np.float32).tobytes())
    return [path]


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case) -> None:
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    args = BAD_INPUTS[case](src_dir)
    before = sorted(os.listdir(src_dir))
    code, stdout, err = cli(
        capsys,
        "optimize",
        args[0],
        "-o",
        out_dir / "m.onnx",
        "--report",
        out_dir / "r.json",
        "--dump-dir",
        out_dir / "dumps",
        "--external-data",
        *args[1:],
    )
    assert code == 2, (code, err)
    assert_one_error_line(err)
    assert os.listdir(out_dir) == [], "something was written"
    assert sorted(os.listdir(src_dir)) == before


def test_object_npz_is_never_unpickled(tmp_path, capsys, monkeypatch) -> None:
    import pickle

    def no_unpickling(*args, **kwargs):
        raise AssertionError("npz data was unpickled")

    src = tmp_path / "src"
    src.mkdir()
    args = _object_npz(src)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    code, _, err = cli(capsys, "optimize", args[0], "-o", tmp_path / "o.onnx", *args[1:])
    assert code == 2
    assert_one_error_line(err)
    code, _, err = cli(capsys, "verify", args[0], args[0], "--inputs", args[-1])
    assert code == 2
    assert_one_error_line(err)


def test_missing_output_folder_and_report_folder(tmp_path, capsys, mlp_path) -> None:
    code, _, err = cli(capsys, "optimize", mlp_path, "-o", tmp_path / "missing" / "o.onnx")
    assert code == 2
    assert_one_error_line(err)
    code, _, err = cli(
        capsys, "optimize", mlp_path, "-o", tmp_path / "o.onnx", "--report", tmp_path / "missing" / "r.json"
    )
    assert code == 2
    assert_one_error_line(err)
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_output_onto_the_input_is_refused(tmp_path, capsys, mlp_path, mlp_ext_path) -> None:
    for path in (mlp_path, mlp_ext_path):
        before = {n: (path.parent / n).read_bytes() for n in os.listdir(path.parent)}
        targets = [path, path.parent / ".." / path.parent.name / path.name]
        if path == mlp_ext_path:
            targets.append(path.parent / "weights.bin")  # the data file the input reads
        for target in targets:
            code, _, err = cli(capsys, "optimize", path, "-o", target)
            assert code == 2, target
            assert_one_error_line(err)
        assert {n: (path.parent / n).read_bytes() for n in os.listdir(path.parent)} == before


def test_report_onto_a_model_file_is_refused(tmp_path, capsys, mlp_ext_path) -> None:
    folder = mlp_ext_path.parent
    before = {n: (folder / n).read_bytes() for n in os.listdir(folder)}
    out = tmp_path / "o.onnx"
    for report in (mlp_ext_path, folder / "weights.bin", out, tmp_path / "o.onnx.data"):
        code, _, err = cli(capsys, "optimize", mlp_ext_path, "-o", out, "--report", report)
        assert code == 2, report
        assert_one_error_line(err)
    assert {n: (folder / n).read_bytes() for n in os.listdir(folder)} == before
    assert sorted(os.listdir(tmp_path)) == ["ext"]


def test_output_onto_the_input_external_data_is_refused(tmp_path, capsys) -> None:
    save_external(mlp_proto(), tmp_path / "in.onnx", location="out.onnx.data")
    before = (tmp_path / "out.onnx.data").read_bytes()
    code, _, err = cli(
        capsys, "optimize", tmp_path / "in.onnx", "-o", tmp_path / "out.onnx", "--external-data"
    )
    assert code == 2
    assert_one_error_line(err)
    assert (tmp_path / "out.onnx.data").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx.data"]


def test_output_through_a_symlink_is_refused(tmp_path, capsys, mlp_path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    os.symlink(victim, tmp_path / "o.onnx")
    code, _, err = cli(capsys, "optimize", mlp_path, "-o", tmp_path / "o.onnx")
    assert code == 2
    assert_one_error_line(err)
    assert victim.read_bytes() == b"keep"


def test_verification_failure_exits_1_and_writes_no_model(tmp_path, capsys, mlp_path, monkeypatch) -> None:
    """A pipeline that changes the outputs (simulated: it perturbs a weight) is caught by --verify."""
    real_run = Pipeline.run

    def broken_run(self, model, **kwargs):
        model, report = real_run(self, model, **kwargs)
        w = model.graph.initializers["w2"]
        w.const_value = ir.tensor(w.const_value.numpy() + 1.0, name="w2")
        return model, report

    monkeypatch.setattr(Pipeline, "run", broken_run)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    code, _, err = cli(capsys, "optimize", mlp_path, "-o", out, "--verify", "--report", report)
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1 and "verification failed" in err
    assert not out.exists()
    assert json.loads(report.read_text())["verification"]
    # Without --verify the (broken) model is written: the check is what stops it.
    code, _, err = cli(capsys, "optimize", mlp_path, "-o", out)
    assert code == 0, err


# --- usage errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["optimize", "IN", "-o", "OUT", "--no-such-flag"],
        ["optimize", "IN"],
        ["optimize"],
        [],
        ["frobnicate"],
        ["optimize", "IN", "-o", "OUT", "--level", "high"],
        ["inspect"],
        ["verify", "only-one"],
    ],
    ids=[
        "unknown-flag",
        "missing-o",
        "missing-input",
        "no-command",
        "unknown-command",
        "bad-int",
        "inspect-no-input",
        "verify-one-model",
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, capsys, argv) -> None:
    argv = [str(tmp_path / a) if a in ("IN", "OUT") else a for a in argv]
    code, _, err = cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt"), err
    assert os.listdir(tmp_path) == []


def test_help_exits_0(capsys) -> None:
    code, out, _ = cli(capsys, "--help")
    assert code == 0
    assert "optimize" in out and "inspect" in out


# --- verify / inspect / passes -----------------------------------------------------------------


def test_verify_identical_models_exit_0(tmp_path, capsys, mlp_path) -> None:
    code, out, err = cli(capsys, "verify", mlp_path, mlp_path)
    assert code == 0, err
    assert "y" in out


def test_verify_perturbed_weight_exits_1_with_a_table(tmp_path, capsys, mlp_path) -> None:
    proto = mlp_proto()
    for i, t in enumerate(proto.graph.initializer):
        if t.name == "w2":
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(W2 + 0.5, "w2"))
    cand = tmp_path / "cand.onnx"
    cand.write_bytes(proto.SerializeToString())
    code, out, err = cli(capsys, "verify", mlp_path, cand)
    assert code == 1
    assert "y" in out and len(out.strip().splitlines()) >= 2, out
    assert err.strip() and "Traceback" not in err
    code, out, _ = cli(capsys, "verify", mlp_path, cand, "--json")
    assert code == 1
    json.loads(out)


def test_verify_non_onnx_exits_2(tmp_path, capsys, mlp_path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n")
    for argv in (["verify", mlp_path, bad], ["verify", bad, mlp_path]):
        code, _, err = cli(capsys, *argv)
        assert code == 2
        assert_one_error_line(err)


def _sparse_model(path: Path) -> None:
    w = np.arange(1, 65, dtype=np.float32).reshape(8, 8)
    w[:, ::2] = 0.0  # exactly half the weights are zero
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "sparse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(8, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, os.fspath(path))


def test_inspect_json(tmp_path, capsys) -> None:
    path = tmp_path / "sparse.onnx"
    _sparse_model(path)
    code, out, err = cli(capsys, "inspect", path, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["ops"] == {"MatMul": 1, "Add": 1}
    assert info["nodes"] == 2
    assert info["parameters_by_dtype"] == {"FLOAT": {"tensors": 2, "parameters": 72, "bytes": 288}}
    assert info["parameters"] == 72
    assert info["sparsity"] == pytest.approx(0.5)
    assert info["opsets"] == {"": 17}
    assert [i["name"] for i in info["inputs"]] == ["x"]
    assert info["inputs"][0]["shape"] == ["batch", 8]
    assert [o["name"] for o in info["outputs"]] == ["y"]
    code, out, _ = cli(capsys, "inspect", path)
    assert code == 0
    assert "sparsity 50.0%" in out and "MatMul" in out


def test_inspect_reads_external_data_and_refuses_bad_files(tmp_path, capsys, mlp_ext_path) -> None:
    code, out, err = cli(capsys, "inspect", mlp_ext_path, "--json")
    assert code == 0, err
    assert json.loads(out)["parameters"] == 16 * 32 + 32 + 32 * 4
    bad = tmp_path / "bad.onnx"
    bad.write_text("hello")
    code, _, err = cli(capsys, "inspect", bad)
    assert code == 2
    assert_one_error_line(err)


def test_passes_lists_builtin_passes_with_one_line_docs(capsys) -> None:
    code, out, _ = cli(capsys, "passes")
    assert code == 0
    lines = out.splitlines()
    for name in KNOWN_PASSES:
        row = [ln for ln in lines if ln.split() and ln.split()[0] == name]
        assert len(row) == 1, name
        assert len(row[0].split(None, 1)) == 2 and row[0].split(None, 1)[1].strip(), row
    code, out, _ = cli(capsys, "passes", "--json")
    infos = {i["name"]: i for i in json.loads(out)}
    for name in KNOWN_PASSES:
        assert infos[name]["summary"] and "\n" not in infos[name]["summary"]
    assert "size_limit" in [o["name"] for o in infos["cse"]["options"]]


def test_pass_summaries_are_whole_sentences(capsys) -> None:
    code, out, _ = cli(capsys, "passes", "--json")
    assert code == 0
    cut = [i["name"] for i in json.loads(out) if not i["summary"].rstrip().endswith((".", ")"))]
    assert cut == [], f"summaries cut mid-sentence: {cut}"


# --- the installed console script --------------------------------------------------------------


def test_console_script(tmp_path, mlp_path) -> None:
    exe = Path(sys.executable).with_name("graphopt")
    assert exe.is_file(), "console script not installed (pip install -e .)"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"")
    proc = subprocess.run(
        [exe, "optimize", bad, "-o", tmp_path / "o.onnx"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.onnx").exists()
    proc = subprocess.run(
        [exe, "optimize", mlp_path, "-o", tmp_path / "o.onnx"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o.onnx").is_file()

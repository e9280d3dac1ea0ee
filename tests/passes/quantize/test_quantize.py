"""The ``quantize`` dispatcher and the optimize()/CLI interface around the mode passes."""

from __future__ import annotations

import json

import numpy as np
import pytest

import graphopt
from graphopt.cli import main
from graphopt.errors import PipelineError
from graphopt.verify import run_model


@pytest.fixture(scope="module")
def bert():
    from models import build_bert

    built = build_bert("tiny")
    return built, built.export()


@pytest.fixture(scope="module")
def digits_cnn():
    from digits import train_digits_cnn

    trained = train_digits_cnn(epochs=6)
    return trained, trained.export()


def _row(result):
    (row,) = [p for p in result.report.passes if p.name == "quantize"]
    return row


def test_optimize_dynamic_runs_the_mode_pass_and_reports_every_candidate(bert) -> None:
    built, model = bert
    r = graphopt.optimize(model, quantize="dynamic", verify=True, verify_options={"inputs": built.feeds()})
    row = _row(r)
    assert r.model.metadata_props["graphopt.pipeline"].endswith(
        "quantize(mode=dynamic),lower-ort-cpu,cleanup"
    )
    assert row.stats["quantized"] == sum(1 for n in row.details["nodes"] if n["quantized"]) > 0
    assert all(n["reason"] for n in row.details["nodes"] if not n["quantized"])
    assert r.report.verification.passed and all(o.cosine > 0.99 for o in r.report.verification.outputs)


def test_an_option_of_another_mode_is_an_error_not_ignored(bert) -> None:
    _, model = bert
    with pytest.raises(PipelineError, match=r"\['block_size'\] do not apply to mode=dynamic"):
        graphopt.optimize(model, quantize={"mode": "dynamic", "block_size": 32})
    with pytest.raises(PipelineError, match="min_cosine must be in"):
        graphopt.optimize(model, quantize={"mode": "dynamic", "min_cosine": 1.5})


def test_min_cosine_keeps_the_most_sensitive_layers_float_until_met(bert) -> None:
    built, model = bert
    feeds = [built.feeds(seed=s) for s in range(2)]
    plain = _row(graphopt.optimize(model, quantize="dynamic"))
    target = 0.99999
    r = graphopt.optimize(model, quantize={"mode": "dynamic", "min_cosine": target}, calibration=feeds)
    row = _row(r)
    d = row.details
    assert d["fidelity_all_quantized"]["min_cosine"] < target  # otherwise nothing to control
    assert d["target_met"] and d["fidelity"]["min_cosine"] >= target
    kept = d["kept_float_for_accuracy"]
    assert 0 < len(kept) < plain.stats["quantized"]
    # The kept layers are the most sensitive ones, and they really are float in the output.
    assert kept == [s["node"] for s in d["sensitivity"][: len(kept)]]
    reasons = {n["node"]: n["reason"] for n in d["nodes"]}
    assert all(reasons[k] == "kept float for min_cosine" for k in kept)
    assert row.stats["quantized"] == plain.stats["quantized"] - len(kept)
    # The promise holds on the data it was measured on.
    for f in feeds:
        for (_, ref), (_, got) in zip(run_model(model, f), run_model(r.model, f)):
            a, b = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            assert cos.min() >= target - 1e-6


def test_sensitivity_measures_each_quantized_layer_alone(bert) -> None:
    _, model = bert
    row = _row(graphopt.optimize(model, quantize={"mode": "int4", "sensitivity": True}))
    sens = row.details["sensitivity"]
    assert len(sens) == row.stats["quantized"]
    cos = [s["min_cosine"] for s in sens]
    assert cos == sorted(cos) and all(0.9 < c <= 1.0 for c in cos)  # worst first


def test_static_through_optimize_with_a_one_shot_generator(digits_cnn) -> None:
    trained, model = digits_cnn
    batches = (b for b in trained.calibration(128, 32))  # consumed once; control needs it twice
    r = graphopt.optimize(model, quantize={"mode": "static", "min_cosine": 0.999}, calibration=batches)
    assert "fuse-ort" not in r.report.pipeline
    ops = {n.op_type for n in r.model.graph}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    logits = run_model(r.model, {"x": trained.x_test})[0][1]
    assert (logits.argmax(1) == trained.y_test).mean() >= trained.test_accuracy - 0.01


def test_cli_quantize_with_sensitivity_table_plot_and_report(bert, tmp_path, capsys) -> None:
    _, model = bert
    src = tmp_path / "m.onnx"
    graphopt.save(model, src)
    out, report, plot = tmp_path / "q.onnx", tmp_path / "r.json", tmp_path / "s.png"
    code = main(
        [
            "optimize",
            str(src),
            "-o",
            str(out),
            "--quantize",
            "dynamic",
            "--exclude",
            "MatMul_does_not_exist",
            "--sensitivity",
            "--sensitivity-plot",
            str(plot),
            "--report",
            str(report),
            "--verify",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "per-layer sensitivity" in printed and "min cosine" in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(report.read_text())["passes"]
    (q,) = [p for p in rows if p["name"] == "quantize"]
    assert q["details"]["sensitivity"] and q["details"]["nodes"]
    assert any(
        n.op_type in ("DynamicQuantizeMatMul", "QAttention", "MatMulInteger")
        for n in graphopt.load(out).graph
    )

"""prune in pipelines: composition with fusion and quantization, optimize(prune=...), option
errors, pipeline text and determinism.
"""

from __future__ import annotations

import numpy as np
import pytest
from prune_helpers import _prune, built

import graphopt
from graphopt.errors import PipelineError
from graphopt.passes.prune import PrunePass
from graphopt.pipeline import Pipeline
from graphopt.verify import run_model

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bert():
    return built("bert")


def test_prune_composes_with_fusion_in_one_pipeline(bert):
    ex, model = bert
    out, report = Pipeline.parse("cleanup,prune(mode=structured,sparsity=0.5),fuse,cleanup").run(
        model.clone()
    )
    rows = [r for r in report.passes if r.name == "prune"]
    assert rows and rows[0].modified and rows[0].details["groups"]
    feeds = ex.feeds(2, 9)
    ref, _ = _prune(model, mode="structured", sparsity=0.5)
    np.testing.assert_allclose(run_model(out, feeds)[0][1], run_model(ref, feeds)[0][1], atol=1e-4, rtol=1e-3)


def test_prune_then_quantize_in_one_pipeline_and_through_optimize(bert):
    ex, model = bert
    feeds = ex.feeds(2, 10)
    base = "cleanup,prune(mode=structured,sparsity=0.5),fuse,cleanup"
    pruned, _ = Pipeline.parse(base).run(model.clone())
    quant, report = Pipeline.parse(base + ",quantize-dynamic").run(model.clone())
    assert [r.name for r in report.passes if r.name in ("prune", "quantize-dynamic")] == [
        "prune",
        "quantize-dynamic",
    ]
    assert next(r for r in report.passes if r.name == "quantize-dynamic").stats.get("quantized", 0) > 0
    a, b = run_model(pruned, feeds)[0][1].ravel(), run_model(quant, feeds)[0][1].ravel()
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99
    r = graphopt.optimize(model, prune={"sparsity": 0.5, "mode": "structured"})
    row = next(p for p in r.report.passes if p.name == "prune")
    assert row.stats["removed_units:ffn"] == 128 and row.stats["removed_units:heads"] == 4
    np.testing.assert_allclose(run_model(r.model, feeds)[0][1], run_model(pruned, feeds)[0][1], atol=1e-4)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"sparsity": 1.5}, "sparsity"),
        ({"mode": "3:2"}, "N:M"),
        ({"mode": "blocky"}, "mode"),
        ({"targets": ["rows"]}, "target"),
        ({"scope": "world"}, "scope"),
    ],
)
def test_bad_options_raise_pipeline_errors(options, match):
    with pytest.raises(PipelineError, match=match):
        PrunePass(**options)


def test_pipeline_text_accepts_nm_mode_and_is_deterministic(bert):
    _, model = bert
    pipe = Pipeline.parse('prune(mode="2:4")')
    out, report = pipe.run(model.clone())
    assert report.passes[0].stats["pruned_weights"] >= 12
    assert Pipeline.parse(str(pipe)) == pipe
    p1, _ = _prune(model, mode="structured", sparsity=0.5)
    p2, _ = _prune(model, mode="structured", sparsity=0.5)
    assert graphopt.to_bytes(p1) == graphopt.to_bytes(p2)

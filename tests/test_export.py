"""torch → graphopt.export → graphopt.optimize(target="ort-cpu") on real (random-weight) models.

Every case checks the same contract: the optimized model computes what the export computes on
ONNX Runtime (graphopt.verify and, independently, plain onnxruntime sessions on the same feeds,
at two input shapes so the dynamic dims stay dynamic), it has fewer nodes, the report has one
consistent row per pass execution, and the exporter's shape arithmetic is at least partly folded.
Tiny models run by default; BERT-base and GPT-2 small run with ``-m slow``.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import sys
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import graphopt

#: The exporter's shape arithmetic: ops that compute or manipulate shape values.
SHAPE_OPS = ("Shape", "Size", "Gather", "Concat", "Unsqueeze", "Squeeze", "Slice", "Range", "ConstantOfShape")
#: Feeds at the export's example shape and at a different one (checks dims stay symbolic).
SHAPES = ((2, 16), (3, 7))
ATOL = 1e-4

CASES = [
    pytest.param(("bert", "tiny"), id="bert-tiny"),
    pytest.param(("gpt2", "tiny"), id="gpt2-tiny"),
    pytest.param(("gpt2-lm", "tiny"), id="gpt2-lm-tiny"),
    pytest.param(("llama", "tiny"), id="llama-tiny"),
    pytest.param(("vit", "tiny"), id="vit-tiny"),
    pytest.param(("resnet", "tiny"), id="resnet-tiny"),
    pytest.param(("cnn", "tiny"), id="cnn"),
    pytest.param(("bert", "base"), id="bert-base", marks=pytest.mark.slow),
    pytest.param(("gpt2", "base"), id="gpt2-small", marks=pytest.mark.slow),
]


@dataclasses.dataclass
class Case:
    kind: str
    exported: ir.Model
    optimized: ir.Model
    report: graphopt.Report
    feeds: list[dict[str, np.ndarray]]
    torch_outputs: list[list[np.ndarray]]


def _torch_outputs(built: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        if "x" in feeds:
            out = built.module(torch.from_numpy(feeds["x"]))
        else:
            kwargs = {k: torch.from_numpy(v) for k, v in feeds.items()}
            if "use_cache" in built.kwargs:
                kwargs["use_cache"] = False
            out = built.module(**kwargs)
    if isinstance(out, torch.Tensor):
        return [out.numpy()]
    # transformers ModelOutput: the tensors in field order (what the exporter flattens).
    return [v.numpy() for v in out.values() if isinstance(v, torch.Tensor)]


@pytest.fixture(scope="module", params=CASES)
def case(request: pytest.FixtureRequest) -> Case:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from models import build

    kind, size = request.param
    built = build(kind, size)
    exported = built.export()
    result = graphopt.optimize(exported, target="ort-cpu")
    shapes = SHAPES
    if kind in ("vit", "resnet"):  # exported with a dynamic batch and a fixed image size
        image = built.config.image_size if kind == "vit" else 64
        shapes = ((2, image), (3, image))
    feeds = [built.feeds(b, s, seed=i) for i, (b, s) in enumerate(shapes)]
    torch_outputs = [_torch_outputs(built, f) for f in feeds]
    return Case(kind, exported, result.model, result.report, feeds, torch_outputs)


def _node_count(model: ir.Model) -> int:
    n = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
    return n + sum(sum(1 for _ in ir.traversal.RecursiveGraphIterator(f)) for f in model.functions.values())


def _op_counts(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph))


def _ort_run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Plain onnxruntime, its own graph rewrites off (so only graphopt's rewrites are compared)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(graphopt.to_bytes(model), so, providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in sess.get_inputs()) == sorted(feeds)
    return sess.run(None, feeds)


def test_optimize_removes_nodes(case: Case) -> None:
    before, after = _node_count(case.exported), _node_count(case.optimized)
    assert after < before, f"{case.kind}: {before} -> {after} nodes"
    assert case.report.before.nodes == before
    assert case.report.after.nodes == after


def test_graphopt_verify_matches_export(case: Case) -> None:
    # Generated inputs (graphopt picks token ids inside the embedding table) and our own feeds.
    for inputs in (None, *case.feeds):
        result = graphopt.verify(case.exported, case.optimized, inputs=inputs)
        assert result.passed, result.failure_summary()
        assert result.outputs
        for out in result.outputs:
            assert out.max_abs is not None and out.max_abs <= ATOL, (out.name, out.max_abs)


def test_onnxruntime_outputs_match_export(case: Case) -> None:
    """Independent of graphopt.verify: same feeds through two onnxruntime sessions."""
    for feeds in case.feeds:
        ref = _ort_run(case.exported, feeds)
        got = _ort_run(case.optimized, feeds)
        assert len(got) == len(ref)
        for r, g in zip(ref, got):
            assert g.shape == r.shape and g.dtype == r.dtype
            assert np.isfinite(r).all()
            assert float(np.max(np.abs(g - r))) <= ATOL


def test_export_matches_torch(case: Case) -> None:
    """The export itself is faithful (so the comparisons above compare the right thing)."""
    for feeds, expected in zip(case.feeds, case.torch_outputs):
        got = _ort_run(case.optimized, feeds)
        assert len(got) == len(expected)
        for e, g in zip(expected, got):
            np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-3)


def test_dynamic_dims_stay_symbolic(case: Case) -> None:
    exported = {v.name: v for v in case.exported.graph.inputs}
    assert [v.name for v in case.optimized.graph.inputs] == list(exported)
    for value in case.optimized.graph.inputs:
        before = exported[value.name].shape
        assert value.shape is not None and before is not None and len(value.shape) == len(before)
        dynamic = [i for i, d in enumerate(before) if not isinstance(d, int)]
        assert 0 in dynamic, f"the export of {value.name} has a static batch dim"
        for i in dynamic:
            assert not isinstance(value.shape[i], int), f"dim {i} of {value.name} was made static"


def test_report_has_one_consistent_row_per_pass(case: Case) -> None:
    rows = case.report.passes
    assert rows, "the report has no pass rows"
    assert rows[0].before.nodes == case.report.before.nodes
    assert rows[-1].after.nodes == case.report.after.nodes
    for prev, row in zip(rows, rows[1:]):
        assert row.before == prev.after, f"{row.name} starts from a different model than {prev.name} left"
    for row in rows:
        assert row.name.startswith(("cleanup/", "fuse-", "lower-")), row.name
        assert isinstance(row.before.nodes, int) and isinstance(row.after.nodes, int)
        assert row.wall_s >= 0
        if not row.modified:
            assert row.after.nodes == row.before.nodes
    # Fixpoint members carry their iteration; every iteration runs every member once.
    first_cleanup = rows[
        : next((i for i, r in enumerate(rows) if not r.name.startswith("cleanup/")), len(rows))
    ]
    iterations = collections.Counter(r.iteration for r in first_cleanup if r.iteration is not None)
    assert iterations and len(set(iterations.values())) == 1, iterations
    assert iterations.keys() == set(range(1, len(iterations) + 1))
    data = case.report.to_dict()
    assert len(data["passes"]) == len(rows)
    assert {"name", "before", "after", "modified", "wall_s"} <= data["passes"][0].keys()


def test_report_rows_match_pass_executions(case: Case) -> None:
    """Re-run the target's pipeline with an instrument: one row per before_pass call, same order."""
    calls: list[str] = []

    class Count:
        def before_pass(self, name: str, model: ir.Model) -> None:
            calls.append(name)

    pipe = graphopt.Pipeline.parse(case.report.pipeline)
    _, report = pipe.run(case.exported.clone(), instruments=[Count()])
    assert [r.name for r in report.passes] == calls
    assert [r.name for r in case.report.passes] == calls


def test_shape_computations_are_folded(case: Case) -> None:
    if case.kind in ("cnn", "resnet"):
        pytest.skip("the CNN exports have no shape arithmetic")
    before, after = _op_counts(case.exported), _op_counts(case.optimized)
    n_before = sum(before[op] for op in SHAPE_OPS)
    n_after = sum(after[op] for op in SHAPE_OPS)
    assert n_after < n_before, (before, after)
    assert after["Concat"] < before["Concat"], (before["Concat"], after["Concat"])
    assert after["Constant"] == 0, "constants should be folded into initializers"


def test_export_needs_torch_sys_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(graphopt.GraphoptError, match="torch"):
        graphopt.export(object(), ())


def test_export_needs_torch_import_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_torch(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(graphopt.GraphoptError, match="torch"):
        graphopt.export(object(), ())


def test_export_rejects_non_module() -> None:
    pytest.importorskip("torch")
    with pytest.raises(graphopt.GraphoptError, match="torch.nn.Module"):
        graphopt.export(lambda x: x, (1,))

"""Semantics preserved on corpora nobody here wrote: ONNX's node tests and model-zoo light graphs."""

from __future__ import annotations

import glob
import os
import warnings

import numpy as np
import onnx
import pytest
from corpus import assert_same, run

import graphopt


def _node_cases() -> list:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [c for c in collect_testcases() if c.data_sets]


NODE_CASES = _node_cases()


def test_corpus_is_the_full_node_suite() -> None:
    # Guard against silently testing nothing if onnx's layout changes.
    assert len(NODE_CASES) > 1500


@pytest.mark.parametrize("case", NODE_CASES, ids=[c.name for c in NODE_CASES])
def test_node_case_outputs_unchanged(case) -> None:
    data = case.model.SerializeToString()
    inputs = case.data_sets[0][0]
    feeds = dict(zip([i.name for i in case.model.graph.input], inputs))
    try:
        expected = run(data, feeds)
    except Exception:
        pytest.skip("ONNX Runtime cannot run the original")
    result = graphopt.optimize(graphopt.load(case.model), target="ort-cpu")
    got = run(graphopt.to_bytes(result.model), feeds)
    assert len(got) == len(expected)
    for i, (r, g) in enumerate(zip(expected, got)):
        assert_same(r, g, rtol=1e-3, atol=1e-4, where=f"{case.name} output {i}")


LIGHT = sorted(glob.glob(os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/*.onnx")))
SMALL_LIGHT = [p for p in LIGHT if not any(k in p for k in ("vgg19", "zfnet512", "alexnet"))]


def _check_light(path: str) -> None:
    original = graphopt.load(path)
    result = graphopt.optimize(original, target="ort-cpu")
    m = result.model
    ops = [n.op_type for n in m.graph]
    assert "ConstantOfShape" not in ops, "weights built by ConstantOfShape were not folded"
    assert len(m.graph.initializers) > 0
    assert result.report.after.nodes < result.report.before.nodes
    inits = set(original.graph.initializers)
    (data_input,) = [v for v in original.graph.inputs if v.name not in inits]
    shape = [d if isinstance(d, int) else 1 for d in data_input.shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with open(path, "rb") as f:
        expected = run(f.read(), {data_input.name: x})
    got = run(graphopt.to_bytes(m), {data_input.name: x})
    for r, g in zip(expected, got):
        assert_same(r, g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", SMALL_LIGHT, ids=[os.path.basename(p)[:-5] for p in SMALL_LIGHT])
def test_light_model_folds_to_initializers_and_keeps_outputs(path: str) -> None:
    _check_light(path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "path",
    sorted(set(LIGHT) - set(SMALL_LIGHT)),
    ids=[os.path.basename(p)[:-5] for p in sorted(set(LIGHT) - set(SMALL_LIGHT))],
)
def test_large_light_model_folds(path: str) -> None:
    _check_light(path)

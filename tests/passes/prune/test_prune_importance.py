"""prune importance=activation: calibration statistics change what is pruned (structured unit
scores; Wanda-style per-output scores for unstructured pruning), and calibration is required.
"""

from __future__ import annotations

import numpy as np
import pytest
from prune_helpers import _check, _inits, _prune, built

from graphopt.errors import PipelineError
from graphopt.verify import run_model

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bert():
    return built("bert")


@pytest.fixture(scope="module")
def digits_cnn():
    return built("digits_cnn")


def test_structured_activation_importance_uses_calibration_and_differs_from_l1(digits_cnn):
    d, model = digits_cnn
    _, pl1 = _prune(model, mode="structured", sparsity=0.5)
    pruned, pact = _prune(
        model, {"calibration": d.calibration(64)}, mode="structured", sparsity=0.5, importance="activation"
    )
    r1 = [g["removed"] for g in pl1.details["groups"]]
    ra = [g["removed"] for g in pact.details["groups"]]
    assert len(r1) == len(ra) == 3 and r1 != ra
    _check(pruned)
    light, _ = _prune(
        model, {"calibration": d.calibration(64)}, mode="structured", sparsity=0.25, importance="activation"
    )
    acc = (run_model(light, {"x": d.x_test})[0][1].argmax(-1) == d.y_test).mean()
    assert acc > 0.5  # still a classifier (no fine-tuning)
    with pytest.raises(PipelineError, match="calibration"):
        _prune(model, mode="structured", importance="activation")


def test_unstructured_activation_importance_is_wanda_per_output(bert):
    ex, model = bert
    calib = [ex.feeds(2, 12, seed=s) for s in range(3)]
    pruned, p = _prune(model, {"calibration": calib}, sparsity=0.5, importance="activation")
    before, after = _inits(model), _inits(pruned)
    from graphopt.calibration import CalibrationData, stream_tensors

    e = next(e for e in p.details["layers"] if e["pruned"] and e["op_type"] == "MatMul")
    node = next(n for n in model.graph if n.name == e["nodes"][0])
    x_name = node.inputs[0].name
    sq = 0
    for batch in stream_tensors(model, [x_name], CalibrationData.from_any(calib)):
        a = batch[x_name].reshape(-1, batch[x_name].shape[-1]).astype(np.float64)
        sq = sq + (a * a).sum(0)
    w, got = before[e["weight"]], after[e["weight"]]
    score = np.abs(w) * np.sqrt(sq)[:, None]
    k = w.shape[0] // 2
    for col in range(w.shape[1]):  # per output column: exactly half zeroed, the lowest scores
        zero = got[:, col] == 0
        assert zero.sum() == k
        assert score[zero, col].max() <= score[~zero, col].min()
    mag, _ = _prune(model, sparsity=0.5)
    assert not np.array_equal(_inits(mag)[e["weight"]] == 0, got == 0)  # not plain magnitude
    with pytest.raises(PipelineError, match="calibration"):
        _prune(model, sparsity=0.5, importance="activation")

"""``calibrator=auto`` (the default): pick the calibrator by the error it causes on the model's
outputs, not on each activation alone.

Why: ``mse`` minimises each activation's own quantization error, which is the right trade on most
tensors but clips rare large values that a later layer depends on (a few outlier channels or
positions feeding a pooling head); ``minmax`` (ONNX Runtime's default) never clips but rounds
coarsely. Neither wins on every model, so each candidate's ranges are applied to a copy of the
model and the copies' outputs are compared with the float model's (the worst output's cosine over
all rows, then its SQNR) on calibration data the ranges were *not* fitted on: two folds of (up to
:data:`VALIDATION_BATCHES`) calibration batches, or of one batch's rows; in-sample only when the
model cannot run a half batch (a static batch size). In-sample scores would favour ``minmax``,
which never clips the very values it is scored on. The choice is cached with the statistics, so
the accuracy-control loop's re-runs validate once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from graphopt.calibration import CalibrationData, CalibrationError

from ..accuracy import fidelity
from .calibrate import ranges, stream
from .plan import Plan, plan_graph
from .rewrite import apply

if TYPE_CHECKING:
    from .run import Run

__all__ = ["AUTO_CANDIDATES", "VALIDATION_BATCHES", "choose_calibrator"]

#: Tried in this order; the first of equally good ones wins.
AUTO_CANDIDATES = ("mse", "minmax", "percentile")
#: At most this many calibration batches run through each candidate.
VALIDATION_BATCHES = 8


def choose_calibrator(run: Run, plan: Plan, smooth_key: tuple[Any, ...]) -> str:
    """The candidate calibrator whose quantized model's outputs best match the float model's on
    data it was not calibrated on; the scores land in ``details['auto_calibrator']``."""
    o = run.options
    cache = run.cache()
    key = (
        "auto",
        run.source_key(),
        o.max_batches,
        smooth_key,
        run.placement.name,
        run.act(False),
        bool(o.per_channel),
        run.per_axis,
        tuple(o.activations16),
        tuple(o.op_types),
        bool(o.embeddings),
        float(o.percentile),
    )
    if key not in cache:
        cache[key] = _choose(run, plan, smooth_key)
        cached = False
    else:
        cached = True
    chosen, scores, how = cache[key]
    run.details["auto_calibrator"] = {
        "chosen": chosen,
        "validated_on": how,
        "cached": cached,
        "candidates": scores,
    }
    return chosen  # type: ignore[no-any-return]


def _choose(run: Run, plan: Plan, smooth_key: tuple[Any, ...]) -> tuple[str, dict[str, Any], str]:
    if getattr(run.data, "_single_use", False):
        # A one-shot iterator is spent by calibration: nothing is left to validate on.
        return AUTO_CANDIDATES[0], {}, "nothing (one-shot calibration iterator)"
    o = run.options
    limit = VALIDATION_BATCHES if o.max_batches is None else min(o.max_batches, VALIDATION_BATCHES)
    batches = list(run.data.batches(limit))
    attempts: list[tuple[str, list[tuple[list[Any], list[Any]]]]] = []
    if len(batches) >= 2:
        even, odd = batches[0::2], batches[1::2]
        attempts.append(("held-out batches (2 folds)", [(even, odd), (odd, even)]))
    else:
        halves = _halves(batches[0]) if batches else None
        if halves is not None:
            a, b = halves
            attempts.append(("held-out rows (2 folds)", [([a], [b]), ([b], [a])]))
    attempts.append(("the calibration batches themselves", [(batches, batches)]))
    for how, folds in attempts:
        try:
            scores = _score(run, plan, smooth_key, folds)
        except CalibrationError:
            continue  # e.g. half a batch for a model with a static batch size: next way
        # Best mean (over folds) cosine of the worst output, then SQNR; the first on ties.
        chosen = max(AUTO_CANDIDATES, key=lambda c: (scores[c]["cosine"], scores[c]["sqnr_db"]))
        return chosen, scores, how
    return AUTO_CANDIDATES[0], {}, "nothing (the model could not run the validation batches)"


def _score(
    run: Run, plan: Plan, smooth_key: tuple[Any, ...], folds: list[tuple[list[Any], list[Any]]]
) -> dict[str, dict[str, float]]:
    """Per candidate: mean (over folds) of the worst output's SQNR and the worst row cosine, the
    ranges fitted on each fold's first part and the outputs compared on its second."""
    names = [v.name for v in run.graph.outputs if v.name]
    quiet = dataclasses.replace(run, details={}, count=_no_count)
    sums = {c: [0.0, 0.0] for c in AUTO_CANDIDATES}
    for fit, held in folds:
        fit_data = CalibrationData.from_any(fit)
        held_data = CalibrationData.from_any(held)
        fold = dataclasses.replace(
            quiet, data=fit_data, context={"_static_ranges": {}, "calibration": fit_data}
        )
        reference = _outputs(run.model, names, held_data)
        for calibrator in AUTO_CANDIDATES:
            act_ranges = ranges(fold, plan, smooth_key, calibrator)
            copy = run.model.clone()
            crun = dataclasses.replace(fold, model=copy)
            apply(crun, plan_graph(crun, use_selection=False), act_ranges)
            got = _outputs(copy, names, held_data)
            sums[calibrator][0] += _output_cosine(reference, got) / len(folds)
            sums[calibrator][1] += _finite(fidelity(reference, got).sqnr_db) / len(folds)
    return {c: {"cosine": round(v[0], 6), "sqnr_db": round(v[1], 4)} for c, v in sums.items()}


def _output_cosine(reference: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    """The worst float output's cosine to the reference, each output's batches taken together
    (the figure users compare quantizers by)."""
    worst = 1.0
    for i in range(len(reference[0]) if reference else 0):
        r = np.concatenate([np.asarray(b[i], np.float64).ravel() for b in reference])
        if not np.issubdtype(np.asarray(reference[0][i]).dtype, np.floating) or r.size == 0:
            continue
        g = np.concatenate([np.asarray(b[i], np.float64).ravel() for b in got])
        if g.shape != r.shape or not np.all(np.isfinite(g)):
            return -1.0
        den = float(np.linalg.norm(r) * np.linalg.norm(g))
        cos = float(r @ g) / den if den > 0 else float(np.array_equal(r, g))
        worst = min(worst, cos)
    return worst


def _halves(feeds: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """One batch split in two along the first axis, when every input has the same first
    dimension of at least 2 (otherwise there is no row axis to split safely)."""
    arrays = {k: np.asarray(v) for k, v in feeds.items()}
    rows = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
    if len(rows) != 1 or (n := rows.pop()) < 2:
        return None
    h = n // 2
    return {k: a[:h] for k, a in arrays.items()}, {k: a[h:] for k, a in arrays.items()}


def _outputs(model: Any, names: list[str], data: CalibrationData) -> list[list[np.ndarray]]:
    return [
        [values[n] for n in names]
        for values in stream(model, names, data, None, False, "quantize-static: validating")
    ]


def _finite(v: float) -> float:
    return v if math.isfinite(v) else (1e9 if v > 0 else -1e9)


def _no_count(*_: Any, **__: Any) -> None:
    """Candidates' rewrites are not the pass's: they count nothing."""

"""``calibrator=auto`` (the default): pick the calibrator by the error it causes on the model's
outputs, not on each activation alone.

Why: ``mse`` minimises each activation's own quantization error, which is the right trade on most
tensors but clips rare large values that a later layer depends on (a few outlier channels or
positions feeding a pooling head); ``minmax`` (ONNX Runtime's default) never clips but rounds
coarsely. Neither wins on every model. ``minmax`` is the baseline: it never loses to ONNX
Runtime's default by the calibrator, and it generalises best to inputs beyond the calibrated ones.
A clipping calibrator replaces it only on clear evidence: each candidate's ranges are applied to a
copy of the model and the copies' outputs compared with the float model's (the worst output's
cosine over all rows) on calibration data the ranges were *not* fitted on (two folds of
:data:`VALIDATION_BATCHES` to :data:`MAX_VALIDATION_BATCHES` batches, or of one batch's rows), and
the candidate must cut the error to :data:`MARGIN` of minmax's in every fold. In-sample scores would favour the calibrator that fits
the very values it is scored on; with fewer than :data:`MIN_HELD_OUT_ROWS` held-out rows the
scores are noise (measured: four single-image batches picked mse on a MobileNetV3 classifier,
which lost on other images), so the baseline stays. The choice is cached with the statistics, so
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

__all__ = ["AUTO_CANDIDATES", "MAX_VALIDATION_BATCHES", "VALIDATION_BATCHES", "choose_calibrator"]

#: The baseline (ONNX Runtime's default, never clips) first, then the clipping calibrators.
AUTO_CANDIDATES = ("minmax", "mse", "percentile")
#: Calibration batches run through each candidate: at least this many, and more (up to
#: :data:`MAX_VALIDATION_BATCHES`) while they hold fewer than two folds of
#: :data:`MIN_HELD_OUT_ROWS` rows: with single-image batches (most detection and OCR models have a
#: static batch of 1) eight batches could never be validated on.
VALIDATION_BATCHES = 8
MAX_VALIDATION_BATCHES = 32
#: Fewer held-out rows per fold than this and the scores are noise: keep the baseline.
MIN_HELD_OUT_ROWS = 16
#: A clipping calibrator replaces the baseline only when it cuts the output error (1 - cosine)
#: to at most this share of the baseline's, on average and in every fold.
MARGIN = 0.9


def choose_calibrator(run: Run, plan: Plan, smooth_key: tuple[Any, ...]) -> str:
    """``minmax``, or a clipping calibrator that clearly beats it on calibration data the ranges
    were not fitted on; the scores land in ``details['auto_calibrator']``."""
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
    base = AUTO_CANDIDATES[0]
    if getattr(run.data, "_single_use", False):
        # A one-shot iterator is spent by calibration: nothing is left to validate on.
        return base, {}, "nothing (one-shot calibration iterator)"
    o = run.options
    cap = MAX_VALIDATION_BATCHES if o.max_batches is None else min(o.max_batches, MAX_VALIDATION_BATCHES)
    batches = []
    for batch in run.data.batches(cap):
        batches.append(batch)
        if len(batches) >= VALIDATION_BATCHES and sum(map(_rows, batches)) >= 2 * MIN_HELD_OUT_ROWS:
            break
    if len(batches) >= 2:
        even, odd = batches[0::2], batches[1::2]
        how, folds = "held-out batches (2 folds)", [(even, odd), (odd, even)]
    elif batches and (halves := _halves(batches[0])) is not None:
        first, second = halves
        how, folds = "held-out rows (2 folds)", [([first], [second]), ([second], [first])]
    else:
        return base, {}, "nothing (one calibration batch without a row axis to split)"
    rows = min(sum(_rows(b) for b in held) for _, held in folds)
    if rows < MIN_HELD_OUT_ROWS:
        return base, {}, f"nothing ({rows} held-out rows per fold, fewer than {MIN_HELD_OUT_ROWS})"
    try:
        per_fold = _score(run, plan, smooth_key, folds)
    except CalibrationError:  # e.g. half a batch for a model with a static batch size
        return base, {}, "nothing (the model cannot run the held-out part on its own)"
    err = {c: [1.0 - cos for cos, _ in per_fold[c]] for c in AUTO_CANDIDATES}
    scores = {
        c: {
            "cosine": round(float(np.mean([cos for cos, _ in per_fold[c]])), 6),
            "sqnr_db": round(float(np.mean([sq for _, sq in per_fold[c]])), 4),
        }
        for c in AUTO_CANDIDATES
    }
    chosen = base
    for c in AUTO_CANDIDATES[1:]:
        clear = all(e <= MARGIN * b for e, b in zip(err[c], err[base]))
        if clear and np.mean(err[c]) < np.mean(err[chosen]):
            chosen = c
    return chosen, scores, how


def _score(
    run: Run, plan: Plan, smooth_key: tuple[Any, ...], folds: list[tuple[list[Any], list[Any]]]
) -> dict[str, list[tuple[float, float]]]:
    """Per candidate and fold: (the worst output's cosine, its SQNR), the ranges fitted on the
    fold's first part and the outputs compared on its second."""
    names = [v.name for v in run.graph.outputs if v.name]
    quiet = dataclasses.replace(run, details={}, count=_no_count)
    out: dict[str, list[tuple[float, float]]] = {c: [] for c in AUTO_CANDIDATES}
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
            out[calibrator].append(
                (_output_cosine(reference, got), _finite(fidelity(reference, got).sqnr_db))
            )
    return out


def _rows(feeds: dict[str, Any]) -> int:
    """The batch's row count: the first axis of its first input (1 for a scalar)."""
    for v in feeds.values():
        a = np.asarray(v)
        return int(a.shape[0]) if a.ndim else 1
    return 0


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


def _output_cosine(reference: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    """The worst float output's cosine to the reference, each output's batches taken together
    (the figure users compare quantizers by)."""
    worst = 1.0
    for i in range(len(reference[0]) if reference else 0):
        if not np.issubdtype(np.asarray(reference[0][i]).dtype, np.floating):
            continue
        r = np.concatenate([np.asarray(b[i], np.float64).ravel() for b in reference])
        g = np.concatenate([np.asarray(b[i], np.float64).ravel() for b in got])
        if r.size == 0:
            continue
        if g.shape != r.shape or not np.all(np.isfinite(g)):
            return -1.0
        den = float(np.linalg.norm(r) * np.linalg.norm(g))
        worst = min(worst, float(r @ g) / den if den > 0 else float(np.array_equal(r, g)))
    return worst

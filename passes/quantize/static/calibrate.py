"""Calibration for ``quantize-static``: the calibration data runs through the float model once
(one batch at a time, reduced into mergeable statistics, see :mod:`..calibrators`) and a
calibrator turns each tensor's statistics into a clip range. Statistics and ranges are cached in
the pipeline context, so re-running the pass on copies of the same model (the accuracy-control
loop) calibrates once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from graphopt.calibration import CalibrationError, stream_tensors

from ..calibrators import Histogram, MinMax, compute_range
from .run import QRANGE, Run

if TYPE_CHECKING:
    from .plan import Plan

__all__ = ["ranges", "stream"]


def ranges(
    run: Run, plan: Plan, smooth_key: tuple[Any, ...], calibrator: str | None = None
) -> dict[tuple[str, bool], tuple[float, float]]:
    """``{(tensor, wide): (rmin, rmax)}`` for every tensor of ``plan`` with its own range, by
    ``calibrator`` (default: the option's; ``auto`` collects histograms for its candidates)."""
    o = run.options
    calibrator = calibrator or o.calibrator
    cache = run.cache()
    want_hist = calibrator != "minmax"
    base = (run.source_key(), o.max_batches, smooth_key)
    needed = sorted(
        {qt.range_from for qt in plan.tensors.values() if qt.shared_from is None and qt.table is None}
    )

    def stats_key(name: str, hist: bool) -> tuple[Any, ...]:
        return ("stats", name, "hist" if hist else "minmax", *base)

    missing = [n for n in needed if stats_key(n, want_hist) not in cache and stats_key(n, True) not in cache]
    batches = 0
    if missing:
        stats: dict[str, MinMax | Histogram] = {n: Histogram() if want_hist else MinMax() for n in missing}
        for values in stream(
            run.model, missing, run.data, o.max_batches, o.progress, "quantize-static: calibrating"
        ):
            batches += 1
            for name, arr in values.items():
                stats[name].update(arr)
        if batches == 0:
            raise CalibrationError("quantize-static: the calibration data yielded no batches")
        for n, s in stats.items():
            cache[stats_key(n, want_hist)] = s
    run.details["calibration"] = {
        "calibrator": calibrator,
        "tensors": len(needed),
        "collected": len(missing),
        "batches": batches,
        "cached": not missing,
    }
    out: dict[tuple[str, bool], tuple[float, float]] = {}
    for qt in plan.tensors.values():
        if qt.shared_from is not None or qt.table is not None:
            continue
        for wide in (False, True):
            name = qt.range_from
            s = cache.get(stats_key(name, want_hist)) or cache.get(stats_key(name, True))
            t, sym = run.act(wide)
            qmin, qmax = QRANGE[t][:2]
            calib = "minmax" if wide else calibrator  # 16 bits: clipping costs more than resolution
            rkey = ("range", name, calib, float(o.percentile), qmin, qmax, sym, *base)
            if rkey not in cache:
                cache[rkey] = compute_range(
                    s, calib, percentile=float(o.percentile), qmin=qmin, qmax=qmax, symmetric=sym
                )
            out[(name, wide)] = cache[rkey]
    run.count("calibrated_tensors", len(needed))
    return out


def stream(
    model: ir.Model, names: list[str], data: Any, limit: int | None, progress: bool | None, description: str
) -> Iterator[dict[str, Any]]:
    """``stream_tensors`` with ONNX Runtime's errors on a batch (wrong shape or dtype) turned into a
    CalibrationError that says which batch and what to fix."""
    it = stream_tensors(model, names, data, limit=limit, progress=progress, description=description)
    i = 0
    while True:
        try:
            values = next(it)
        except StopIteration:
            return
        except CalibrationError:
            raise
        except Exception as e:  # onnxruntime's InvalidArgument / Fail on a batch
            # ORT's message runs over several lines ("... for the following indices / index: 0
            # Got: 4 Expected: 2"): keep it whole, on one line.
            msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
            raise CalibrationError(
                f"quantize-static: the model cannot run calibration batch {i} ({msg}); make the arrays' "
                "shapes and dtypes match the model's inputs"
            ) from None
        yield values
        i += 1

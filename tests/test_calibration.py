"""Calibration data readers, streaming statistics (merge = single pass) and calibrators."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.calibration import CalibrationData, CalibrationError, stream_tensors
from graphopt.errors import GraphoptError
from graphopt.passes.quantize.calibrators import (
    ChannelAbsMax,
    Histogram,
    MinMax,
    compute_range,
    entropy_range,
    mse_range,
    percentile_range,
)

# --- streaming statistics ---------------------------------------------------------------------


def _batches(seed: int = 0) -> list[np.ndarray]:
    """Batches whose range grows (and shrinks) so the histogram must re-bin several times."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(1000) * s + o for s, o in [(0.01, 0), (1, 0.5), (0.2, -3), (40, 0), (3, 1)]]


def test_histogram_merge_equals_single_pass() -> None:
    batches = _batches()
    single = Histogram()
    for b in batches:
        single.update(b)
    a, b = Histogram(), Histogram()
    for x in batches[:2]:
        a.update(x)
    for x in batches[2:]:
        b.update(x)
    merged = a.merge(b)
    assert merged.exponent == single.exponent
    np.testing.assert_array_equal(merged.counts, single.counts)
    assert (merged.minmax.min, merged.minmax.max) == (single.minmax.min, single.minmax.max)
    assert merged.total == sum(x.size for x in batches)


def test_histogram_is_order_independent_and_exact() -> None:
    batches = _batches(1)
    fwd, rev, once = Histogram(), Histogram(), Histogram()
    for x in batches:
        fwd.update(x)
    for x in reversed(batches):
        rev.update(x)
    once.update(np.concatenate(batches))
    np.testing.assert_array_equal(fwd.counts, rev.counts)
    np.testing.assert_array_equal(fwd.counts, once.counts)
    # every value lies in the bin whose edges bracket it
    edges = once.edges()
    idx = np.searchsorted(edges, np.concatenate(batches), side="right") - 1
    np.testing.assert_array_equal(np.bincount(idx, minlength=len(once.counts)), once.counts)


def test_histogram_memory_is_flat() -> None:
    h = Histogram()
    h.update(np.ones(10))
    size = h.nbytes()
    rng = np.random.default_rng(0)
    for i in range(200):
        h.update(rng.standard_normal(500) * (i + 1))
    assert h.nbytes() == size


def test_histogram_zeros_then_values() -> None:
    h = Histogram()
    h.update(np.zeros(100))
    assert h.exponent is None and h.total == 100
    h.update(np.array([0.5, -0.25]))
    assert h.total == 102 and h.minmax.min == -0.25 and h.minmax.max == 0.5
    h.update(np.array([np.nan, np.inf, 1.0]))  # non-finite values are ignored
    assert h.total == 103


def test_minmax_and_channel_absmax_merge() -> None:
    batches = _batches(2)
    one, a, b = MinMax(), MinMax(), MinMax()
    for x in batches:
        one.update(x)
    for x in batches[:3]:
        a.update(x)
    for x in batches[3:]:
        b.update(x)
    assert a.merge(b) == one
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((4, 3, 8)) for _ in range(4)]
    c_one, c_a, c_b = ChannelAbsMax(), ChannelAbsMax(), ChannelAbsMax()
    for x in xs:
        c_one.update(x)
    for x in xs[:1]:
        c_a.update(x)
    for x in xs[1:]:
        c_b.update(x)
    np.testing.assert_array_equal(c_a.merge(c_b).values, c_one.values)
    np.testing.assert_allclose(c_one.values, np.abs(np.concatenate(xs)).max(axis=(0, 1)))


# --- calibrators ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outlier_hist() -> Histogram:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(200_000), [60.0, -55.0]])
    h = Histogram()
    for chunk in np.array_split(x, 7):
        h.update(chunk)
    return h


def test_minmax_keeps_outliers(outlier_hist: Histogram) -> None:
    assert compute_range(outlier_hist, "minmax") == (-55.0, 60.0)


@pytest.mark.parametrize("calibrator", ["percentile", "entropy", "mse"])
def test_clipping_calibrators_drop_outliers(outlier_hist: Histogram, calibrator: str) -> None:
    rmin, rmax = compute_range(
        outlier_hist, calibrator, percentile=99.99, qmin=-128, qmax=127, symmetric=True
    )
    # MSE weighs the two outliers' clipping error against everyone's rounding error: it clips
    # them only part of the way; the others clip to the bulk of the distribution.
    bound = 45.0 if calibrator == "mse" else 20.0
    assert 2.0 < rmax < bound and -bound < rmin < -2.0, (rmin, rmax)


def test_percentile_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal(100_000)
    h = Histogram()
    h.update(x)
    rmin, rmax = percentile_range(h, 99.0)
    assert abs(rmax - np.percentile(x, 99.0)) < 0.01
    assert abs(rmin - np.percentile(x, 1.0)) < 0.01
    with pytest.raises(GraphoptError):
        percentile_range(h, 10.0)


def test_nonnegative_tensors_keep_zero_at_the_bottom() -> None:
    rng = np.random.default_rng(0)
    relu = np.maximum(rng.standard_normal(100_000), 0.0)
    h = Histogram()
    h.update(relu)
    for calibrator in ("minmax", "percentile", "entropy", "mse"):
        rmin, rmax = compute_range(h, calibrator)
        assert rmin == 0.0 and 2.5 < rmax <= relu.max(), (calibrator, rmin, rmax)
    # the zero spike must not pull the entropy threshold down (it would clip at ~2 sigma)
    assert entropy_range(h, levels=255)[1] > 3.0


def test_mse_prefers_less_error_than_minmax() -> None:
    rng = np.random.default_rng(1)
    x = rng.laplace(size=50_000)
    h = Histogram()
    h.update(x)

    def err(rng_: tuple[float, float]) -> float:
        lo, hi = rng_
        scale = (hi - lo) / 255
        zp = np.round(-lo / scale)
        q = np.clip(np.round(x / scale) + zp, 0, 255)
        return float(np.mean(((q - zp) * scale - x) ** 2))

    lo, hi = compute_range(h, "minmax")
    best_on_grid = min(err((a * lo, a * hi)) for a in np.linspace(0.02, 1.0, 50))
    assert err(mse_range(h)) <= best_on_grid * 1.05
    assert err(mse_range(h)) < err((lo, hi))


def test_unknown_calibrator() -> None:
    h = Histogram()
    h.update(np.ones(3))
    with pytest.raises(GraphoptError, match="calibrator"):
        compute_range(h, "kmeans")


# --- readers ----------------------------------------------------------------------------------


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def test_npz_rows_are_split_into_batches(tmp_path) -> None:
    p = tmp_path / "calib.npz"
    np.savez(p, x=_x(10))
    batches = list(CalibrationData.from_any(str(p), batch_size=4).batches())
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    whole = list(CalibrationData.from_any(str(p)).batches())
    assert len(whole) == 1 and whole[0]["x"].shape == (10, 4)


def test_npz_indexed_batches_and_limit(tmp_path) -> None:
    p = tmp_path / "calib.npz"
    np.savez(p, **{"x/0": _x(2, 0), "x/1": _x(3, 1), "x/2": _x(1, 2)})
    data = CalibrationData.from_any(str(p))
    assert [b["x"].shape[0] for b in data.batches()] == [2, 3, 1]
    assert len(list(data.batches(limit=2))) == 2


def test_folder_of_npy_and_of_npz(tmp_path) -> None:
    npy = tmp_path / "npy"
    npy.mkdir()
    for i in range(3):
        np.save(npy / f"x.{i}.npy", _x(2, i))
    batches = list(CalibrationData.from_any(str(npy)).batches())
    assert len(batches) == 3
    np.testing.assert_array_equal(batches[1]["x"], _x(2, 1))
    npz = tmp_path / "npz"
    npz.mkdir()
    for i in range(2):
        np.savez(npz / f"b{i}.npz", x=_x(2, i))
    assert len(list(CalibrationData.from_any(str(npz)).batches())) == 2


def test_iterables(tmp_path) -> None:
    items = [{"x": _x(2, i)} for i in range(3)]
    data = CalibrationData.from_any(items)
    assert len(list(data.batches())) == 3 and len(list(data.batches())) == 3  # re-iterable
    assert len(list(CalibrationData.from_any(lambda: iter(items)).batches())) == 3
    gen = CalibrationData.from_any(iter(items))
    assert len(list(gen.batches())) == 3
    with pytest.raises(CalibrationError, match="already consumed"):
        list(gen.batches())
    assert len(list(CalibrationData.from_any(iter(items)).materialize().batches())) == 3


@pytest.mark.parametrize("make", ["missing", "npy", "empty_dir", "bad_npz", "object"])
def test_bad_sources(tmp_path, make: str) -> None:
    if make == "missing":
        src = str(tmp_path / "nope.npz")
    elif make == "npy":
        src = str(tmp_path / "x.npy")
        np.save(src, _x(2))
    elif make == "empty_dir":
        src = str(tmp_path)
    elif make == "bad_npz":
        src = str(tmp_path / "bad.npz")
        (tmp_path / "bad.npz").write_bytes(b"not a zip")
    else:
        src = 42
    with pytest.raises(CalibrationError):
        data = CalibrationData.from_any(src)
        list(data.batches())


def test_non_dict_batch_is_an_error() -> None:
    with pytest.raises(CalibrationError, match="not a dict"):
        list(CalibrationData.from_any([np.zeros(3)]).batches())


# --- streaming through a model ----------------------------------------------------------------


def _relu_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])]
    return helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )


def test_stream_tensors_yields_intermediates_per_batch() -> None:
    items = [{"x": _x(2, i)} for i in range(4)]
    seen = list(stream_tensors(_relu_model(), ["h"], CalibrationData.from_any(items), limit=3))
    assert len(seen) == 3
    np.testing.assert_allclose(seen[0]["h"], np.maximum(items[0]["x"], 0))


def test_stream_tensors_names_missing_inputs_and_values() -> None:
    data = CalibrationData.from_any([{"z": _x(2)}])
    with pytest.raises(CalibrationError, match="lacks model input"):
        list(stream_tensors(_relu_model(), ["h"], data))
    with pytest.raises(CalibrationError, match="cannot observe"):
        list(stream_tensors(_relu_model(), ["nope"], CalibrationData.from_any([{"x": _x(2)}])))

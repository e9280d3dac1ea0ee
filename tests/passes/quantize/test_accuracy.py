"""Accuracy control: the fidelity measure and the search for the fewest layers to keep in float."""

from __future__ import annotations

import math

import numpy as np
import pytest

from graphopt.passes.quantize.accuracy import Fidelity, fidelity, greedy_keep_float


def test_fidelity_is_the_worst_row_over_outputs_and_batches() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(3, 5, 8)).astype(np.float32)
    got = ref.copy()
    got[2] = -got[2]  # one batch row flipped: its cosine is -1, the others 1
    f = fidelity([[ref, np.arange(3)]], [[got, np.arange(3)]])  # integer outputs are ignored
    assert f.min_cosine == pytest.approx(-1.0)
    same = fidelity([[ref]], [[ref.copy()]])
    assert same.min_cosine == pytest.approx(1.0) and same.sqnr_db == math.inf


def test_fidelity_of_a_non_finite_or_misshaped_candidate_is_zero() -> None:
    ref = np.ones((2, 4), np.float32)
    assert fidelity([[ref]], [[np.full((2, 4), np.nan, np.float32)]]).min_cosine == 0.0
    assert fidelity([[ref]], [[np.ones((4, 2), np.float32)]]).min_cosine == 0.0


def test_fidelity_counts_a_zeroed_row_as_maximally_different() -> None:
    ref = np.ones((2, 4), np.float32)
    got = ref.copy()
    got[1] = 0
    assert fidelity([[ref]], [[got]]).min_cosine == 0.0


def _evaluator(harm: dict[str, float]):
    """Cosine = 1 - sum of the harm of the layers still quantized."""
    calls = []

    def evaluate(kept: list[str]) -> Fidelity:
        calls.append(list(kept))
        return Fidelity(1.0 - sum(h for n, h in harm.items() if n not in kept), 30.0)

    return evaluate, calls


def test_greedy_keeps_the_fewest_most_sensitive_layers() -> None:
    harm = {f"l{i}": h for i, h in enumerate([0.004, 0.002, 0.001, 0.0005, 0.0001, 0.0001])}
    ranked = sorted(harm, key=lambda n: -harm[n])
    evaluate, calls = _evaluator(harm)
    kept, achieved, trials = greedy_keep_float(ranked, evaluate, 0.999)
    # Keeping l0, l1 leaves 0.0017 of harm (< 0.999), keeping l0..l2 leaves 0.0007: three layers.
    assert kept == ["l0", "l1", "l2"]
    assert achieved.min_cosine >= 0.999
    assert trials == len(calls) <= 4


def test_greedy_reports_the_best_when_the_target_is_out_of_reach() -> None:
    harm = {"a": 0.01, "b": 0.01}
    evaluate, _ = _evaluator(harm)
    kept, achieved, _ = greedy_keep_float(
        ["a", "b"], lambda k: Fidelity(evaluate(k).min_cosine - 0.5, 1.0), 0.99
    )
    assert kept == ["a", "b"] and achieved.min_cosine < 0.99


def test_greedy_respects_max_float() -> None:
    harm = {f"l{i}": 0.01 for i in range(8)}
    evaluate, _ = _evaluator(harm)
    kept, achieved, _ = greedy_keep_float(sorted(harm), evaluate, 0.999, max_float=3)
    assert len(kept) <= 3 and achieved.min_cosine < 0.999

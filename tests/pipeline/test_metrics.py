"""Metrics math, checked against numbers worked out by hand."""
import math

import pytest

from minichat.eval import metrics as M


def test_wilson_interval_by_hand():
    # p = 0.8, n = 10, z = 1.96: centre = (0.8 + 0.19208) / 1.38416 = 0.71674;
    # half = 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 0.22657
    lo, hi = M.wilson_interval(8, 10)
    assert lo == pytest.approx(0.71674 - 0.22657, abs=1e-4)
    assert hi == pytest.approx(0.71674 + 0.22657, abs=1e-4)
    assert M.wilson_interval(0, 10)[0] == 0.0
    assert all(math.isnan(x) for x in M.wilson_interval(0, 0))


def test_win_rate_counts_ties_half():
    out = M.win_rate([[1.0, 0.5], [0.0, 1.0], [0.5, 0.5]], n_boot=200)
    assert out["win_rate"] == pytest.approx((1 + 0.5 + 0 + 1 + 0.5 + 0.5) / 6)
    assert (out["wins"], out["ties"], out["losses"], out["judgements"], out["prompts"]) == (2, 3, 1, 6, 3)
    assert out["ci_low"] <= out["win_rate"] <= out["ci_high"]


def test_bootstrap_of_constant_groups_is_a_point():
    assert M.bootstrap_ci([[1.0], [1.0, 1.0]], n_boot=50) == (1.0, 1.0)


def test_likert_histogram_and_bad_scores():
    h = M.likert_histogram([1, 7, 7, 4])
    assert h["counts"] == {1: 1, 2: 0, 3: 0, 4: 1, 5: 0, 6: 0, 7: 2}
    assert h["mean"] == pytest.approx(19 / 4)
    with pytest.raises(ValueError):
        M.likert_histogram([8])


def test_rate_by_category_perplexity_and_bound():
    r = M.rate([True, False, True, True])
    assert r["rate"] == 0.75 and r["k"] == 3 and r["n"] == 4
    assert M.by_category([("a", 1.0), ("b", 0.0), ("a", 0.0)]) == {"a": 0.5, "b": 0.0}
    assert M.perplexity(4 * math.log(3), 4) == pytest.approx(3.0)
    assert M.best_of_n_kl_bound(1) == 0.0
    assert M.best_of_n_kl_bound(4) == pytest.approx(math.log(4) - 0.75)

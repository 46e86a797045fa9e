"""Paired comparison statistics against hand-computed values."""

import math

import numpy as np
import pytest

from appo.stats import mcnemar, minimal_detectable_effect, paired_bootstrap


def test_mcnemar_exact_p_values():
    # 0 : 5 discordant -> p = 2 * (1/2)^5 = 0.0625 (not significant with five questions)
    a, b = [True] * 5 + [False] * 5, [True] * 5 + [True] * 5
    r = mcnemar(a, b)
    assert (r["a_only"], r["b_only"]) == (0, 5)
    assert r["p_value"] == pytest.approx(0.0625)
    # 1 : 9 -> p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    a = [True] + [False] * 9 + [True] * 20
    b = [False] + [True] * 9 + [True] * 20
    assert mcnemar(a, b)["p_value"] == pytest.approx(22 / 1024)
    # symmetric in the direction, and no discordance is p = 1
    assert mcnemar(b, a)["p_value"] == pytest.approx(22 / 1024)
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0


def test_mcnemar_large_counts_stay_finite():
    a = [True] * 300 + [False] * 200
    b = [False] * 300 + [True] * 200
    p = mcnemar(a, b)["p_value"]
    assert 0.0 < p < 1e-5  # 300 : 200 of 500 is far from a fair coin


def test_paired_bootstrap_interval():
    # identical outcomes: difference exactly 0, degenerate interval at 0
    same = paired_bootstrap([1, 0, 1, 1], [1, 0, 1, 1])
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["inside_ci"]
    # A right on 60 more of 200 questions: diff 0.3, interval around it excluding 0
    a = [1] * 60 + [0] * 40 + [1] * 100
    b = [0] * 60 + [0] * 40 + [1] * 100
    r = paired_bootstrap(a, b, seed=1)
    assert r["diff"] == pytest.approx(0.3)
    lo, hi = r["ci95"]
    assert 0.0 < lo < 0.3 < hi
    # normal approximation of the half-width: 1.96 * sqrt(0.3 * 0.7 / 200) = 0.0635
    assert (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(0.21 / 200), rel=0.1)
    assert not r["inside_ci"]
    assert paired_bootstrap(a, b, seed=1) == r  # seeded: reproducible


def test_minimal_detectable_effect():
    assert minimal_detectable_effect(100, 0.25) == pytest.approx((1.959964 + 0.841621) * 0.05)
    # four times the questions halve it
    assert minimal_detectable_effect(400, 0.25) == pytest.approx(
        minimal_detectable_effect(100, 0.25) / 2)
    with pytest.raises(ValueError):
        paired_bootstrap([1], [1, 0])


def test_paired_bootstrap_over_seeds_and_questions():
    # every seed and question: a - b = 1 on seed 0, 0 on seed 1 -> diff 0.5; resampling the
    # two seeds gives 0, 0.5 or 1 (probabilities 1/4, 1/2, 1/4), questions change nothing
    a = np.array([[1] * 50, [1] * 50])
    b = np.array([[0] * 50, [1] * 50])
    r = paired_bootstrap(a, b, samples=4000, seed=0)
    assert r["diff"] == 0.5 and r["ci95"] == [0.0, 1.0] and r["inside_ci"]
    assert r["se"] == pytest.approx(math.sqrt(0.125), rel=0.05)  # sd of {0, .5, 1} at 1/4,1/2,1/4
    assert r["mde"] == pytest.approx((1.959964 + 0.841621) * r["se"])
    # identical seeds: the seed resampling is a no-op, the 1-D interval comes back
    one = np.array([1] * 60 + [0] * 40 + [1] * 100), np.array([0] * 60 + [0] * 40 + [1] * 100)
    two = paired_bootstrap(np.stack([one[0]] * 3), np.stack([one[1]] * 3), seed=1)
    single = paired_bootstrap(*one, seed=1)
    assert two["diff"] == single["diff"] == pytest.approx(0.3)
    assert two["se"] == pytest.approx(single["se"], rel=0.05)
    with pytest.raises(ValueError, match="equal shapes"):
        paired_bootstrap(np.zeros((2, 3)), np.zeros((3, 3)))

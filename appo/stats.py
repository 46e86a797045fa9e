"""The statistics of every table: intervals, paired differences, bootstrap.

Intervals of one variant:

- :func:`wilson_interval`: the 95% Wilson score interval of an accuracy k / n (eval, report);
- :func:`mean_ci95`: Wilson for 0/1 values, else mean +- 1.96 standard errors;
- :func:`mean_ci`: mean and the half-width of the two-sided 95% Student-t interval over a few
  training seeds (experiments).

Paired comparisons of two evaluated checkpoints on the same questions. Two variants answered the same ``n`` questions; ``a[k]``, ``b[k]`` are 0/1 correctness. The
questions are the unit of resampling, so the tests below are *paired*: what matters is how
often the two disagree, not the two accuracies separately.

- :func:`mcnemar`: exact two-sided McNemar test on the discordant pairs (b = only A right,
  c = only B right): under "no difference" each discordant question is a fair coin flip.
- :func:`paired_bootstrap`: the accuracy difference mean(a - b) with a percentile 95% interval
  from resampling questions (and training seeds, given several) with replacement (seeded, so
  a report is reproducible).
- :func:`minimal_detectable_effect`: the smallest true accuracy difference this design detects
  with 80% power at two-sided alpha = 0.05, given the observed discordance rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

Z975 = 1.959963984540054  # two-sided 95%
Z95 = Z975  # the name the interval helpers use
Z80 = 0.8416212335729143  # one-sided 80% power
# two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (normal beyond)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


# --------------------------------------------------------------------------------------------
# intervals of one variant


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n:

    centre = (p + z^2/2n) / (1 + z^2/n), half = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    ``n == 0`` gives (nan, nan).
    """
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_ci95(values: Iterable[float | bool]) -> tuple[float, float, float]:
    """(mean, lo, hi): Wilson interval when every value is 0/1, else mean +- 1.96 standard errors.

    The standard error uses the sample standard deviation (ddof=1; 0 for a single value).
    An empty input gives (nan, nan, nan).
    """
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(vals) / n
    if all(v in (0.0, 1.0) for v in vals):
        lo, hi = wilson_interval(int(sum(vals)), n)
        return mean, lo, hi
    var = sum((v - mean) ** 2 for v in vals) / (n - 1) if n > 1 else 0.0
    half = Z95 * math.sqrt(var / n)
    return mean, mean - half, mean + half


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the two-sided 95% Student-t interval); nan width for one value."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    return mean, t * sd / math.sqrt(n)


# --------------------------------------------------------------------------------------------
# paired differences


def _binom_tail_two_sided(k: int, n: int) -> float:
    """P(X <= min(k, n - k)) * 2 for X ~ Binomial(n, 1/2), capped at 1 (exact, log-space)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                 - n * math.log(2) for i in range(k + 1)]
    top = max(log_terms)
    tail = math.exp(top) * sum(math.exp(t - top) for t in log_terms)
    return min(1.0, 2.0 * tail)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float]:
    """Exact McNemar test of A vs B on paired 0/1 outcomes.

    Returns ``{"a_only": b, "b_only": c, "p_value": p}`` with p the exact two-sided binomial
    probability of a split at least as uneven as ``b : c`` among the ``b + c`` discordant pairs.
    """
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    return {"a_only": a_only, "b_only": b_only,
            "p_value": _binom_tail_two_sided(min(a_only, b_only), a_only + b_only)}


def paired_bootstrap(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
                     samples: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """mean(a - b) with a percentile 95% interval over resamples.

    ``a`` and ``b`` are 0/1 outcomes on the same questions: 1-D ``[questions]`` (one run each)
    or 2-D ``[seeds, questions]`` (training seeds that answered one shared test set). The
    2-D case resamples seeds *and* questions (the same questions for every seed), so the
    interval covers both the training noise between seeds and the sampling of the test set.

    Returns ``{"n", "diff", "ci95": [lo, hi], "se", "mde", "inside_ci"}``: ``se`` is the
    bootstrap standard error, ``mde`` = (z_0.975 + z_0.8) * se the smallest true difference
    this design detects with 80% power at alpha 0.05, ``inside_ci`` True when the interval
    contains 0 (the difference is within noise).
    """
    if np.shape(a) != np.shape(b):
        raise ValueError(f"paired outcomes need equal shapes, got {np.shape(a)} and {np.shape(b)}")
    d = np.atleast_2d(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    if d.ndim != 2 or d.size == 0:
        raise ValueError("paired_bootstrap needs [questions] or [seeds, questions] outcomes")
    n_seeds, n = d.shape
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, samples, 1000):  # 1000 resamples at a time (bounded memory)
        k = min(1000, samples - start)
        seed_w = rng.multinomial(n_seeds, [1 / n_seeds] * n_seeds, size=k)
        # the same questions for every seed: drawn indices (numpy's multinomial over 1,024
        # questions costs 0.5 s per call, and a report makes dozens of calls)
        questions = rng.integers(0, n, size=(k, n))
        per_question = seed_w @ d  # [k, n]: the resampled seeds' summed difference per question
        means.append(np.take_along_axis(per_question, questions, axis=1).sum(axis=1)
                     / (n_seeds * n))
    boot = np.concatenate(means)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    se = float(boot.std(ddof=1)) if samples > 1 else 0.0
    return {"n": n, "diff": float(d.mean()), "ci95": [float(lo), float(hi)], "se": se,
            "mde": (Z975 + Z80) * se, "inside_ci": bool(lo <= 0.0 <= hi)}


def minimal_detectable_effect(n: int, discordant_rate: float) -> float:
    """Smallest accuracy difference detectable with 80% power (two-sided alpha 0.05).

    For paired 0/1 outcomes the difference d = mean(a - b) has variance about
    ``(q - d^2) / n`` with q the discordance rate; at d near 0 that is ``q / n``, so
    MDE = (z_0.975 + z_0.8) * sqrt(q / n). With several seeds pass ``n`` = questions x seeds
    only if seeds are independent replicates (they are not when they share questions and the
    start checkpoint: then use the per-seed spread instead).
    """
    if n <= 0:
        raise ValueError("n must be positive")
    return (Z975 + Z80) * math.sqrt(max(discordant_rate, 0.0) / n)

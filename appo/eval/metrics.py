"""Pure scoring and aggregation of evaluation predictions (no model, no I/O).

Scoring reuses :mod:`appo.rl.rewards` (answer extraction, the per-problem-type accuracy rules,
the ``>= 0.5`` correctness threshold, temporal IoU), so a number reported here means exactly
what the RL reward meant during training.

A *row* is one scored question: a dict with at least ``benchmark``, ``family``,
``problem_type``, ``correct`` (bool), ``reward`` (float), ``iou`` (float or None), ``missing``
(bool) and optionally ``perception_hit`` (bool or None); see :mod:`appo.eval.runner`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from appo.eval.protocol import videor1_answer, videor1_score
from appo.rl.rewards import (
    accuracy_reward,
    extract_answer,
    extract_time_spans,
    iou_reward,
    is_correct,
    normalize_choice,
)
from appo.stats import Z95, mean_ci95, wilson_interval
from appo.tables import markdown, num, pct

__all__ = [
    "Z95",
    "aggregate",
    "group_stats",
    "markdown_table",
    "mean_ci95",
    "score_prediction",
    "wilson_interval",
]

UNKNOWN = "unknown"  # group key for rows without a family


def score_prediction(qa: Any, response: str | None, scoring: str = "pipeline") -> dict[str, Any]:
    """Score one response against its question with the RL reward rules (``scoring``
    ``"pipeline"``) or Video-R1's evaluation rules (``"videor1"``, :func:`videor1_score`).

    Returns ``answer`` (extracted answer text or None), ``choice`` (the option letter it maps
    to, multiple choice only), ``correct`` (:func:`is_correct`), ``reward``
    (:func:`accuracy_reward`: 0/1, MRA for regression, ROUGE-L for free-form, 1-WER for OCR),
    and, when the record has gold ``time_spans``, ``pred_spans`` and ``iou``
    (:func:`iou_reward`); otherwise ``iou`` is None. ``response=None`` (no prediction, e.g. a
    missing video) scores like an empty response.
    """
    text = response if isinstance(response, str) else ""
    if scoring == "videor1":
        answer: str | None = videor1_answer(text) or None
        reward = float(videor1_score(text, qa))
        correct = reward >= 0.5
    elif scoring == "pipeline":
        answer, reward, correct = extract_answer(text), accuracy_reward(text, qa), is_correct(text, qa)
    else:
        raise ValueError(f"scoring must be 'pipeline' or 'videor1', got {scoring!r}")
    out: dict[str, Any] = {
        "answer": answer,
        "correct": bool(correct),
        "reward": float(reward),
        "iou": None,
    }
    if qa.problem_type == "multiple choice":
        out["choice"] = normalize_choice(answer, tuple(qa.options)) if answer else None
    if getattr(qa, "time_spans", None):
        out["pred_spans"] = [list(s) for s in extract_time_spans(text)]
        out["iou"] = float(iou_reward(text, qa))
    return out


# --------------------------------------------------------------------------------------------
# aggregation


def _num(x: float) -> float | None:
    """JSON-safe float: NaN/inf become None."""
    return float(x) if x is not None and math.isfinite(x) else None


def group_stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Statistics of one group of rows.

    ``n``, ``correct`` (count), ``accuracy`` and ``ci95`` [lo, hi] (Wilson), ``reward`` (mean
    accuracy reward, e.g. MRA for regression), ``missing`` (rows whose media were missing,
    scored wrong), and only where some row has a value: ``mIoU`` with ``n_iou``,
    ``sampled_accuracy`` (mean over rows of the fraction of correct temperature-1 samples) and
    ``perception_hit_rate`` with ``n_perception`` (fraction over rows with a value).
    """
    n = len(rows)
    correct = [bool(r.get("correct")) for r in rows]
    acc, lo, hi = mean_ci95(correct)
    rewards = [float(r.get("reward") or 0.0) for r in rows]
    stats: dict[str, Any] = {
        "n": n,
        "correct": sum(correct),
        "accuracy": _num(acc),
        "ci95": [_num(lo), _num(hi)],
        "reward": _num(sum(rewards) / n) if n else None,
        "missing": sum(1 for r in rows if r.get("missing")),
    }
    ious = [float(r["iou"]) for r in rows if r.get("iou") is not None]
    if ious:
        stats["mIoU"] = sum(ious) / len(ious)
        stats["n_iou"] = len(ious)
    sampled = [float(r["sampled_accuracy"]) for r in rows if r.get("sampled_accuracy") is not None]
    if sampled:
        stats["sampled_accuracy"] = sum(sampled) / len(sampled)
    hits = [bool(r["perception_hit"]) for r in rows if r.get("perception_hit") is not None]
    if hits:
        stats["perception_hit_rate"] = sum(hits) / len(hits)
        stats["n_perception"] = len(hits)
    return stats


def _group(rows: Sequence[dict[str, Any]], key: str) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        name = row.get(key)
        groups.setdefault(str(name) if name is not None else UNKNOWN, []).append(row)
    return {k: groups[k] for k in sorted(groups)}


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Overall and grouped statistics (:func:`group_stats`) of scored rows.

    Returns ``{"overall": stats, "benchmarks": {name: stats + {"by_family", "by_problem_type"}},
    "by_family": {family: stats}, "by_problem_type": {type: stats}}``; rows without a family
    are grouped under ``"unknown"``. Group keys are sorted.
    """
    benchmarks = {}
    for name, group in _group(rows, "benchmark").items():
        stats = group_stats(group)
        stats["by_family"] = {k: group_stats(v) for k, v in _group(group, "family").items()}
        stats["by_problem_type"] = {
            k: group_stats(v) for k, v in _group(group, "problem_type").items()
        }
        benchmarks[name] = stats
    return {
        "overall": group_stats(rows),
        "benchmarks": benchmarks,
        "by_family": {k: group_stats(v) for k, v in _group(rows, "family").items()},
        "by_problem_type": {k: group_stats(v) for k, v in _group(rows, "problem_type").items()},
    }


# --------------------------------------------------------------------------------------------
# markdown


def _ci(ci: Sequence[float | None]) -> str:
    lo, hi = ci
    return "-" if lo is None or hi is None else f"[{pct(lo)}, {pct(hi)}]"


def _table(title: str, label: str, groups: dict[str, dict[str, Any]]) -> list[str]:
    has_iou = any("mIoU" in s for s in groups.values())
    has_hit = any("perception_hit_rate" in s for s in groups.values())
    head = [label, "n", "accuracy %", "95% CI", "reward"]
    head += ["mIoU %"] if has_iou else []
    head += ["perception hit %"] if has_hit else []
    head += ["missing"]
    rows = []
    for name, s in groups.items():
        cells = [name.replace("|", "\\|"), str(s["n"]), pct(s["accuracy"]), _ci(s["ci95"]),
                 num(s["reward"])]
        if has_iou:
            cells.append(pct(s.get("mIoU")))
        if has_hit:
            cells.append(pct(s.get("perception_hit_rate")))
        cells.append(str(s["missing"]))
        rows.append(cells)
    return [f"### {title}", "", *markdown(head, rows)]


def markdown_table(metrics: dict[str, Any]) -> str:
    """Markdown report of :func:`aggregate` output (extra keys such as ``name`` are used if set).

    Three tables: benchmarks (plus an ``overall`` row), task families, problem types.
    Accuracy, CI, mIoU and hit rate are percentages; reward is the mean accuracy reward.
    """
    title = "Evaluation"
    if metrics.get("name"):
        title += f": {metrics['name']}"
    lines = [f"## {title}", ""]
    if metrics.get("checkpoint"):
        lines += [f"Checkpoint: `{metrics['checkpoint']}`", ""]
    benchmarks = dict(metrics.get("benchmarks") or {})
    benchmarks["**overall**"] = metrics["overall"]
    lines += _table("Benchmarks", "benchmark", benchmarks)
    if metrics.get("by_family"):
        lines += _table("Task families", "family", metrics["by_family"])
    if metrics.get("by_problem_type"):
        lines += _table("Problem types", "problem type", metrics["by_problem_type"])
    missing = metrics.get("missing") or []
    if missing:
        lines += [f"{len(missing)} question(s) had missing media "
                  f"({metrics.get('missing_policy', 'wrong')}); see metrics.json.", ""]
    return "\n".join(lines)

"""Evaluation: run a checkpoint over benchmarks (:mod:`.runner`) and score/aggregate (:mod:`.metrics`).

The runner (torch, transformers) is imported lazily so the pure metrics import stays light.
"""

from __future__ import annotations

from typing import Any

from appo.eval.metrics import aggregate, group_stats, markdown_table, score_prediction
from appo.stats import mean_ci95, wilson_interval

__all__ = [
    "MISSING_POLICIES",
    "HitRateFn",
    "aggregate",
    "evaluate",
    "group_stats",
    "markdown_table",
    "mean_ci95",
    "missing_reason",
    "score_prediction",
    "wilson_interval",
]

_RUNNER = ("MISSING_POLICIES", "HitRateFn", "evaluate", "missing_reason")


def __getattr__(name: str) -> Any:
    if name in _RUNNER:
        from appo.eval import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'appo.eval' has no attribute {name!r}")

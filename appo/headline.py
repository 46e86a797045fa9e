"""Headline metrics: the few numbers per stage that DVC shows (``dvc metrics show``, ``dvc exp show``).

A stage's full results (per benchmark, per family, settings, missing media) stay in its detail
file ``outputs/<stage>/.../metrics.json``. DVC's ``metrics:`` are these small flat files under
``metrics/`` instead, for two reasons:

* width: DVC prints one column per metric key, so the detail files (hundreds of keys) made
  ``dvc metrics show`` and ``dvc exp show`` unreadable; every headline file of a kind has the
  same fixed keys, independent of the data (no per-family or per-benchmark columns), so
  ``dvc metrics show`` stays one narrow table with one row per stage;
* experiments: ``dvc exp run`` commits only git-tracked files, and ``outputs/`` is
  gitignored. ``metrics/`` is tracked (``cache: false`` in dvc.yaml), so each experiment's
  commit carries its headline numbers and ``dvc exp show`` compares them.

``python -m appo.headline`` rewrites every headline file from the detail files already in
``outputs/`` (after an upgrade, so ``dvc commit`` can record them without retraining).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

ROOT = Path("metrics")  # git-tracked, unlike outputs/
DIGITS = 4  # DVC prints 5 significant digits; more only churns the git diff


def _clean(values: dict[str, Any]) -> dict[str, float]:
    """Drop missing / non-finite values and round, so the file is small and diffs are stable."""
    return {k: round(float(v), DIGITS) for k, v in values.items()
            if v is not None and math.isfinite(float(v))}


def eval_headline(metrics: dict[str, Any]) -> dict[str, float]:
    """Overall accuracy with its 95% CI and the perception hit rate, from eval's metrics.json."""
    overall = metrics.get("overall", {})
    lo, hi = overall.get("ci95") or (None, None)
    return _clean({"accuracy": overall.get("accuracy"), "ci_lo": lo, "ci_hi": hi,
                   "hit_rate": overall.get("perception_hit_rate")})


def rl_headline(summary: dict[str, Any]) -> dict[str, float]:
    """Reward and training accuracy of the last steps, and the training time, of an RL run."""
    return _clean({"reward": summary.get("final_reward"),
                   "train_acc": summary.get("final_accuracy"),
                   "time_s": summary.get("train_time_s")})


def sft_headline(metrics: dict[str, Any]) -> dict[str, float]:
    """Final loss and training time of the SFT warm start."""
    return _clean({"loss": metrics.get("final_loss"), "time_s": metrics.get("train_time_s")})


HEADLINES = {"eval": eval_headline, "rl": rl_headline, "sft": sft_headline}


def write_headline(path: str | Path | None, kind: str, detail: dict[str, Any]) -> None:
    """Write the ``kind`` headline of ``detail`` to ``path`` (nothing when ``path`` is None:
    a stage run outside DVC need not touch the tracked ``metrics/`` folder)."""
    if path is None:
        return
    from appo.io import atomic_write_text

    text = json.dumps(HEADLINES[kind](detail), indent=1, sort_keys=True) + "\n"
    atomic_write_text(path, text)


def rebuild(outputs: str | Path = "outputs", root: str | Path = ROOT) -> list[Path]:
    """Every headline file from the detail files under ``outputs`` (the dvc.yaml layout:
    ``eval/<name>``, ``rl/<algo>``, ``sft``); returns the files written."""
    outputs, root = Path(outputs), Path(root)
    jobs = [("eval", p, root / "eval" / f"{p.parent.name}.json")
            for p in sorted(outputs.glob("eval/*/metrics.json"))]
    jobs += [("rl", p, root / "rl" / f"{p.parent.name}.json")
             for p in sorted(outputs.glob("rl/*/metrics.json"))]
    if (outputs / "sft" / "metrics.json").is_file():
        jobs.append(("sft", outputs / "sft" / "metrics.json", root / "sft.json"))
    for kind, detail, target in jobs:
        write_headline(target, kind, json.loads(detail.read_text()))
    return [target for _, _, target in jobs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outputs", default="outputs", help="root of the stage outputs")
    parser.add_argument("--root", default=str(ROOT), help="headline folder (git-tracked)")
    args = parser.parse_args(argv)
    for path in rebuild(args.outputs, args.root):
        print(path)


if __name__ == "__main__":
    main()

"""The one training loop of SFT and RL: resume -> step -> checkpoint -> export -> metrics.

A :class:`Task` (:class:`appo.train.sft.SFTTask`, :class:`appo.rl.trainer.RLTrainer` behind
the RL stage) knows how to take one optimizer step and what state it needs to continue; this
module owns everything around it, the same way for both:

1. :func:`find_checkpoint` (before anything is built): remove the temporary files a killed
   run left, take the newest checkpoint whose files all read, and refuse one written by a
   different configuration (its ``fingerprint``);
2. :func:`run`: load that checkpoint into the model, optimizer, scheduler, RNG and task, drop
   the metric rows logged after it, then step to ``total_steps``, logging each step's metrics
   (``metrics.jsonl`` and MLflow) and writing a checkpoint every ``save_every`` steps (the
   newest ``keep`` are kept); then the task exports its model, and its summary becomes
   ``metrics.json`` (also logged to MLflow).

A resumed run ends with the weights of an uninterrupted one: the checkpoint holds the
trainable weights, optimizer, scheduler, every RNG state and the task's own state.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from appo.io import atomic_write_json, remove_stale_temps
from appo.tracking import open_run, truncate_metrics
from appo.train import common


class Task(Protocol):
    """One training run's steps and state, as the loop drives them."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state a resume needs besides weights, optimizer and RNG."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def train_step(self) -> dict[str, float]:
        """One optimizer step; its metrics."""

    def export(self, path: Path) -> Any:
        """Write the final model to ``path`` (called on every process of a launch)."""

    def summary(self, elapsed: float) -> dict[str, Any]:
        """``metrics.json``; ``elapsed``: wall-clock seconds of the run, resumes included."""


@dataclass
class Loop:
    """How a run is driven (the same fields for SFT and RL)."""

    out_dir: Path  # <out_dir>/checkpoints, /model, /metrics.json, /metrics.jsonl
    run_name: str  # MLflow run name; also the progress bar's label
    total_steps: int
    save_every: int  # steps between checkpoints (0: never)
    keep: int  # newest checkpoints kept
    fingerprint: str  # of everything that must not change between a crash and its resume
    mismatch: str  # what to do about a checkpoint of another configuration (error message)
    resume: bool = True  # False: start over, removing any checkpoint
    main: bool = True  # the main process of a launch (the only one that writes)
    save_last: bool = False  # also checkpoint the final step
    step_base: int = 0  # the step number metrics.jsonl gives a run's first step
    tags: dict[str, str] = field(default_factory=dict)
    label: str | None = None  # progress bar label (default: run_name)

    @property
    def checkpoints(self) -> Path:
        return Path(self.out_dir) / "checkpoints"


def resume_knobs(cfg: Any, resume_safe: set[str]) -> dict[str, Any]:
    """The fields of config dataclass ``cfg`` that a checkpoint's fingerprint covers: all but
    ``resume_safe``, the knobs that may change between a crash and its resume (steps, how
    often to save, ...) without changing the result."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in resume_safe}


def find_checkpoint(loop: Loop) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from (with its files read), or None for a fresh start.

    Raises when the newest readable checkpoint was written by a different configuration. A
    fresh start removes the checkpoints folder (unreadable leftovers, or ``resume: false``).
    """
    root = loop.checkpoints
    if loop.main:
        remove_stale_temps(root)
        remove_stale_temps(loop.out_dir)
    found = common.latest_readable_checkpoint(root) if loop.resume else None
    if found is not None:
        if found[1]["state"].get("fingerprint") != loop.fingerprint:
            raise RuntimeError(f"{found[0]}: {loop.mismatch}")
    elif loop.main:
        shutil.rmtree(root, ignore_errors=True)
    return found


def run(task: Task, loop: Loop, found: tuple[Path, dict[str, Any]] | None, *, model, optimizer,
        scheduler, params: dict[str, Any], final: Callable[[dict[str, Any]], dict[str, float]],
        postfix: Callable[[dict[str, float]], dict[str, str]], progress: bool = True
        ) -> dict[str, Any]:
    """Resume from ``found`` (:func:`find_checkpoint`), train to ``loop.total_steps``, export,
    write ``metrics.json``; returns the task's summary (``{}`` on a non-main process).

    ``model``: the unwrapped module whose trainable weights the checkpoints hold; ``params``:
    logged once, at a fresh start; ``final(summary)``: the numbers logged at the last step;
    ``postfix(metrics)``: the progress bar's few numbers.
    """
    from tqdm import tqdm

    out, total = Path(loop.out_dir), loop.total_steps
    start, run_id, elapsed = 0, None, 0.0
    if found is not None:
        path, loaded = found
        state = common.load_training_state(path, model, optimizer, scheduler, loaded=loaded)
        task.load_state_dict(state)
        start, run_id, elapsed = state["step"], state.get("run_id"), state.get("elapsed", 0.0)
        print(f"{loop.label or loop.run_name}: resuming from {path} (step {start}/{total})")
    if loop.main:  # rows after the checkpoint are redone; a fresh start keeps none
        truncate_metrics(out / "metrics.jsonl", start - 1 + loop.step_base)
    t0 = time.perf_counter() - elapsed
    logger = open_run(out, loop.run_name, run_id=run_id, tags=loop.tags, main=loop.main)
    bar = tqdm(total=total, initial=start, desc=loop.label or loop.run_name, unit="step",
               disable=not (progress and loop.main))
    status = "FAILED"
    try:
        if run_id is None:
            logger.log_params(params)
        for done in range(start + 1, total + 1):
            metrics = task.train_step()
            logger.log_metrics(metrics, done - 1 + loop.step_base)
            bar.update(1)
            bar.set_postfix(postfix(metrics), refresh=False)  # redraw at tqdm's interval
            due = loop.save_every > 0 and (done % loop.save_every == 0
                                           or (loop.save_last and done == total))
            if loop.main and due and (done < total or loop.save_last):
                common.save_training_state(
                    loop.checkpoints / f"step-{done}", model, optimizer, scheduler,
                    {**task.state_dict(), "step": done, "run_id": logger.run_id,
                     "fingerprint": loop.fingerprint, "elapsed": time.perf_counter() - t0})
                common.prune_checkpoints(loop.checkpoints, loop.keep)
        bar.close()
        task.export(out / "model")
        if not loop.main:
            status = "FINISHED"
            return {}
        summary = task.summary(time.perf_counter() - t0)
        atomic_write_json(out / "metrics.json", summary)
        logger.log_metrics(final(summary), total)
        logger.log_artifact(out / "metrics.json")
        status = "FINISHED"
    finally:
        bar.close()
        logger.close(status)
    return summary

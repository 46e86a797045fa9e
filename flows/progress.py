"""Overall progress of a pipeline run: "stage N of M", elapsed time and an estimate of the rest.

The estimate weighs each remaining stage by its typical share of a default run on the 2-core
CPU (``TYPICAL_SECONDS``: SFT and RL dominate, evaluations and set-up stages are short) and
scales those weights by how fast this machine has been so far on the stages that actually ran.
Stages DVC found up to date (or restored from its run cache) take seconds and say nothing
about speed, so they count as done but not as a speed sample. With ``jobs`` stages at once the
fanned-out kinds (one RL run and one evaluation per variant) share the slots; the chain before
them (data, frames, SFT) and the report do not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# seconds per stage kind of the default `make run` on the 2-core CPU (README's timing)
TYPICAL_SECONDS = {"data": 40.0, "frames": 25.0, "init_model": 10.0, "sft": 200.0, "rl": 110.0,
                   "eval": 35.0, "eval_baseline": 35.0, "report": 15.0}
FALLBACK_SECONDS = 30.0  # a stage kind the table does not know (a user's own stage)
FANNED_OUT = ("rl", "eval", "eval_baseline")  # one stage per variant: independent of each other


def typical_seconds(stage: str) -> float:
    """Typical duration of ``stage`` ("rl@appo" -> the "rl" kind)."""
    return TYPICAL_SECONDS.get(stage.split("@", 1)[0], FALLBACK_SECONDS)


def fmt_duration(seconds: float) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``."""
    s = int(round(max(0.0, seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class RunClock:
    """Tracks a run over a fixed plan of stages; :meth:`line` is the progress line."""

    stages: list[str]
    jobs: int = 1  # stages at once
    start: float = field(default_factory=time.monotonic)
    done: list[str] = field(default_factory=list)
    measured: float = 0.0  # wall seconds of stages that ran
    measured_typical: float = 0.0  # their typical seconds

    def finished(self, stage: str, seconds: float, ran: bool) -> None:
        """Record a finished stage; ``ran`` is False when DVC skipped or restored it."""
        self.done.append(stage)
        if ran:
            self.measured += seconds
            self.measured_typical += typical_seconds(stage)

    def remaining_seconds(self) -> float | None:
        """Estimated seconds left, or None before any stage has run (no speed sample yet)."""
        if self.measured_typical <= 0:
            return None
        speed = self.measured / self.measured_typical
        left = [s for s in self.stages if s not in self.done]
        fanned = sum(typical_seconds(s) for s in left if s.split("@", 1)[0] in FANNED_OUT)
        chain = sum(typical_seconds(s) for s in left) - fanned
        return speed * (chain + fanned / max(1, self.jobs))

    def line(self, stage: str, now: float | None = None) -> str:
        """``stage 4/18 sft | elapsed 2:31 | about 9:40 left`` for the stage about to start."""
        now = time.monotonic() if now is None else now
        index = self.stages.index(stage) + 1 if stage in self.stages else len(self.done) + 1
        left = self.remaining_seconds()
        estimate = "estimate after the first stage that runs" if left is None \
            else f"about {fmt_duration(left)} left"
        return (f"stage {index}/{len(self.stages)} {stage} | "
                f"elapsed {fmt_duration(now - self.start)} | {estimate}")

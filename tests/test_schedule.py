"""The flow's stage scheduler: at most ``jobs`` at once, never before its upstream, and after a
failure nothing new starts while the running stages finish."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import pytest

from flows.pipeline import schedule

# the default DAG's shape: a chain, then a fan-out of RL runs, their evaluations, the report
DAG = {
    "data": set(), "sft": {"data"},
    "rl@a": {"data", "sft"}, "rl@b": {"data", "sft"},
    "eval_baseline@sft": {"data", "sft"}, "eval@a": {"rl@a"}, "eval@b": {"rl@b"},
    "report": {"eval_baseline@sft", "eval@a", "eval@b"},
}


class Recorder:
    """Runs stages on a thread pool, recording start/end order and the peak concurrency."""

    def __init__(self, fail: str | None = None, seconds: float = 0.05) -> None:
        self.pool = ThreadPoolExecutor(max_workers=8)
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.started: list[str] = []
        self.ended: list[str] = []
        self.events: list[tuple[str, str]] = []
        self.fail, self.seconds = fail, seconds

    def work(self, stage: str) -> str:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.started.append(stage)
            self.events.append(("start", stage))
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
            self.ended.append(stage)
            self.events.append(("end", stage))
        if stage == self.fail:
            raise RuntimeError(f"{stage} broke")
        return f"ran {stage}"

    def submit(self, stage: str):
        return self.pool.submit(self.work, stage)


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_at_most_jobs_at_once_and_upstream_first(jobs: int) -> None:
    rec = Recorder()
    results = schedule(DAG, jobs, rec.submit, as_completed)
    assert results == {stage: f"ran {stage}" for stage in DAG}
    assert rec.peak == min(jobs, 3)  # the widest layer: rl@a, rl@b, eval_baseline@sft
    for stage, ups in DAG.items():
        for up in ups:  # every upstream ended before the stage started
            assert rec.events.index(("end", up)) < rec.events.index(("start", stage))
    assert rec.started[:2] == ["data", "sft"] and rec.started[-1] == "report"


def test_one_job_keeps_the_plan_order() -> None:
    rec = Recorder(seconds=0.0)
    schedule(DAG, 1, rec.submit, as_completed)
    assert rec.started == list(DAG) == rec.ended


def test_a_ready_stage_with_more_stages_downstream_starts_first() -> None:
    # plan order lists the short evaluations first; the RL runs gate more of the DAG
    dag = {"sft": set(), "eval_baseline@sft": {"sft"}, "eval@x": {"sft"},
           "rl@a": {"sft"}, "rl@b": {"sft"}, "eval@a": {"rl@a"}, "eval@b": {"rl@b"},
           "report": {"eval_baseline@sft", "eval@x", "eval@a", "eval@b"}}
    rec = Recorder(seconds=0.0)
    schedule(dag, 1, rec.submit, as_completed)
    assert rec.started == ["sft", "rl@a", "rl@b", "eval_baseline@sft", "eval@x", "eval@a",
                           "eval@b", "report"]


def test_the_hooks_see_every_start_and_every_success() -> None:
    rec = Recorder(seconds=0.0)
    starts, dones = [], {}
    schedule(DAG, 2, rec.submit, as_completed, on_start=starts.append,
             on_done=dones.__setitem__)
    assert sorted(starts) == sorted(DAG)
    assert dones == {stage: f"ran {stage}" for stage in DAG}


def test_a_failure_stops_new_stages_lets_running_ones_finish_then_raises() -> None:
    rec = Recorder(fail="rl@a", seconds=0.1)
    with pytest.raises(RuntimeError, match="rl@a broke"):
        schedule(DAG, 2, rec.submit, as_completed)
    assert "rl@b" in rec.ended  # started beside rl@a, allowed to finish
    assert "eval@a" not in rec.started and "report" not in rec.started
    assert rec.running == 0  # nothing left behind when the error is raised


def test_a_stage_waiting_on_a_stage_outside_the_plan_is_an_error() -> None:
    rec = Recorder(seconds=0.0)
    with pytest.raises(RuntimeError, match="outside the plan"):
        schedule({"a": set(), "b": {"missing"}}, 2, rec.submit, as_completed)


@pytest.mark.parametrize(("params", "cores", "expected"), [
    ("threads: 1\nmodel: {device: cpu}\n", 2, 2),   # the 2-core default: two stages at once
    ("threads: 2\nmodel: {device: cpu}\n", 8, 4),
    ("threads: 4\nmodel: {device: cpu}\n", 2, 1),   # never zero
    ("threads: 0\nmodel: {device: cpu}\n", 16, 1),  # 0 = all cores per stage: one at a time
    ("threads: 1\nmodel: {device: cuda}\n", 16, 1),  # stages would share one GPU's memory
])
def test_auto_jobs(tmp_path, monkeypatch, params: str, cores: int, expected: int) -> None:
    from flows import pipeline as flow_module

    (tmp_path / "params.yaml").write_text(params)
    monkeypatch.setattr(flow_module.os, "cpu_count", lambda: cores)
    assert flow_module.auto_jobs(tmp_path / "params.yaml") == expected


@pytest.mark.parametrize(("returncode", "output", "transient"), [
    (1, "ERROR: failed to reproduce 'rl@appo': failed to run: python -m appo.stages.rl, "
        "exited with 1\nerror: rl.lr must be >= 0", False),  # a real error: retrying won't help
    (255, "ERROR: '/p/data/dataset' is busy, it is being blocked by:\n  (PID 7): dvc repro",
     True),  # a hand-run dvc beside the flow holds DVC's per-path lock
    (255, "ERROR: Unable to acquire lock. Most likely another DVC process is running", True),
    (1, "failed to run: python -m appo.stages.rl, exited with -9", True),  # killed (OOM killer)
])
def test_which_stage_failures_are_retried(returncode: int, output: str, transient: bool) -> None:
    from flows.pipeline import StageFailed

    assert StageFailed("rl@appo", returncode, output).transient is transient

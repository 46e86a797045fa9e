"""The pipeline's overall progress line: stage N of M, elapsed time, an estimate of the rest."""

from __future__ import annotations

from flows.progress import RunClock, fmt_duration, typical_seconds


def test_fmt_duration() -> None:
    assert fmt_duration(0) == "0:00"
    assert fmt_duration(75) == "1:15"
    assert fmt_duration(3725) == "1:02:05"
    assert fmt_duration(-3) == "0:00"


def test_stage_kinds_share_a_typical_duration() -> None:
    assert typical_seconds("rl@appo") == typical_seconds("rl@grpo") == 110.0
    assert typical_seconds("eval_baseline@base") == 35.0
    assert typical_seconds("my_stage") == 30.0  # unknown: the fallback


def test_estimate_scales_typical_durations_by_the_measured_speed() -> None:
    clock = RunClock(["data", "sft", "rl@appo", "eval@appo"], start=100.0)
    assert clock.line("data", now=100.0) == \
        "stage 1/4 data | elapsed 0:00 | estimate after the first stage that runs"
    clock.finished("data", 80.0, ran=True)  # typical 40 s, took 80 s: this machine is 2x slower
    # left: sft 200 + rl 110 + eval 35 = 345 typical seconds -> 690 s at 2x
    assert clock.remaining_seconds() == 690.0
    assert clock.line("sft", now=180.0) == "stage 2/4 sft | elapsed 1:20 | about 11:30 left"


def test_up_to_date_stages_count_as_done_but_not_as_speed() -> None:
    clock = RunClock(["data", "sft", "rl@appo"], start=0.0)
    clock.finished("data", 0.5, ran=False)  # DVC: up to date, half a second
    assert clock.remaining_seconds() is None
    clock.finished("sft", 100.0, ran=True)  # typical 200 s: 2x faster
    assert clock.remaining_seconds() == 55.0  # rl only: 110 / 2


def test_fanned_out_stages_share_the_jobs() -> None:
    clock = RunClock(["data", "sft", "rl@a", "rl@b", "eval@a", "eval@b", "report"], jobs=2,
                     start=0.0)
    clock.finished("data", 40.0, ran=True)  # typical speed
    # chain: sft 200 + report 15; fanned out over 2 slots: (2 x 110 + 2 x 35) / 2 = 145
    assert clock.remaining_seconds() == 360.0

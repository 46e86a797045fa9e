"""The pipeline's overall progress line: stage N of M, elapsed time, an estimate of the rest."""

from __future__ import annotations

from flows.progress import RunClock, fmt_duration, typical_seconds


def test_fmt_duration() -> None:
    assert fmt_duration(0) == "0:00"
    assert fmt_duration(75) == "1:15"
    assert fmt_duration(3725) == "1:02:05"
    assert fmt_duration(-3) == "0:00"


def test_stage_kinds_share_a_typical_duration() -> None:
    assert typical_seconds("rl@appo") == typical_seconds("rl@grpo") == 95.0
    assert typical_seconds("eval@base") == 20.0
    assert typical_seconds("my_stage") == 30.0  # unknown: the fallback


def test_estimate_scales_typical_durations_by_the_measured_speed() -> None:
    clock = RunClock(["data", "sft", "rl@appo", "eval@appo"], start=100.0)
    assert clock.line("data", now=100.0) == \
        "stage 1/4 data | elapsed 0:00 | estimate after the first stage that runs"
    clock.finished("data", 100.0, ran=True)  # typical 50 s, took 100 s: this machine is 2x slower
    # left: sft 150 + rl 95 + eval 20 = 265 typical seconds -> 530 s at 2x
    assert clock.remaining_seconds() == 530.0
    assert clock.line("sft", now=200.0) == "stage 2/4 sft | elapsed 1:40 | about 8:50 left"


def test_up_to_date_stages_count_as_done_but_not_as_speed() -> None:
    clock = RunClock(["data", "sft", "rl@appo"], start=0.0)
    clock.finished("data", 0.5, ran=False)  # DVC: up to date, half a second
    assert clock.remaining_seconds() is None
    clock.finished("sft", 75.0, ran=True)  # typical 150 s: 2x faster
    assert clock.remaining_seconds() == 47.5  # rl only: 95 / 2

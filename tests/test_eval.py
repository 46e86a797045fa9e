"""Tests for appo.eval: scoring (reusing the RL rewards), CIs, aggregation, the runner on every
benchmark format end to end with the tiny model, missing media, determinism, and the stage."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from appo.config import ConfigError, EvalConfig, load_section
from appo.data.formats import PathRemap, load_annotations
from appo.data.frames import FrameStore, extract_all
from appo.data.schema import VideoQA
from appo.eval.metrics import (
    Z95,
    aggregate,
    group_stats,
    markdown_table,
    mean_ci95,
    score_prediction,
    wilson_interval,
)
from appo.eval.runner import evaluate
from appo.io import atomic_write_video
from appo.rl.rewards import accuracy_reward, is_correct
from tests.conftest import FRAMES

ROW_KEYS = {"problem_id", "benchmark", "family", "problem_type", "dataset_name", "video", "gold",
            "response", "answer", "correct", "reward", "iou", "truncated", "missing",
            "perception_hit"}
STAT_KEYS = {"n", "correct", "accuracy", "ci95", "reward", "missing"}


def qa(problem_type: str, answer: str, options: tuple[str, ...] = (), **kw: Any) -> VideoQA:
    return VideoQA(problem_id=kw.pop("problem_id", "q"), problem="?", problem_type=problem_type,
                   answer=answer, video="v.mp4", options=options, **kw)


MC = ("A. red", "B. blue", "C. green")

# ------------------------------------------------------------------------------------------
# scoring


@pytest.mark.parametrize(
    "problem_type, gold, options, response, answer, correct, reward",
    [
        ("multiple choice", "B", MC, "<think>it is blue</think><answer>B</answer>", "B", True, 1.0),
        ("multiple choice", "B", MC, "<answer>(b) blue</answer>", "(b) blue", True, 1.0),
        ("multiple choice", "B", MC, "<answer>blue</answer>", "blue", True, 1.0),
        ("multiple choice", "B", MC, "<answer>A</answer>", "A", False, 0.0),
        ("multiple choice", "B", MC, "no tags at all", None, False, 0.0),
        ("numerical", "3", (), "<answer>3</answer>", "3", True, 1.0),
        ("numerical", "3", (), "<answer>three</answer>", "three", True, 1.0),
        ("numerical", "3", (), "<answer>3.5</answer>", "3.5", False, 0.0),
        ("free-form", "a red ball", (), "<answer>the red ball</answer>", "the red ball", True, 1.0),
        ("free-form", "a red ball", (), "<answer>blue cube</answer>", "blue cube", False, 0.0),
        # regression = VSI-Bench MRA: |9-10|/10 = 0.1 beats 8 of the 10 thresholds
        ("regression", "10", (), "<answer>9</answer>", "9", True, 0.8),
        ("regression", "10", (), "<answer>7</answer>", "7", False, 0.4),
        ("regression", "10", (), "<answer>10</answer>", "10", True, 1.0),
    ],
)
def test_score_prediction_per_problem_type(problem_type, gold, options, response, answer,
                                           correct, reward):
    record = qa(problem_type, gold, options)
    got = score_prediction(record, response)
    assert got["answer"] == answer
    assert got["correct"] is correct
    assert got["reward"] == pytest.approx(reward)
    # the very same numbers as the RL reward functions
    assert got["reward"] == accuracy_reward(response, record)
    assert got["correct"] == is_correct(response, record)
    assert got["iou"] is None  # no gold time spans


def test_score_prediction_choice_iou_and_no_response():
    record = qa("multiple choice", "A", MC, time_spans=((2.0, 4.0),))
    got = score_prediction(record, "<answer>A</answer><time>3 to 5</time>")
    assert got["choice"] == "A" and got["correct"] is True
    assert got["pred_spans"] == [[3.0, 5.0]]
    assert got["iou"] == pytest.approx(1 / 3)
    none = score_prediction(record, None)
    assert none["answer"] is None and none["correct"] is False and none["reward"] == 0.0
    assert none["iou"] == 0.0 and none["choice"] is None


# ------------------------------------------------------------------------------------------
# confidence intervals


def test_wilson_interval_by_hand_8_of_10():
    z2 = Z95 ** 2
    denom = 1 + z2 / 10
    centre = (0.8 + z2 / 20) / denom
    half = Z95 * math.sqrt(0.8 * 0.2 / 10 + z2 / 400) / denom
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # published table value
    mean, lo2, hi2 = mean_ci95([1] * 8 + [0] * 2)
    assert mean == 0.8 and (lo2, hi2) == pytest.approx((lo, hi))
    # Wilson stays inside [0, 1] and is not degenerate at 0/n (unlike the normal interval)
    lo0, hi0 = wilson_interval(0, 5)
    assert lo0 == 0.0 and 0.0 < hi0 < 1.0
    assert all(math.isnan(x) for x in mean_ci95([]))


def test_mean_ci95_normal_for_non_binary():
    mean, lo, hi = mean_ci95([1.0, 2.0, 3.0])  # sd = 1, se = 1/sqrt(3)
    assert mean == 2.0
    assert (lo, hi) == pytest.approx((2 - Z95 / math.sqrt(3), 2 + Z95 / math.sqrt(3)))
    assert mean_ci95([0.4]) == (0.4, 0.4, 0.4)


# ------------------------------------------------------------------------------------------
# aggregation


def _rows() -> list[dict[str, Any]]:
    def row(bench, family, ptype, correct, iou=None, missing=False, hit=None):
        return dict(benchmark=bench, family=family, problem_type=ptype, correct=correct,
                    reward=float(correct), iou=iou, missing=missing, perception_hit=hit)

    return [
        row("test", "count", "numerical", True, hit=True),
        row("test", "count", "numerical", False, hit=False),
        row("test", "flash_color", "multiple choice", True, hit=True),
        row("test", "flash_color", "multiple choice", True),
        row("nextgqa", "CW", "multiple choice", True, iou=0.5),
        row("nextgqa", "CW", "multiple choice", False, iou=0.0, missing=True),
        row("nextgqa", None, "multiple choice", False, iou=0.25),
    ]


def test_aggregate_groups():
    m = aggregate(_rows())
    assert set(m) == {"overall", "benchmarks", "by_family", "by_problem_type"}
    overall = m["overall"]
    assert STAT_KEYS <= set(overall)
    assert overall["n"] == 7 and overall["correct"] == 4 and overall["missing"] == 1
    assert overall["accuracy"] == pytest.approx(4 / 7)
    assert overall["ci95"] == pytest.approx(list(wilson_interval(4, 7)))
    assert overall["mIoU"] == pytest.approx(0.75 / 3) and overall["n_iou"] == 3
    assert overall["perception_hit_rate"] == pytest.approx(2 / 3)
    assert overall["n_perception"] == 3

    assert list(m["benchmarks"]) == ["nextgqa", "test"]
    test = m["benchmarks"]["test"]
    assert test["n"] == 4 and test["accuracy"] == 0.75 and "mIoU" not in test
    assert test["by_family"]["count"]["accuracy"] == 0.5
    assert set(test["by_problem_type"]) == {"multiple choice", "numerical"}
    nextgqa = m["benchmarks"]["nextgqa"]
    assert nextgqa["missing"] == 1 and "perception_hit_rate" not in nextgqa
    assert set(m["by_family"]) == {"CW", "count", "flash_color", "unknown"}
    assert m["by_family"]["CW"]["n"] == 2 and m["by_family"]["unknown"]["n"] == 1
    assert m["by_problem_type"]["multiple choice"]["n"] == 5
    assert m["by_problem_type"]["numerical"]["accuracy"] == 0.5
    json.dumps(m, allow_nan=False)  # strictly JSON-serialisable

    empty = group_stats([])
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["ci95"] == [None, None]


def test_markdown_table():
    m = {"name": "grpo", "checkpoint": "models/grpo", **aggregate(_rows()), "missing": [{}]}
    md = markdown_table(m)
    assert "## Evaluation: grpo" in md and "`models/grpo`" in md
    assert "| benchmark | n | accuracy % | 95% CI | reward | mIoU % | perception hit % |" in md
    lines = md.splitlines()
    overall = next(line for line in lines if line.startswith("| **overall**"))
    assert "| 7 | 57.1 |" in overall
    assert any(line.startswith("| nextgqa | 3 | 33.3 |") for line in lines)
    assert "### Task families" in md and "| flash_color | 2 | 100.0 |" in md
    assert "### Problem types" in md and "| numerical | 2 | 50.0 |" in md
    assert "1 question(s) had missing media" in md


# ------------------------------------------------------------------------------------------
# the benchmark formats end to end through the eval path


def _video(path: Path, seed: int, n: int = 8, size: int = 56) -> str:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    atomic_write_video(path, frames, 4.0)
    return str(path)


def _png(path: Path) -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((56, 56, 3), 128, np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory) -> dict[str, Path]:
    """Tiny self-made annotation files in the three public formats + their videos."""
    root = tmp_path_factory.mktemp("bench")
    vids = root / "local_videos"
    for i in range(3):
        _video(vids / f"v{i}.mp4", i)
    files: dict[str, Path] = {}
    # Video-R1 style: foreign absolute paths, remapped by basename; one video does not exist
    files["videor1"] = root / "videor1.json"
    files["videor1"].write_text(json.dumps([
        {"problem_id": 1, "problem": "Where?", "data_type": "video",
         "problem_type": "multiple choice", "options": ["A. in", "B. out", "C. car"],
         "solution": "<answer>C</answer>", "path": "/home/author/pt/v0.mp4",
         "data_source": "PerceptionTest/train"},
        {"problem_id": 2, "problem": "How many cups?", "data_type": "video",
         "problem_type": "numerical", "options": [], "solution": "<answer>3</answer>",
         "path": "/home/author/pt/v1.mp4", "data_source": "PerceptionTest/train"},
        {"problem_id": 3, "problem": "How far?", "data_type": "video",
         "problem_type": "regression", "options": [], "solution": "<answer>2.5</answer>",
         "path": "/home/author/pt/gone.mp4", "data_source": "PerceptionTest/train"},
    ]))
    # NExT-GQA: plain options, index answer, time clues
    files["nextgqa"] = root / "nextgqa.json"
    files["nextgqa"].write_text(json.dumps([
        {"qid": f"100_{i}", "question": "why did the boy pick up the ball?",
         "video_path": str(vids / f"v{i}.mp4"),
         "options": ["to eat it", "to throw it", "to hide it", "to give it away", "to sit"],
         "answer": str(i), "qtype": "CW", "frame_count": "8", "width": "56", "height": "56",
         "duration": 2.0, "time_clues": [[0.5, 1.0]], "dataset_name": "nextqa"}
        for i in range(2)
    ]))
    # SEED-Bench-R1 evaluation form: video + current-observation PNG under the file's folder
    seed_root = root / "seed"
    _video(seed_root / "videos" / "EpicKitchens" / "clip0.mp4", 7)
    _png(seed_root / "images" / "EpicKitchens" / "obs0.png")
    files["seedbench_r1"] = seed_root / "seed_L1.jsonl"
    files["seedbench_r1"].write_text("".join(json.dumps(r) + "\n" for r in [
        {"sample_id": f"s{i}", "video_id": "P01", "task_goal": "make tea",
         "question": "What is the next action?", "choice_a": "boil water", "choice_b": "cut",
         "choice_c": "wash", "choice_d": "open fridge", "golden_choice_idx": i,
         "video_source": "EpicKitchens", "video_basename": "clip0.mp4",
         "current_observation_basename": obs, "duration": 2.0}
        for i, obs in enumerate(["obs0.png", "obs0.png", "missing_obs.png"])
    ]))
    return files


def _load(files: dict[str, Path], fmt: str, cache: Path) -> tuple[list[VideoQA], FrameStore]:
    remap = PathRemap(str(files["videor1"].parent / "local_videos")) if fmt == "videor1" \
        else PathRemap()
    records, _ = load_annotations(files[fmt], remap)
    extract_all([r.video for r in records], cache, FRAMES)
    return records, FrameStore(cache)


# format -> (records, runnable, family, problem types, has iou, missing reason fragment)
EXPECTED = {
    "videor1": (3, 2, "PerceptionTest/train", {"multiple choice", "numerical", "regression"},
                False, "video file not found"),
    "nextgqa": (2, 2, "CW", {"multiple choice"}, True, None),
    "seedbench_r1": (3, 2, "EpicKitchens", {"multiple choice"}, False, "image file not found"),
}


@pytest.mark.parametrize("fmt", list(EXPECTED))
def test_benchmark_format_end_to_end(fmt, bench_files, tiny_policy, tmp_path):
    model, processor = tiny_policy
    n, runnable, family, ptypes, has_iou, reason = EXPECTED[fmt]
    records, store = _load(bench_files, fmt, tmp_path / "frames")
    assert len(records) == n
    if fmt == "seedbench_r1":
        assert all(r.data_type == "video+image" and r.image for r in records)

    rows, report = evaluate(model, processor, records, store, batch_size=2, max_new_tokens=6,
                            benchmark_name=fmt, progress=False)
    assert len(rows) == n and [r["problem_id"] for r in rows] == [r.problem_id for r in records]
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["benchmark"] == fmt and row["family"] == family
        assert isinstance(row["correct"], bool) and 0.0 <= row["reward"] <= 1.0
        assert (row["iou"] is not None) == has_iou
        assert row["perception_hit"] is None
    assert {r["problem_type"] for r in rows} == ptypes
    assert sum(isinstance(r["response"], str) for r in rows) == runnable
    assert report["n_records"] == n and report["n_scored"] == n and report["n_excluded"] == 0
    assert len(report["missing"]) == n - runnable
    if reason:
        (miss,) = report["missing"]
        assert reason in miss["reason"] and miss["benchmark"] == fmt
        (row,) = [r for r in rows if r["missing"]]
        assert row["problem_id"] == miss["problem_id"]
        assert row["correct"] is False and row["response"] is None and row["reward"] == 0.0

    stats = aggregate(rows)["benchmarks"][fmt]
    assert stats["n"] == n and stats["missing"] == n - runnable
    assert ("mIoU" in stats) == has_iou


def test_missing_video_wrong_vs_exclude(bench_files, tiny_policy, tmp_path):
    model, processor = tiny_policy
    records, store = _load(bench_files, "videor1", tmp_path / "frames")
    wrong, rep_w = evaluate(model, processor, records, store, batch_size=4, max_new_tokens=4,
                            benchmark_name="vr1", progress=False)
    excl, rep_e = evaluate(model, processor, records, store, batch_size=4, max_new_tokens=4,
                           benchmark_name="vr1", missing="exclude", progress=False)
    assert [r["problem_id"] for r in wrong] == ["1", "2", "3"]
    assert [r["problem_id"] for r in excl] == ["1", "2"]
    assert rep_w["missing"] == rep_e["missing"] and rep_e["missing"][0]["problem_id"] == "3"
    assert rep_e["n_excluded"] == 1 and rep_e["n_scored"] == 2 and rep_w["n_excluded"] == 0
    # identical predictions for the runnable questions either way
    assert [r["response"] for r in wrong[:2]] == [r["response"] for r in excl]
    assert aggregate(wrong)["overall"]["n"] == 3 and aggregate(excl)["overall"]["n"] == 2
    assert aggregate(wrong)["overall"]["missing"] == 1 and aggregate(excl)["overall"]["missing"] == 0
    # a store that holds nothing: every question is missing, nothing is generated
    rows, rep = evaluate(model, processor, records, None, benchmark_name="vr1", progress=False)
    assert len(rows) == 3 and all(r["missing"] for r in rows) and len(rep["missing"]) == 3
    with pytest.raises(ValueError, match="missing must be one of"):
        evaluate(model, processor, records, store, missing="skip")


@pytest.fixture(scope="module")
def noisy_policy(tiny_policy):
    """The tiny model with perturbed weights: its greedy answers vary with the input (the
    freshly initialised one answers every question with the same newlines)."""
    import copy

    import torch

    model, processor = tiny_policy
    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in noisy.parameters():
            if param.dim() >= 2:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return noisy, processor


def test_hit_rate_hook_and_determinism(synthetic_data, noisy_policy):
    model, processor = noisy_policy
    _, store, records = synthetic_data
    test = records["test"]
    calls = []

    def hit_rate_fn(model_, processor_, batch_records, rollout, store_):
        calls.append(len(rollout.texts))
        assert len(batch_records) == len(rollout.texts) and store_ is store
        return [True, None, False][: len(rollout.texts)] + [None] * (len(rollout.texts) - 3)

    kw = dict(batch_size=3, max_new_tokens=8, benchmark_name="test", progress=False)
    rows, _ = evaluate(model, processor, test, store, hit_rate_fn=hit_rate_fn, **kw)
    assert calls == [3, 3, 2]
    assert [r["perception_hit"] for r in rows] == [True, None, False] * 2 + [True, None]
    stats = aggregate(rows)["overall"]
    assert stats["perception_hit_rate"] == pytest.approx(3 / 5) and stats["n_perception"] == 5

    assert len({r["response"] for r in rows}) > 1  # a non-trivial comparison below
    again, _ = evaluate(model, processor, test, store, **kw)
    strip = [{k: v for k, v in r.items() if k != "perception_hit"} for r in rows]
    assert strip == [{k: v for k, v in r.items() if k != "perception_hit"} for r in again]
    with pytest.raises(ValueError, match="hit_rate_fn returned 1 values"):
        evaluate(model, processor, test, store, hit_rate_fn=lambda *args: [True], **kw)


def test_sampled_accuracy_is_the_correct_share_of_the_temperature_1_samples(
        synthetic_data, noisy_policy, monkeypatch):
    import torch

    from appo.eval import runner
    from appo.eval.metrics import score_prediction

    model, processor = noisy_policy
    _, store, records = synthetic_data
    test = records["test"][:5]
    drawn = []
    real_generate = runner.generate

    def spy(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        if kwargs.get("num_samples", 1) > 1:
            assert kwargs["temperature"] == 1.0 and not kwargs.get("greedy", False)
            drawn.append(out.texts)
        return out

    monkeypatch.setattr(runner, "generate", spy)
    kw = dict(batch_size=2, max_new_tokens=8, benchmark_name="test", progress=False, samples=3)
    torch.manual_seed(0)
    rows, _ = evaluate(model, processor, test, store, **kw)
    texts = [t for batch in drawn for t in batch]
    assert len(texts) == 3 * len(test)
    for j, (qa, row) in enumerate(zip(test, rows)):
        expected = sum(score_prediction(qa, texts[3 * j + k])["correct"] for k in range(3)) / 3
        assert row["sampled_accuracy"] == pytest.approx(expected)
    stats = aggregate(rows)["overall"]
    assert stats["sampled_accuracy"] == pytest.approx(
        sum(r["sampled_accuracy"] for r in rows) / len(rows))
    torch.manual_seed(0)
    again, _ = evaluate(model, processor, test, store, **kw)
    assert [r["sampled_accuracy"] for r in again] == [r["sampled_accuracy"] for r in rows]
    greedy_only, _ = evaluate(model, processor, test, store, **{**kw, "samples": 0})
    assert all("sampled_accuracy" not in r for r in greedy_only)
    assert [r["response"] for r in greedy_only] == [r["response"] for r in rows]


# ------------------------------------------------------------------------------------------
# config and stage


def test_eval_config_section():
    cfg = load_section(EvalConfig, "eval", Path(__file__).parents[1] / "params.yaml")
    assert cfg.batch_size == 64 and cfg.max_new_tokens == 64 and cfg.missing == "wrong"
    assert cfg.splits == ["test"] and cfg.benchmarks == {}

    from appo.stages.eval import check_config

    with pytest.raises(ConfigError, match="eval.missing"):
        check_config(EvalConfig(missing="skip"))
    with pytest.raises(ConfigError, match="same name"):
        check_config(EvalConfig(benchmarks={"test": "x.json"}))


def test_stage_main_writes_files(synthetic_data, tiny_checkpoint, bench_files, tmp_path,
                                 monkeypatch):
    from appo.stages.eval import main

    monkeypatch.setenv("APPO_MLFLOW", "0")
    monkeypatch.chdir(tmp_path)  # default out dir: outputs/eval/<name>
    data_dir, store, records = synthetic_data
    params = {
        "data": {"out_dir": str(data_dir)},
        "frames": {"out_dir": str(store.dir), "num_frames": 8, "workers": 1},
        "model": {"dtype": "float32", "device": "cpu"},
        "eval": {"batch_size": 4, "max_new_tokens": 6,
                 "benchmarks": {"nextgqa": str(bench_files["nextgqa"]),
                                "pt": str(bench_files["videor1"])},
                 "video_root": str(bench_files["videor1"].parent / "local_videos")},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    main(["--checkpoint", str(tiny_checkpoint), "--name", "tiny", "--headline", "m/tiny.json"])

    out = tmp_path / "outputs" / "eval" / "tiny"
    headline = json.loads((tmp_path / "m" / "tiny.json").read_text())  # DVC's metrics file
    assert set(headline) <= {"accuracy", "ci_lo", "ci_hi", "hit_rate"} and "accuracy" in headline
    assert {"predictions.jsonl", "metrics.json", "metrics.md"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"checkpoint", "name", "overall", "benchmarks", "by_family", "by_problem_type",
            "missing"} <= set(metrics)
    assert metrics["name"] == "tiny" and metrics["checkpoint"] == str(tiny_checkpoint)
    n_test = len(records["test"])
    assert metrics["overall"]["n"] == n_test + 2 + 3
    assert set(metrics["benchmarks"]) == {"test", "nextgqa", "pt"}
    assert metrics["benchmarks"]["test"]["n"] == n_test
    assert STAT_KEYS <= set(metrics["benchmarks"]["test"])
    assert "mIoU" in metrics["benchmarks"]["nextgqa"]
    assert {"flash_color", "count", "CW"} <= set(metrics["by_family"])
    assert [(m["benchmark"], m["problem_id"]) for m in metrics["missing"]] == [("pt", "3")]
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == metrics["overall"]["n"] and ROW_KEYS <= set(preds[0])
    assert (out / "frames" / "nextgqa" / "manifest.parquet").is_file()
    assert "| **overall** |" in (out / "metrics.md").read_text()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["overall/accuracy"] == pytest.approx(metrics["overall"]["accuracy"])
    assert headline["accuracy"] == round(metrics["overall"]["accuracy"], 4)
    assert logged[-1]["bench/test/n"] == n_test

    # --out is honoured and a re-run reproduces the predictions exactly
    main(["--checkpoint", str(tiny_checkpoint), "--name", "tiny", "--out", "again"])
    assert (tmp_path / "again" / "predictions.jsonl").read_text() == \
        (out / "predictions.jsonl").read_text()


def test_answer_token_mask_and_most_attended_frame():
    from appo.eval.perception import answer_token_mask, most_attended_frames

    OPEN, CLOSE = 7, 8
    ids = torch.tensor([[1, OPEN, 5, 6, CLOSE, 2], [1, 3, 4, 2, 0, 0], [OPEN, 5, 2, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    got = answer_token_mask(ids, mask, OPEN, CLOSE)
    assert got.int().tolist() == [[0, 0, 1, 1, 0, 0],   # inside the tags
                                  [1, 1, 1, 1, 0, 0],   # no tag: every response token
                                  [0, 1, 1, 0, 0, 0]]   # unclosed tag: to the end
    attn = torch.zeros(1, 3, 3)
    attn[0, 0, 2] = 0.9   # token 0 (not selected) loves frame 2
    attn[0, 1, 1] = 0.5   # selected tokens prefer frame 1
    attn[0, 2, 0] = 0.4
    best = most_attended_frames(attn, torch.tensor([[True, True, True]]),
                                torch.tensor([[False, True, True]]))
    assert best.tolist() == [1]
    best = most_attended_frames(attn, torch.tensor([[True, False, True]]),
                                torch.tensor([[False, True, True]]))
    assert best.tolist() == [0]  # invalid frames never win


def test_perception_hits_on_synthetic_records(synthetic_data, tiny_policy):
    from appo.eval.perception import perception_hits

    model, processor = tiny_policy
    _, store, records = synthetic_data
    test = records["test"][:3]
    rows, _ = evaluate(model, processor, test, store, batch_size=3, max_new_tokens=6,
                       benchmark_name="test", progress=False,
                       hit_rate_fn=perception_hits)
    assert all(isinstance(r["perception_hit"], bool) for r in rows)
    no_keys = [dataclasses.replace(qa, key_frames=()) for qa in test]
    rows, _ = evaluate(model, processor, no_keys, store, batch_size=3, max_new_tokens=6,
                       benchmark_name="test", progress=False, hit_rate_fn=perception_hits)
    assert [r["perception_hit"] for r in rows] == [None] * 3

"""Smoke test of benchmarks/rl_step.py: a very small run, table shape only (never timings)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rl_step.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_rl_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_rl_step_benchmark_table(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "rl_step.json"
    result = bench.main(["--model", "tiny", "--device", "cpu", "--reps", "1", "--warmup", "0",
                         "--prompts", "1", "--generations", "2", "--max-new-tokens", "6",
                         "--json", str(out)])
    printed = capsys.readouterr().out

    assert result["columns"] == list(bench.COLUMNS)
    labels = [row[0] for row in result["table"]]
    assert labels[:3] == ["GRPO", "DAPO", "APPO"]
    assert labels[3].startswith("authors' approach")
    assert len(labels) == 4
    assert all(len(row) == len(bench.COLUMNS) for row in result["table"])
    grpo, dapo, appo, authors = result["table"]
    for row in (grpo, dapo, appo):  # every algorithm has rollout and step numbers
        assert all(cell != "-" for cell in row[1:6]), row
    assert grpo[6] == grpo[7] == "-" and dapo[6] == dapo[7] == "-"
    assert appo[6] != "-" and appo[7] != "-"  # APPO's capture and weight overheads
    assert authors[1] != "-" and authors[4] == "-"  # rollout only, no training step
    assert set(result["ratios"]) >= {"appo/grpo step time", "appo/dapo step time",
                                     "appo/grpo step peak memory", "authors/ours rollout time"}

    # the markdown table and the header lines are printed
    assert "| " + " | ".join(bench.COLUMNS) + " |" in printed
    for word in ("device:", "torch", "transformers", "params", "Dynamic sampling is disabled"):
        assert word in printed
    assert "benchmarks/trl_compare.py" in printed

    saved = json.loads(out.read_text())
    assert saved["columns"] == list(bench.COLUMNS)
    assert set(saved["summary"]) == {"grpo", "dapo", "appo", "authors"}
    assert len(saved["samples"]["appo"]) == 1


def test_rollout_benchmark_table(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "bench_rollout", SCRIPT.parent / "rollout.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "rollout.json"
    result = bench.main(["--device", "cpu", "--threads", "1", "--reps", "1", "--generations", "2",
                         "--max-new-tokens", "5", "--frames", "4", "--frame-size", "56",
                         "--variants", "hf,dynamic", "--bandwidth-gbs", "10", "--json", str(out)])
    printed = capsys.readouterr().out
    assert [row[0] for row in result["table"]] == [bench.VARIANTS["hf"], bench.VARIANTS["dynamic"]]
    assert all(len(row) == len(bench.COLUMNS) for row in result["table"])
    for name in ("hf", "dynamic"):
        row = result["summary"][name]
        assert row["tokens_per_s"] > 0 and row["ms_per_step"] >= 0
        # 2 samples x 5 tokens generated in rollout_s seconds
        assert abs(row["tokens_per_s"] * row["rollout_s"] - 10) < 1e-6
        assert row["bound_ms"] > 0 and row["compile_s"] is None
    assert "dynamic / HF generate throughput" in result["ratios"]
    assert "| " + " | ".join(bench.COLUMNS) + " |" in printed
    assert json.loads(out.read_text())["columns"] == list(bench.COLUMNS)


def test_trl_compare_runs_both_sides_on_the_same_work(tmp_path):
    """benchmarks/trl_compare.py (TRL from the bench extra): one tiny run, equal token counts."""
    pytest.importorskip("trl")
    spec = importlib.util.spec_from_file_location("bench_trl", SCRIPT.parent / "trl_compare.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    result = bench.main(["--models", "tiny", "--prompts", "2", "--generations", "2",
                         "--max-new-tokens", "3", "--image-size", "56", "--reps", "1",
                         "--warmup", "0", "--threads", "1", "--json", str(tmp_path / "t.json")])
    ours, trl = result["summary"]["tiny"]["ours"], result["summary"]["tiny"]["trl"]
    assert ours["tokens"] == trl["tokens"] == 2 * 2 * 3
    assert ours["prompt_tokens"] == trl["prompt_tokens"] > 0
    assert set(result["ratios"]) == {"tiny: ours/TRL step time", "tiny: ours/TRL step peak memory"}
    assert json.loads((tmp_path / "t.json").read_text())["limits"]

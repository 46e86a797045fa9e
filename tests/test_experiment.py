"""Multi-seed experiments: the experiment file, the seed statistics and the aggregate table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from appo.config import ConfigError
from appo.experiment import (
    Experiment,
    aggregate,
    collect_run,
    render_markdown,
    run_dir,
    run_overrides,
)
from appo.stats import mean_ci

ROOT = Path(__file__).resolve().parents[1]


def test_mean_ci_is_the_student_t_interval():
    mean, half = mean_ci([0.5, 0.6, 0.7])  # sd 0.1, n 3, t(0.975, 2) = 4.303
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    mean, half = mean_ci([0.2, 0.4])  # sd 0.1414, t(0.975, 1) = 12.706
    assert half == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2))
    assert mean_ci([0.3]) == (0.3, mean_ci([0.3])[1]) and math.isnan(mean_ci([0.3])[1])
    assert mean_ci([0.4] * 40)[1] == pytest.approx(0.0)


def _write(path: Path, body: dict) -> Path:
    path.write_text(yaml.safe_dump(body))
    return path


def test_experiment_file_is_checked_with_the_field_named(tmp_path):
    good = _write(tmp_path / "e.yaml", {
        "name": "e", "seeds": [0, 1], "algorithms": ["grpo", "appo"], "set": ["rl.lr=1e-4"],
        "variants": {"main": {}, "wmax": {"algorithms": ["appo"], "seeds": [0],
                                          "set": ["rl.algorithms.appo.perception.w_max=1.3"]}}})
    exp = Experiment.load(good)
    assert [(v.name, s) for v, s in exp.runs()] == [("main", 0), ("main", 1), ("wmax", 0)]
    wmax = exp.variants[1]
    assert run_overrides(exp, wmax, 0) == [
        "rl.lr=1e-4", "rl.algorithms.appo.perception.w_max=1.3", "rl.seed=0", "eval.splits=[test]"]
    bad = {"seeds": "0", "algorithms": ["appo"]}
    with pytest.raises(ConfigError, match=r"b.yaml: 'seeds' must be a non-empty list"):
        Experiment.load(_write(tmp_path / "b.yaml", bad))
    with pytest.raises(ConfigError, match=r"variants.x.algorithms \['ppo'\] are not in"):
        Experiment.load(_write(tmp_path / "c.yaml", {
            "algorithms": ["appo"], "variants": {"x": {"algorithms": ["ppo"]}}}))
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['seed'\]"):
        Experiment.load(_write(tmp_path / "d.yaml", {"algorithms": ["appo"], "seed": [1]}))


@pytest.mark.parametrize("name", ["tune", "headline"])
def test_shipped_experiments_load_and_name_real_presets(name):
    path = ROOT / "experiments" / f"{name}.yaml"
    exp = Experiment.load(path)
    presets = set(yaml.safe_load((ROOT / "params.yaml").read_text())["rl"]["algorithms"])
    assert set(exp.algorithms) <= presets
    from appo.workspace import apply_overrides, validate_params

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for variant, seed in exp.runs():  # every run's params are valid
        validate_params(apply_overrides(params, run_overrides(exp, variant, seed)))


def _fake_outputs(outputs: Path, accs: dict[str, float], hit: float = 0.5) -> None:
    for algo, acc in accs.items():
        ev = outputs / "eval" / algo
        ev.mkdir(parents=True, exist_ok=True)
        stats = {"accuracy": acc, "n": 10}
        (ev / "metrics.json").write_text(json.dumps({
            "overall": {**stats, "perception_hit_rate": hit}, "benchmarks": {"test": stats},
            "by_family": {"count": {"accuracy": acc / 2}, "order": {"accuracy": acc}}}))
        right = round(acc * 10)  # 10 questions; the first `right` of them answered correctly
        (ev / "predictions.jsonl").write_text("".join(json.dumps(
            {"problem_id": f"q{i}", "benchmark": "test", "correct": i < right}) + "\n"
            for i in range(10)))
        if algo in ("base", "sft"):
            continue
        rl = outputs / "rl" / algo
        rl.mkdir(parents=True, exist_ok=True)
        (rl / "metrics.json").write_text(json.dumps({"train_time_s": 10.0, "final_reward": acc}))
        (rl / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "reward": acc * s, "accuracy": acc * s}) + "\n"
            for s in range(3)) + json.dumps({"step": 3, "final/steps": 3}) + "\n")


def test_aggregate_over_seeds_with_paired_differences(tmp_path):
    exp = Experiment.load(_write(tmp_path / "e.yaml", {
        "name": "e", "seeds": [0, 1, 2], "algorithms": ["grpo", "appo"],
        "variants": {"main": {}, "k": {"algorithms": ["appo"], "seeds": [0]}}}))
    root = tmp_path / "experiments"
    grpo, appo = [0.40, 0.50, 0.45], [0.50, 0.60, 0.58]
    for variant, seed in exp.runs():
        outputs = tmp_path / f"out-{variant.name}-{seed}"
        accs = {"sft": 0.35, "appo": appo[seed] if variant.name == "main" else 0.3}
        if "grpo" in variant.algorithms:
            accs["grpo"] = grpo[seed]
        _fake_outputs(outputs, accs)
        collect_run(outputs, run_dir(root, exp, variant, seed), variant.algorithms)
    result = aggregate(exp, root / "e")
    table = result["table"]
    assert table["grpo"]["accuracy"] == pytest.approx(mean_ci(grpo))
    assert table["appo"]["accuracy"][0] == pytest.approx(sum(appo) / 3)
    assert table["appo"]["families"]["count"][0] == pytest.approx(sum(appo) / 6)
    assert table["appo [k]"]["seeds"] == [0] and table["appo [k]"]["accuracy"][0] == 0.3
    assert result["baselines"]["sft"]["accuracy"] == 0.35
    # per-seed outcomes on 10 questions: grpo right on 4, 5, 4 (0.45 rounds to 4); appo on
    # 5, 6, 6: differences of -1, -1, -2 questions, -4 / 30 in all
    d = result["differences"]["grpo-appo"]
    assert d["mean"] == pytest.approx(-4 / 30) and d["seeds"] == [0, 1, 2] and d["questions"] == 10
    lo, hi = d["ci95"]
    assert lo <= -4 / 30 <= hi <= 0 and d["mde"] > 0
    # the baseline pairs with every seed: appo - sft = (5 + 6 + 6) / 30 - 0.4 (sft: 3.5 -> 4)
    assert result["differences"]["appo-sft"]["mean"] == pytest.approx(17 / 30 - 0.4)
    assert result["differences"]["appo [k]-appo"]["seeds"] == [0]  # ablation vs its algorithm
    assert result["differences"]["appo [k]-appo"]["mean"] == pytest.approx(0.3 - 0.5)
    # sample efficiency: mean rollout accuracy over the steps (0, acc, 2 acc) = acc
    assert table["appo"]["rl_accuracy_auc"][0] == pytest.approx(sum(appo) / 3)
    md = (root / "e" / "results.md").read_text()
    assert md == render_markdown(result)
    assert "| appo | 0,1,2 | 56.0 ± " in md and "- grpo-appo: -13.3 [" in md
    for png in ("rl_accuracy_curves.png", "accuracy.png"):
        assert (root / "e" / png).read_bytes()[:4] == b"\x89PNG"


def test_run_experiment_calls_the_runner_per_run_and_collects(tmp_path):
    """The loop shared by the CLI (DVC runner) and the Prefect flow (pipeline sub-flows)."""
    from appo.experiment import run_experiment

    (tmp_path / "e.yaml").write_text(yaml.safe_dump({
        "name": "e", "seeds": [0, 1], "algorithms": ["appo"], "set": ["rl.lr=1e-4"]}))
    calls = []

    def runner(project, spec):
        calls.append((spec.variant.name, spec.seed, spec.overrides))
        _fake_outputs(project / "outputs", {"sft": 0.3, "appo": 0.4 + 0.1 * spec.seed})
        return project

    result = run_experiment("e.yaml", project=tmp_path, runner=runner)
    assert calls == [("main", s, ["rl.lr=1e-4", f"rl.seed={s}", "eval.splits=[test]"])
                     for s in (0, 1)]
    assert result["table"]["appo"]["accuracy"][0] == pytest.approx(0.45)
    with pytest.raises(ConfigError, match="no run of variant 'x'"):
        run_experiment("e.yaml", project=tmp_path, runner=runner, only="x")


def test_fan_out_collects_the_finished_runs_and_names_the_failed_ones(tmp_path):
    """The pool path (flows/cluster.py) in miniature: every run is handed over at once; a
    failed run is named with the command that retries it alone, and the retry clears it."""
    from appo.experiment import collect_run, run_experiment

    (tmp_path / "e.yaml").write_text(yaml.safe_dump({
        "name": "e", "seeds": [0, 1], "algorithms": ["appo"]}))
    handed = []

    def fan_out(project, specs, fail=(1,)):
        handed.append([(s.label, s.targets, s.dest.relative_to(project)) for s in specs])
        assert {s.experiment for s in specs} == {"e"}
        for s in specs:
            if s.seed not in fail:
                out = project / f"run-{s.seed}"
                _fake_outputs(out, {"sft": 0.3, "appo": 0.4 + 0.1 * s.seed})
                collect_run(out, s.dest, s.variant.algorithms)
        return {s.label: "flow run crashed" for s in specs if s.seed in fail}

    with pytest.raises(RuntimeError) as err:
        run_experiment("e.yaml", project=tmp_path, fan_out=fan_out)
    assert handed == [[(f"main seed {s}", ["eval@appo", "eval_baseline@base",
                                           "eval_baseline@sft"],
                        Path(f"outputs/experiments/e/main/seed-{s}")) for s in (0, 1)]]
    assert str(err.value).startswith("1 of 2 runs failed: main seed 1: flow run crashed.")
    assert "python -m appo experiment e.yaml --only main --seed 1" in str(err.value)
    root = tmp_path / "outputs" / "experiments" / "e"
    assert json.loads((root / "failed.json").read_text()) == {"main seed 1": "flow run crashed"}
    assert json.loads((root / "results.json").read_text())["table"]["appo"]["seeds"] == [0]

    result = run_experiment("e.yaml", project=tmp_path, only="main", seed=1,
                            fan_out=lambda p, specs: fan_out(p, specs, fail=()))
    assert [label for label, *_ in handed[-1]] == ["main seed 1"]  # the retry alone
    assert result["table"]["appo"]["seeds"] == [0, 1]
    assert not (root / "failed.json").exists()

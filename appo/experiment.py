"""Multi-seed experiments over the DVC pipeline: the algorithm comparison and its ablations.

``python -m appo experiment experiments/headline.yaml`` reads an experiment file::

    name: headline
    split: test                    # the split whose accuracy is reported
    seeds: [0, 1, 2]               # rl.seed values (the SFT warm start is shared)
    algorithms: [grpo, dapo, appo, tgrpo]
    set: [rl.lr=1.0e-4]            # params overrides of every run
    variants:                      # name -> {set, algorithms, seeds}; default: one "main"
      main: {}
      w_max=1.35: {algorithms: [appo], seeds: [0],
                   set: [rl.algorithms.appo.perception.w_max=1.35]}

and, for every variant and seed, reproduces the ``eval@<algo>`` stages with ``dvc repro`` under
an MLflow parent run (:func:`appo.pipeline.run_pipeline`), in the run's own workspace
(:mod:`appo.workspace`; the project's params.yaml and outputs/ stay as they are): everything
upstream comes from the shared DVC cache (one data set, one SFT checkpoint for all), and DVC's
run cache restores a (variant, seed) that ran before instead of training it again. After each
run its results are copied to
``outputs/experiments/<name>/<variant>/seed-<s>/<algo>/``; :func:`aggregate` then writes
``results.md``, ``results.json`` and plots beside them: mean accuracy over seeds with a 95%
Student-t interval, per task family, perception hit rate, train time, and each algorithm's
paired per-seed difference to the others (inside the noise when its interval contains 0).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appo.config import BASELINES, ConfigError, load_yaml
from appo.io import atomic_path, atomic_write_json, atomic_write_text
from appo.stats import mean_ci, paired_bootstrap
from appo.tables import markdown, num, pct


@dataclass
class Variant:
    name: str
    overrides: list[str]
    algorithms: list[str]
    seeds: list[int]


@dataclass
class Experiment:
    name: str
    split: str
    seeds: list[int]
    algorithms: list[str]
    overrides: list[str] = field(default_factory=list)
    variants: list[Variant] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> Experiment:
        """Parse and check an experiment file; errors name the file and the field."""
        raw = load_yaml(path)
        where = str(path)
        known = {"name", "split", "seeds", "algorithms", "set", "variants"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; expected {sorted(known)}")

        def ints(value: Any, name: str) -> list[int]:
            if not isinstance(value, list) or not value or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"{where}: '{name}' must be a non-empty list of integers")
            return list(value)

        def strs(value: Any, name: str, empty: bool = False) -> list[str]:
            if not isinstance(value, list) or (not value and not empty) or not all(
                    isinstance(v, str) for v in value):
                raise ConfigError(f"{where}: '{name}' must be a list of strings")
            return list(value)

        name = raw.get("name") or Path(path).stem
        seeds = ints(raw.get("seeds", [0]), "seeds")
        algorithms = strs(raw.get("algorithms"), "algorithms")
        overrides = strs(raw.get("set", []), "set", empty=True)
        variants = []
        for vname, body in (raw.get("variants") or {"main": {}}).items():
            body = body or {}
            if not isinstance(body, dict) or set(body) - {"set", "algorithms", "seeds"}:
                raise ConfigError(f"{where}: variants.{vname} must be a mapping with keys "
                                  "set, algorithms, seeds")
            algos = strs(body.get("algorithms", algorithms), f"variants.{vname}.algorithms")
            extra = sorted(set(algos) - set(algorithms))
            if extra:
                raise ConfigError(f"{where}: variants.{vname}.algorithms {extra} are not in "
                                  f"'algorithms' {algorithms}")
            variants.append(Variant(
                str(vname), strs(body.get("set", []), f"variants.{vname}.set", empty=True),
                algos, ints(body.get("seeds", seeds), f"variants.{vname}.seeds")))
        return cls(str(name), str(raw.get("split", "test")), seeds, algorithms, overrides,
                   variants)

    def runs(self) -> list[tuple[Variant, int]]:
        return [(v, s) for v in self.variants for s in v.seeds]


@dataclass
class RunSpec:
    """One (variant, seed) run of an experiment: its overrides and where its results go."""

    variant: Variant
    seed: int
    overrides: list[str]
    dest: Path  # outputs/experiments/<name>/<variant>/seed-<s>

    @property
    def label(self) -> str:
        return f"{self.variant.name} seed {self.seed}"

    @property
    def experiment(self) -> str:
        """The experiment's name (``dest`` is ``<root>/<name>/<variant>/seed-<s>``)."""
        return self.dest.parent.parent.name

    @property
    def targets(self) -> list[str]:
        """The DVC stages the run needs: its algorithms' and the baselines' evaluations."""
        return [*(f"eval@{a}" for a in self.variant.algorithms),
                *(f"eval_baseline@{b}" for b in BASELINES)]


def run_overrides(exp: Experiment, variant: Variant, seed: int) -> list[str]:
    """Effective overrides of one run: the experiment's, the variant's, the seed and split."""
    return [*exp.overrides, *variant.overrides, f"rl.seed={seed}", f"eval.splits=[{exp.split}]"]


def run_dir(root: Path, exp: Experiment, variant: Variant, seed: int) -> Path:
    return root / exp.name / variant.name / f"seed-{seed}"


def collect_run(outputs: Path, dest: Path, algorithms: Sequence[str]) -> None:
    """Copy one run's eval and RL results (and the seed-independent baselines) to ``dest``."""
    files = {"eval": ("metrics.json", "predictions.jsonl"), "rl": ("metrics.json", "metrics.jsonl")}
    for algo in (*algorithms, *BASELINES):
        for kind, names in files.items():
            for name in names:
                src = outputs / kind / algo / name
                if src.is_file():
                    target = dest / algo / f"{kind}_{name}"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(target) as tmp:
                        shutil.copyfile(src, tmp)


def dvc_runner(project: Path, spec: RunSpec) -> Path:
    """One run: ``dvc repro`` of the variant's eval stages (+ baselines) under MLflow; returns
    the folder it ran in (its workspace)."""
    from appo.pipeline import run_pipeline

    return run_pipeline(spec.targets, project=project, overrides=spec.overrides)


# (project, run) -> the folder whose outputs/ hold the run's results
Runner = Callable[[Path, RunSpec], Path]
# (project, runs) -> label -> reason for each run that failed: runs them all at once elsewhere
# (flows.cluster: Prefect workers) and puts each one's results into its ``dest``
FanOut = Callable[[Path, list[RunSpec]], dict[str, str]]


def run_experiment(path: str | Path, *, project: str | Path = ".", only: str | None = None,
                   seed: int | None = None, aggregate_only: bool = False,
                   runner: Runner = dvc_runner, fan_out: FanOut | None = None) -> dict[str, Any]:
    """Every (variant, seed) of the experiment, results collected, then the aggregate.

    One after another through ``runner`` (default: the DVC pipeline; the Prefect flow passes
    its pipeline sub-flow), or all at once through ``fan_out`` (a Prefect work pool). ``only``
    and ``seed`` select runs (to retry a failed one alone); ``aggregate_only`` just rebuilds
    the tables from what ran. Runs that failed in a fan-out are named in the error raised
    after the aggregate of the others (and in ``failed.json``).
    """
    project = Path(project).resolve()
    exp = Experiment.load(project / path)
    root = project / "outputs" / "experiments"
    failures: dict[str, str] = {}
    specs: list[RunSpec] = []
    if not aggregate_only:
        specs = [RunSpec(v, s, run_overrides(exp, v, s), run_dir(root, exp, v, s))
                 for v, s in exp.runs()
                 if (only is None or v.name == only) and (seed is None or s == seed)]
        if not specs:
            raise ConfigError(f"{path}: no run of variant {only or 'any'!r} with seed "
                              f"{'any' if seed is None else seed}")
        if fan_out is not None:
            failures = fan_out(project, specs)
        else:
            for i, spec in enumerate(specs, 1):
                print(f"experiment {exp.name}: run {i}/{len(specs)}: {spec.label}", flush=True)
                where = runner(project, spec)
                collect_run(Path(where) / "outputs", spec.dest, spec.variant.algorithms)
    result = aggregate(exp, root / exp.name)
    failed = root / exp.name / "failed.json"  # what still needs a retry, over earlier calls
    still = {k: v for k, v in (_read(failed) or {}).items()
             if aggregate_only or k not in {s.label for s in specs}}
    still.update(failures)
    if still:
        atomic_write_json(failed, still)
    else:
        failed.unlink(missing_ok=True)
    if failures:
        first = next(s for s in specs if s.label in failures)
        raise RuntimeError(
            f"{len(failures)} of {len(specs)} runs failed: "
            + "; ".join(f"{label}: {why}" for label, why in failures.items())
            + f". The others are aggregated in {root / exp.name / 'results.md'}; retry one "
            f"alone: python -m appo experiment {path} --only {first.variant.name} "
            f"--seed {first.seed} [--pool ...]")
    return result


# --------------------------------------------------------------------------------------------
# aggregation (pure: reads the copied results)


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _outcomes(predictions: Path, split: str) -> dict[str, float]:
    """problem id -> 1.0 / 0.0 (correct or not) for one eval run's questions of ``split``."""
    return {r["problem_id"]: float(bool(r.get("correct"))) for r in _rows(predictions)
            if "problem_id" in r and r.get("benchmark", split) == split}


def paired_difference(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]]
                      ) -> dict[str, Any] | None:
    """Accuracy difference a - b over the questions both answered, on the seeds both ran
    (a seed-independent baseline such as SFT, given as one seed, pairs with every seed), with
    the seeds-and-questions bootstrap of :func:`appo.stats.paired_bootstrap`."""
    if not a or not b:
        return None
    seeds = sorted(set(a) & set(b)) if len(b) > 1 else sorted(a)
    b_of = (lambda s: b[s]) if len(b) > 1 else (lambda s: next(iter(b.values())))
    questions = sorted(set.intersection(*(set(a[s]) & set(b_of(s)) for s in seeds))) if seeds else []
    if not questions:
        return None
    xa = np.array([[a[s][q] for q in questions] for s in seeds])
    xb = np.array([[b_of(s)[q] for q in questions] for s in seeds])
    boot = paired_bootstrap(xa, xb)
    return {"mean": boot["diff"], "ci95": boot["ci95"], "mde": boot["mde"], "seeds": seeds,
            "questions": len(questions), "inside_noise": boot["inside_ci"]}


def aggregate(exp: Experiment, root: Path) -> dict[str, Any]:
    """Per (variant, algorithm): accuracy and per-family accuracy over seeds (mean, 95% CI),
    perception hit rate, train time; paired per-seed differences between the main variant's
    algorithms; written to ``results.json``, ``results.md`` and PNG plots under ``root``."""
    table: dict[str, dict[str, Any]] = {}
    curves: dict[str, list[list[float]]] = {}
    outcomes: dict[str, dict[int, dict[str, float]]] = {}
    per_seed: dict[str, dict[int, float]] = {}
    baselines: dict[str, dict[str, Any]] = {}
    for variant in exp.variants:
        for algo in variant.algorithms:
            key = algo if variant.name == "main" else f"{algo} [{variant.name}]"
            accs, hits, times, rewards, aucs = {}, [], [], [], []
            families: dict[str, list[float]] = {}
            outcomes[key] = {}
            for seed in variant.seeds:
                d = run_dir(root.parent, exp, variant, seed) / algo
                ev, rl = _read(d / "eval_metrics.json"), _read(d / "rl_metrics.json")
                if ev is None:
                    continue
                bench = ev.get("benchmarks", {}).get(exp.split, ev.get("overall", {}))
                accs[seed] = bench["accuracy"]
                if ev.get("overall", {}).get("perception_hit_rate") is not None:
                    hits.append(ev["overall"]["perception_hit_rate"])
                for fam, stats in ev.get("by_family", {}).items():
                    families.setdefault(fam, []).append(stats["accuracy"])
                if rl:
                    times.append(rl.get("train_time_s", math.nan))
                    rewards.append(rl.get("final_reward", math.nan))
                outcomes[key][seed] = _outcomes(d / "eval_predictions.jsonl", exp.split)
                rows = _rows(d / "rl_metrics.jsonl")
                curve = [r["accuracy"] for r in rows if "accuracy" in r and "step" in r]
                if curve:
                    aucs.append(sum(curve) / len(curve))
                    if variant.name == "main":
                        curves.setdefault(algo, []).append(curve)
            if not accs:
                continue
            per_seed[key] = accs
            table[key] = {
                "seeds": sorted(accs),
                "accuracy": mean_ci(list(accs.values())),
                "families": {f: mean_ci(v) for f, v in sorted(families.items())},
                "perception_hit_rate": mean_ci(hits)[0] if hits else None,
                "train_time_s": mean_ci(times)[0] if times else None,
                "final_reward": mean_ci(rewards)[0] if rewards else None,
                "rl_accuracy_auc": mean_ci(aucs) if aucs else None,
            }
    for base in BASELINES:  # seed-independent: the first run that has them
        for variant, seed in exp.runs():
            ev = _read(run_dir(root.parent, exp, variant, seed) / base / "eval_metrics.json")
            if ev is not None:
                bench = ev.get("benchmarks", {}).get(exp.split, ev.get("overall", {}))
                baselines[base] = {
                    "accuracy": bench["accuracy"], "ci95": bench.get("ci95"),
                    "families": {f: s["accuracy"] for f, s in ev.get("by_family", {}).items()},
                    "perception_hit_rate": ev.get("overall", {}).get("perception_hit_rate")}
                outcomes[base] = {seed: _outcomes(run_dir(root.parent, exp, variant, seed) / base
                                                  / "eval_predictions.jsonl", exp.split)}
                break
    main = [a for a in exp.algorithms if a in table]
    pairs = [(a, b) for i, a in enumerate(main) for b in main[i + 1:]]
    pairs += [(k, k.split(" [")[0]) for k in table if k not in main]  # ablation vs its algorithm
    pairs += [(a, "sft") for a in table if "sft" in outcomes]
    differences = {f"{a}-{b}": d for a, b in pairs
                   if (d := paired_difference(outcomes.get(a, {}), outcomes.get(b, {})))}
    result = {"name": exp.name, "split": exp.split, "table": table, "baselines": baselines,
              "differences": differences}
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "results.json", result)
    atomic_write_text(root / "results.md", render_markdown(result))
    _plot(root, curves, table, main)
    return result


def _mean_ci(mean_half: tuple[float, float] | list[float]) -> str:
    """``mean ± half`` in %, or the mean alone when the interval is undefined (one seed)."""
    mean, half = mean_half
    return pct(mean) if isinstance(half, float) and math.isnan(half) else \
        f"{pct(mean)} ± {pct(half)}"


def render_markdown(result: dict[str, Any]) -> str:
    table, baselines = result["table"], result["baselines"]
    families = sorted({f for row in table.values() for f in row["families"]})
    head = ["variant", "seeds", f"{result['split']} acc % (95% CI over seeds)", *families,
            "perception hit %", "RL accuracy AUC %", "train time s"]
    rows = []
    for name, b in baselines.items():
        fams = [pct(b["families"][f]) if f in b["families"] else "-" for f in families]
        rows.append([name, "-", pct(b["accuracy"]), *fams, pct(b.get("perception_hit_rate")),
                     "-", "-"])
    for name, row in table.items():
        fams = [_mean_ci(row["families"][f]) if f in row["families"] else "-" for f in families]
        rows.append([name, ",".join(map(str, row["seeds"])), _mean_ci(row["accuracy"]), *fams,
                     pct(row["perception_hit_rate"]),
                     _mean_ci(row["rl_accuracy_auc"]) if row.get("rl_accuracy_auc") else "-",
                     num(row["train_time_s"], ".1f")])
    lines = [f"# Experiment `{result['name']}` ({result['split']} split)", "",
             *markdown(head, rows, text_columns=2)[:-1]]
    if result["differences"]:
        lines += ["", "Paired differences in accuracy points: mean, 95% bootstrap interval over "
                  "seeds and questions, and the minimal detectable effect (80% power):", ""]
        for pair, d in result["differences"].items():
            verdict = "inside the noise" if d["inside_noise"] else "outside the noise"
            lo, hi = d["ci95"]
            lines.append(f"- {pair}: {100 * d['mean']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}], "
                         f"MDE {100 * d['mde']:.1f} ({verdict}; {len(d['seeds'])} seeds x "
                         f"{d['questions']} questions)")
    return "\n".join(lines) + "\n"


def _plot(root: Path, curves: dict[str, list[list[float]]], table: dict[str, Any],
          main: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from appo.stages.report import curve_style

    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k, (algo, runs) in enumerate(curves.items()):
            n = min(len(r) for r in runs)
            mean = [sum(r[i] for r in runs) / len(runs) for i in range(n)]
            ax.plot(range(n), mean, label=f"{algo} (mean of {len(runs)} seeds)",
                    **curve_style(k))
        ax.set_xlabel("RL step")
        ax.set_ylabel("rollout accuracy (fresh prompts, T = 1)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_path(root / "rl_accuracy_curves.png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
    names = list(table)
    if names:
        fig, ax = plt.subplots(figsize=(6, 0.4 * len(names) + 1))
        means = [100 * table[n]["accuracy"][0] for n in names]
        halves = [0 if math.isnan(table[n]["accuracy"][1]) else 100 * table[n]["accuracy"][1]
                  for n in names]
        ax.barh(names, means, xerr=halves, color=["C0" if n in main else "C7" for n in names])
        ax.invert_yaxis()
        ax.set_xlabel("accuracy % (mean over seeds, 95% CI)")
        fig.tight_layout()
        with atomic_path(root / "accuracy.png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)

"""DVC stage ``report``: compare every evaluated checkpoint and every RL run in one place.

``python -m appo.stages.report [--outputs outputs] [--out outputs/report]`` reads
``<outputs>/eval/*/metrics.json`` (+ ``predictions.jsonl``), ``<outputs>/rl/*/metrics.json`` +
``metrics.jsonl`` and ``<outputs>/sft/metrics.json``, and writes atomically to ``--out``:

* ``report.md``: final accuracy per variant (base, sft, each RL algorithm) and benchmark / task
  family with 95% CIs, perception hit rate, rewards, training time; paired differences between
  variants with their 95% CI and whether each difference is inside it (not distinguishable);
* ``reward_curves.png``, ``accuracy_curves.png`` (per-step RL curves), ``final_accuracy.png``
  (bars with CI error bars), ``perception_hit_rate.png``;
* ``summary.json`` (DVC metrics), ``comparison.csv`` (the table ``python -m appo compare``
  prints), ``reward_curves.csv`` / ``train_accuracy_curves.csv`` / ``final_accuracy.csv``
  (``dvc plots``).

All of it is also logged as MLflow artifacts of a ``report`` run (:class:`RunLogger`), the
comparison and the differences as MLflow tables (no per-variant metrics: the stages' own runs
hold those, and the report's would crowd every chart of the experiment).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appo.config import BASELINES
from appo.io import atomic_path, atomic_write_json, atomic_write_text
from appo.tables import markdown, num, pct
from appo.tracking import read_metrics

# Display order; other variants (new algorithm presets) follow alphabetically.
ORDER = (*BASELINES, "grpo", "dapo", "appo", "appo-random", "appo-uniform", "tgrpo")
CURVES = {"reward": "reward_curves", "accuracy": "train_accuracy_curves"}


def variant_order(names) -> list[str]:
    names = set(names)
    return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


@dataclass
class Results:
    """Everything the report and ``appo compare --from-files`` read from ``outputs/``."""

    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant -> metrics.json
    correct: dict[str, dict[tuple[str, str], bool]] = field(default_factory=dict)  # per question
    families: dict[tuple[str, str], str] = field(default_factory=dict)  # question -> family
    rl: dict[str, dict[str, Any]] = field(default_factory=dict)  # algo -> metrics.json
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # algo -> jsonl rows
    sft: dict[str, Any] | None = None

    @property
    def variants(self) -> list[str]:
        return variant_order([*self.evals, *self.rl])

    @property
    def benchmarks(self) -> list[str]:
        return sorted({b for m in self.evals.values() for b in m.get("benchmarks", {})})

    @property
    def family_names(self) -> list[str]:
        return sorted({f for m in self.evals.values() for f in m.get("by_family", {})})


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def load_results(outputs: str | Path = "outputs", *, predictions: bool = True) -> Results:
    """Read the eval, RL and SFT results under ``outputs`` (missing pieces are skipped)."""
    root = Path(outputs)
    res = Results(sft=_read_json(root / "sft" / "metrics.json"))
    for path in sorted((root / "eval").glob("*/metrics.json")):
        variant = path.parent.name
        res.evals[variant] = json.loads(path.read_text())
        pred = path.parent / "predictions.jsonl"
        if predictions and pred.is_file():
            rows = [json.loads(line) for line in pred.read_text().splitlines() if line.strip()]
            key = [(str(r.get("benchmark")), str(r.get("problem_id"))) for r in rows]
            res.correct[variant] = {k: bool(r.get("correct")) for k, r in zip(key, rows)}
            res.families.update({k: str(r.get("family")) for k, r in zip(key, rows)})
    for path in sorted((root / "rl").glob("*/metrics.json")):
        res.rl[path.parent.name] = json.loads(path.read_text())
        res.curves[path.parent.name] = read_metrics(path.parent / "metrics.jsonl")
    return res


# --------------------------------------------------------------------------------------------
# tables


def comparison_rows(res: Results) -> list[dict[str, Any]]:
    """One row per variant: accuracy (+CI) per benchmark, hit rate, rewards, training time."""
    rows = []
    for variant in res.variants:
        m = res.evals.get(variant, {})
        source = m.get("provenance") or res.rl.get(variant, {}).get("provenance") or {}
        row: dict[str, Any] = {"variant": variant, "exp": source.get("dvc_exp"),
                               "config": source.get("config")}
        for bench in res.benchmarks:
            stats = m.get("benchmarks", {}).get(bench, {})
            lo, hi = stats.get("ci95") or (None, None)
            row[f"acc/{bench}"] = stats.get("accuracy")
            row[f"ci_lo/{bench}"], row[f"ci_hi/{bench}"] = lo, hi
            row[f"n/{bench}"] = stats.get("n")
        overall = m.get("overall", {})
        row["sampled_accuracy"] = overall.get("sampled_accuracy")
        row["perception_hit_rate"] = overall.get("perception_hit_rate")
        row["eval_reward"] = overall.get("reward")
        rl = res.rl.get(variant, {})
        row["rl_final_reward"] = rl.get("final_reward")
        row["rl_final_accuracy"] = rl.get("final_accuracy")
        train = rl if variant in res.rl else (res.sft or {}) if variant == "sft" else {}
        row["train_time_s"] = train.get("train_time_s")
        row["train_steps"] = train.get("steps")
        rows.append(row)
    return rows


def paired_difference(a: dict[tuple[str, str], bool], b: dict[tuple[str, str], bool],
                      keys: list[tuple[str, str]]) -> dict[str, Any] | None:
    """Accuracy difference a - b on the same questions: paired bootstrap 95% CI, exact McNemar
    p-value and the minimal detectable effect of this comparison (:mod:`appo.stats`).

    ``inside_ci``: the interval contains 0, i.e. the difference is within noise at this size.
    """
    from appo.stats import mcnemar, minimal_detectable_effect, paired_bootstrap

    shared = [k for k in keys if k in a and k in b]
    if not shared:
        return None
    xa, xb = [bool(a[k]) for k in shared], [bool(b[k]) for k in shared]
    boot = paired_bootstrap(xa, xb)
    test = mcnemar(xa, xb)
    discordant = (test["a_only"] + test["b_only"]) / len(shared)
    return {**boot, "p_value": test["p_value"], "a_only": test["a_only"],
            "b_only": test["b_only"], "mde": minimal_detectable_effect(len(shared), discordant)}


def comparison_pairs(variants: list[str]) -> list[tuple[str, str]]:
    """RL algorithms against each other (later minus earlier), each against sft, sft vs base."""
    rl = [v for v in variants if v not in BASELINES]
    pairs = [(rl[j], rl[i]) for i in range(len(rl)) for j in range(i + 1, len(rl))]
    if "sft" in variants:
        pairs += [(v, "sft") for v in rl]
        if "base" in variants:
            pairs.append(("sft", "base"))
    return pairs


def differences(res: Results) -> list[dict[str, Any]]:
    """Paired differences for every pair of :func:`comparison_pairs`, per benchmark and family."""
    groups: dict[str, list[tuple[str, str]]] = {}
    keys = sorted(res.families)
    for bench in res.benchmarks:
        groups[f"{bench}"] = [k for k in keys if k[0] == bench]
    for family in res.family_names:
        groups[f"family {family}"] = [k for k in keys if res.families[k] == family]
    out = []
    for a, b in comparison_pairs([v for v in res.variants if v in res.correct]):
        for group, group_keys in groups.items():
            d = paired_difference(res.correct[a], res.correct[b], group_keys)
            if d is not None:
                out.append({"a": a, "b": b, "group": group, **d})
    return out


def _acc_ci(stats: dict[str, Any]) -> str:
    if stats.get("accuracy") is None:
        return "-"
    lo, hi = stats.get("ci95") or (None, None)
    return f"{pct(stats['accuracy'])} [{pct(lo)}, {pct(hi)}]"


def render_markdown(res: Results, diffs: list[dict[str, Any]]) -> str:
    variants = res.variants
    lines = ["# APPO pipeline report", "",
             "Variants: `base` (init model), `sft` (SFT warm start) and one RL algorithm each, "
             "all trained from the same SFT checkpoint with the same data order, batch, G, lr "
             "and steps. Accuracy in %, 95% CI in brackets (Wilson).", ""]

    lines += ["## Final accuracy per benchmark", ""]
    rows = comparison_rows(res)
    sources = {(r["exp"], r["config"]) for r in rows}
    if len(sources) > 1:  # e.g. after `dvc exp run -S ...` reran only some variants
        lines += ["**Mixed sources**: the variants come from different DVC experiments or "
                  "params: " + "; ".join(f"{r['variant']}: exp {r['exp'] or '-'}, params "
                                        f"{r['config'] or '-'}" for r in rows) + ".", ""]
    sampled = any(row["sampled_accuracy"] is not None for row in rows)
    head = ["variant", *[f"{b} (n={_first_n(res, b)})" for b in res.benchmarks],
            *(["sampled acc % (T=1)"] if sampled else []),
            "perception hit %", "eval reward", "RL reward (last 5 steps)", "train time s"]
    table = []
    for row in rows:
        v = row["variant"]
        table.append([v, *[_acc_ci(res.evals.get(v, {}).get("benchmarks", {}).get(b, {}))
                          for b in res.benchmarks],
                      *([pct(row["sampled_accuracy"])] if sampled else []),
                      pct(row["perception_hit_rate"]), num(row["eval_reward"]),
                      num(row["rl_final_reward"]), num(row["train_time_s"], ".1f")])
    lines += markdown(head, table)

    if res.family_names:
        lines += ["## Accuracy per task family", ""]
        table = [[v, *[_acc_ci(res.evals.get(v, {}).get("by_family", {}).get(f, {}))
                       for f in res.family_names]] for v in variants if v in res.evals]
        lines += markdown(["variant", *res.family_names], table)

    if res.rl:
        lines += ["## RL training", ""]
        table = []
        for algo in variant_order(res.rl):
            m = res.rl[algo]
            table.append([algo, str(m.get("steps", "-")), num(m.get("final_reward")),
                          pct(m.get("final_accuracy")), num(m.get("train_time_s"), ".1f"),
                          str(m.get("skipped_steps", "-"))])
        lines += markdown(["algorithm", "steps", "final reward", "final train accuracy %",
                            "train time s", "skipped steps"], table)
        lines += ["![reward per step](reward_curves.png)", "",
                  "![training accuracy per step](accuracy_curves.png)", ""]
    if res.sft:
        lines += [f"SFT: {res.sft.get('steps', '-')} steps, final loss "
                  f"{num(res.sft.get('final_loss'), '.4f')}, "
                  f"{num(res.sft.get('train_time_s'), '.1f')} s.", ""]

    lines += ["## Differences and their 95% CI", "",
              "Paired over the same questions: d = correct(a) - correct(b) per question; 95% CI "
              "from 10,000 paired bootstrap resamples of the questions; p from the exact "
              "McNemar test on the questions only one of the two got right (a only / b only); "
              "MDE = the smallest true difference this comparison detects with 80% power. "
              "*inside CI* means the interval contains 0: not distinguishable from noise at "
              "this sample size.", ""]
    if diffs:
        table = [[f"{d['a']} - {d['b']}", d["group"],
                  "inside CI" if d["inside_ci"] else "**outside CI**", str(d["n"]),
                  f"{100 * d['diff']:+.1f}",
                  f"[{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]",
                  f"{d['a_only']} / {d['b_only']}", f"{d['p_value']:.3g}",
                  f"{100 * d['mde']:.1f}"] for d in diffs]
        lines += markdown(["a - b", "group", "verdict", "n", "diff pp", "95% CI pp",
                            "a only / b only", "McNemar p", "MDE pp"], table, text_columns=3)
        outside = [f"{d['a']} vs {d['b']} on {d['group']}" for d in diffs if not d["inside_ci"]]
        lines += [("Outside the CI (distinguishable): " + "; ".join(outside) + ".") if outside
                  else "Every difference is inside its 95% CI: none is distinguishable.", ""]
    else:
        lines += ["(no per-question predictions to compare)", ""]
    lines += ["![final accuracy](final_accuracy.png)", "",
              "![perception hit rate](perception_hit_rate.png)", ""]
    return "\n".join(lines)


def _first_n(res: Results, bench: str) -> str:
    for m in res.evals.values():
        n = m.get("benchmarks", {}).get(bench, {}).get("n")
        if n is not None:
            return str(n)
    return "?"


# --------------------------------------------------------------------------------------------
# machine-readable outputs


def summary(res: Results, diffs: list[dict[str, Any]]) -> dict[str, Any]:
    """DVC metrics: flat numbers per variant (``dvc metrics show`` / ``diff``)."""
    out: dict[str, Any] = {}
    for row in comparison_rows(res):
        v = row.pop("variant")
        entry = {k: x for k, x in row.items() if x is not None and not k.startswith("n/")
                 and k not in ("exp", "config")}
        overall = res.evals.get(v, {}).get("overall", {})
        if overall.get("accuracy") is not None:
            entry["accuracy"] = overall["accuracy"]
        for family, stats in res.evals.get(v, {}).get("by_family", {}).items():
            if stats.get("accuracy") is not None:
                entry[f"family/{family}"] = stats["accuracy"]
        out[v] = entry
    benchmarks = set(res.benchmarks)  # families stay in report.md: keep `dvc metrics` short
    out["differences"] = {f"{d['a']}-{d['b']}/{d['group']}": {
        "diff": d["diff"], "ci_lo": d["ci95"][0], "ci_hi": d["ci95"][1],
        "inside_ci": d["inside_ci"], "p_value": d["p_value"]} for d in diffs if d["group"] in benchmarks}
    return out


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    import pandas as pd

    return pd.DataFrame(rows, columns=columns).to_csv(index=False, float_format="%.6g")


def curve_table(res: Results, key: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Wide per-step table: ``step`` + one column per algorithm (blank where absent)."""
    algos = variant_order(res.curves)
    by_step: dict[int, dict[str, Any]] = {}
    for algo in algos:
        for r in res.curves[algo]:
            if key in r:
                by_step.setdefault(int(r["step"]), {"step": int(r["step"])})[algo] = r[key]
    return [by_step[s] for s in sorted(by_step)], ["step", *algos]


# --------------------------------------------------------------------------------------------
# plots


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


# one dash pattern and marker per curve: algorithms that learn alike draw the same line, and a
# colour alone would let the last one drawn hide the others
LINE_STYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 1)))
MARKERS = ("o", "s", "^", "D", "v", "x")


def curve_style(i: int) -> dict[str, Any]:
    """Matplotlib keyword arguments of the i-th curve of a plot (distinct dash and marker)."""
    return {"linestyle": LINE_STYLES[i % len(LINE_STYLES)], "marker": MARKERS[i % len(MARKERS)],
            "markevery": 0.1, "markersize": 4}


def plot_curves(res: Results, key: str, ylabel: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    window = 1
    for k, algo in enumerate(variant_order(res.curves)):
        pts = [(r["step"], r[key]) for r in res.curves[algo] if key in r]
        if not pts:
            continue
        steps, vals = zip(*pts)
        (line,) = ax.plot(steps, vals, alpha=0.3, linewidth=0.8)
        window = max(1, len(vals) // 10)
        smooth = [sum(vals[max(0, i - window + 1):i + 1]) / len(vals[max(0, i - window + 1):i + 1])
                  for i in range(len(vals))]
        ax.plot(steps, smooth, color=line.get_color(), linewidth=1.8, label=algo,
                **curve_style(k))
    if window > 1:
        ax.set_title(f"bold: moving average over {window} RL steps; faint: each step",
                     fontsize="small")
    ax.set_xlabel("RL step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # beside the axes: curves cross the whole plot
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    _save(fig, path)


def plot_final_accuracy(res: Results, path: Path) -> None:
    """Grouped bars: one group per benchmark and task family, one bar per variant, CI bars."""
    import matplotlib.pyplot as plt
    import numpy as np

    groups = [("benchmarks", b) for b in res.benchmarks] + \
        [("by_family", f) for f in res.family_names]
    variants = [v for v in res.variants if v in res.evals]
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(groups) * max(1, len(variants)) / 3), 4))
    width = 0.8 / max(1, len(variants))
    x = np.arange(len(groups))
    for i, v in enumerate(variants):
        acc, err = [], [[], []]
        for section, name in groups:
            s = res.evals[v].get(section, {}).get(name, {})
            a = s.get("accuracy")
            lo, hi = s.get("ci95") or (None, None)
            acc.append(100 * a if a is not None else np.nan)
            # clipped at 0: at 100% the interval's float upper end can sit an ulp below it
            err[0].append(max(0.0, 100 * (a - lo)) if None not in (a, lo) else 0.0)
            err[1].append(max(0.0, 100 * (hi - a)) if None not in (a, hi) else 0.0)
        bars = ax.bar(x + (i - (len(variants) - 1) / 2) * width, acc, width, yerr=err,
                      capsize=2, label=v)
        # every bar carries its value, so a 0% bar (the untrained base model) is not invisible
        ax.bar_label(bars, labels=["" if np.isnan(a) else f"{a:.0f}" for a in acc],
                     fontsize=6, padding=1)
    ax.set_xticks(x, [name if sec == "benchmarks" else f"family\n{name}" for sec, name in groups])
    ax.set_ylabel("accuracy % (95% CI)")
    ax.set_ylim(0, 115)  # headroom for the legend above the 100% line
    ax.set_yticks(range(0, 101, 20))
    ax.grid(axis="y", alpha=0.3)
    if variants:
        ax.legend(loc="upper center", ncol=min(len(variants), 6), fontsize="small")
    _save(fig, path)


def plot_hit_rate(res: Results, path: Path) -> None:
    import matplotlib.pyplot as plt

    variants = [v for v in res.variants if v in res.evals]
    rates = [res.evals[v].get("overall", {}).get("perception_hit_rate") for v in variants]
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.bar(variants, [100 * r if r is not None else 0.0 for r in rates], color="tab:green")
    for i, r in enumerate(rates):
        ax.annotate("-" if r is None else f"{100 * r:.1f}", (i, 100 * (r or 0)),
                    ha="center", va="bottom", fontsize="small")
    ax.set_ylabel("perception hit rate %")
    ax.set_ylim(0, 100)
    ax.set_title("most-attended frame is the key frame")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


# --------------------------------------------------------------------------------------------


def run(outputs: str | Path = "outputs", out_dir: str | Path = "outputs/report") -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    from appo.tracking import RunLogger

    res = load_results(outputs)
    if not res.evals and not res.rl:
        raise SystemExit(f"report: nothing to report under {outputs}/eval or {outputs}/rl")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    diffs = differences(res)
    summ = summary(res, diffs)

    rows = comparison_rows(res)
    atomic_write_text(out / "comparison.csv", _csv(rows, list(rows[0]) if rows else []))
    for key, name in CURVES.items():
        table, columns = curve_table(res, key)
        atomic_write_text(out / f"{name}.csv", _csv(table, columns))
    finals = []
    for v in res.variants:
        overall = res.evals.get(v, {}).get("overall", {})
        lo, hi = overall.get("ci95") or (None, None)
        finals.append({"variant": v, "accuracy": overall.get("accuracy"), "ci_lo": lo,
                       "ci_hi": hi, "n": overall.get("n")})
    atomic_write_text(out / "final_accuracy.csv",
                      _csv(finals, ["variant", "accuracy", "ci_lo", "ci_hi", "n"]))

    plot_curves(res, "reward", "mean reward", out / "reward_curves.png")
    plot_curves(res, "accuracy", "training accuracy", out / "accuracy_curves.png")
    plot_final_accuracy(res, out / "final_accuracy.png")
    plot_hit_rate(res, out / "perception_hit_rate.png")
    atomic_write_json(out / "summary.json", summ)
    atomic_write_text(out / "report.md", render_markdown(res, diffs))

    with RunLogger(out, "report", tags={"stage": "report"}) as logger:
        logger.log_params({"outputs": str(outputs), "variants": ",".join(res.variants)})
        logger.log_table(rows, "comparison.json")  # a table: per-variant metrics crowd charts
        logger.log_table([{"a": d["a"], "b": d["b"], "group": d["group"], "diff": d["diff"],
                           "ci_lo": d["ci95"][0], "ci_hi": d["ci95"][1],
                           "p_value": d["p_value"], "inside_ci": d["inside_ci"]}
                          for d in diffs], "differences.json")
        for name in ("report.md", "summary.json", "comparison.csv", "final_accuracy.csv",
                     *(f"{n}.csv" for n in CURVES.values()), "reward_curves.png",
                     "accuracy_curves.png", "final_accuracy.png", "perception_hit_rate.png"):
            logger.log_artifact(out / name)
    print(f"report: {len(res.evals)} evaluated variants, {len(res.rl)} RL runs; wrote "
          f"{out / 'report.md'}")
    return summ


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outputs", default="outputs", help="root of the stage outputs")
    parser.add_argument("--out", default="outputs/report", help="report directory")
    args = parser.parse_args(argv)
    run(args.outputs, args.out)


if __name__ == "__main__":
    main()

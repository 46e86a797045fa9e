"""``python -m appo compare``: the variants side by side, from MLflow or from ``outputs/``.

From files it is the report stage's comparison (:func:`appo.stages.report.comparison_rows`);
from MLflow each eval run is joined with its training run (the latest finished run of each
variant, or with ``all_runs`` one row per pipeline run).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def compare_from_files(outputs: str | Path = "outputs"):
    """One row per variant from ``outputs/{eval,rl,sft}`` (what the report stage reads)."""
    import pandas as pd

    from appo.stages.report import comparison_rows, load_results

    return pd.DataFrame(comparison_rows(load_results(outputs, predictions=False)))


def _variant(run: Any) -> str | None:
    """Which variant (base, sft, grpo, ...) an MLflow run belongs to."""
    tags = {k[5:]: v for k, v in run.items() if k.startswith("tags.") and isinstance(v, str)}
    if tags.get("algorithm"):
        return tags["algorithm"]
    name = tags.get("mlflow.runName", "")
    for prefix in ("eval-", "rl-"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return "sft" if tags.get("stage") == "sft" or name == "sft" else None


# DVC stage group -> the kind of run it logs (the baselines' evaluations are evaluations)
STAGE_KINDS = {"eval": "eval", "eval_baseline": "eval", "rl": "rl", "sft": "sft"}


def _kind(run: Any) -> str | None:
    stage = str(run.get("tags.dvc_stage") or run.get("tags.stage") or "")
    return STAGE_KINDS.get(stage.split("@", 1)[0])


def compare_from_mlflow(experiment: str | None = None, all_runs: bool = False):
    """Variants from the MLflow store: each eval run joined with its training run.

    Default: the latest finished run of each (variant, kind), i.e. the current results. With
    ``all_runs``, one row per (pipeline parent run, variant), newest pipeline first.
    """
    import mlflow
    import pandas as pd

    from appo.mlflow_setup import EXPERIMENT, configure

    configure(experiment)
    name = experiment or os.environ.get("APPO_EXPERIMENT", EXPERIMENT)
    runs = mlflow.search_runs(experiment_names=[name], output_format="pandas",
                              filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    if runs.empty:
        return pd.DataFrame()
    runs["variant"] = [_variant(r) for _, r in runs.iterrows()]
    runs["kind"] = [_kind(r) for _, r in runs.iterrows()]
    parent = runs.get("tags.mlflow.parentRunId", pd.Series(index=runs.index, dtype=object))
    runs["pipeline"] = parent.fillna("-") if all_runs else "latest"
    runs = runs[runs["variant"].notna() & runs["kind"].notna()]
    runs = runs.drop_duplicates(["pipeline", "variant", "kind"])  # newest first
    benches = sorted({c.split("/")[1] for c in runs.columns
                      if c.startswith("metrics.bench/") and c.endswith("/accuracy")})
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for _, r in runs.iterrows():
        row = rows.setdefault((r["pipeline"], r["variant"]),
                              {"pipeline": r["pipeline"], "variant": r["variant"]})
        for key in ("exp", "config"):  # where the row comes from (the eval run's, newest first)
            tag = r.get(f"tags.{'dvc_exp' if key == 'exp' else key}")
            if isinstance(tag, str) and not row.get(key):
                row[key] = tag
        if r["kind"] == "eval":
            for b in benches:
                row[f"acc/{b}"] = r.get(f"metrics.bench/{b}/accuracy")
                row[f"ci_lo/{b}"] = r.get(f"metrics.bench/{b}/accuracy_ci_lo")
                row[f"ci_hi/{b}"] = r.get(f"metrics.bench/{b}/accuracy_ci_hi")
            row["perception_hit_rate"] = r.get("metrics.overall/perception_hit_rate")
            row["eval_reward"] = r.get("metrics.overall/reward")
            row["eval_run"] = r["run_id"][:8]
        elif r["kind"] == "rl":
            row["rl_final_reward"] = r.get("metrics.final/final_reward")
            row["train_time_s"] = r.get("metrics.final/train_time_s")
            row["train_run"] = r["run_id"][:8]
        else:
            row["train_time_s"] = r.get("metrics.train_time_s")
            row["train_run"] = r["run_id"][:8]
    df = pd.DataFrame(list(rows.values()))
    from appo.stages.report import variant_order

    order = {v: i for i, v in enumerate(variant_order(df["variant"]))}
    pipelines = {p: i for i, p in enumerate(dict.fromkeys(runs["pipeline"]))}  # newest first
    df = df.sort_values(by=["pipeline", "variant"],
                        key=lambda s: s.map(pipelines if s.name == "pipeline" else order))
    return df if all_runs else df.drop(columns="pipeline")


def format_table(df) -> str:
    """Accuracy per benchmark as ``% [95% CI]``, rates in %, reward and seconds as numbers."""
    import pandas as pd

    from appo.tables import num

    if df.empty:
        return "(no results)"

    out = pd.DataFrame(index=df.index)
    if "pipeline" in df:  # a run id: its first 8 characters (variant names stay whole)
        out["pipeline"] = df["pipeline"].map(lambda p: p[:8] if isinstance(p, str) else p)
    if "variant" in df:
        out["variant"] = df["variant"]
    for col in ("exp", "config"):  # which DVC experiment and params each row comes from
        if col in df:
            out[col] = df[col].fillna("-")
    for col in df.columns:
        if col.startswith("acc/"):
            b = col[4:]
            lo, hi = df.get(f"ci_lo/{b}"), df.get(f"ci_hi/{b}")
            out[f"{b} acc % [95% CI]"] = [
                num(a * 100 if a is not None else None, ".1f")
                + ("" if lo is None or pd.isna(lo.iloc[i]) else
                   f" [{100 * lo.iloc[i]:.1f}, {100 * hi.iloc[i]:.1f}]")
                for i, a in enumerate(df[col])]
    labels = {"perception_hit_rate": "perception hit %", "eval_reward": "eval reward",
              "rl_final_reward": "RL reward", "train_time_s": "train time s"}
    for col, label in labels.items():
        if col in df:
            scale, fmt = (100, ".1f") if col == "perception_hit_rate" else (1, ".3f")
            fmt = ".1f" if col == "train_time_s" else fmt
            out[label] = [num(None if pd.isna(x) else x * scale, fmt) for x in df[col]]
    for col in ("eval_run", "train_run"):
        if col in df:
            out[col.replace("_", " ")] = df[col].fillna("-")
    return out.to_string(index=False)


def compare(from_files: bool = False, outputs: str = "outputs", experiment: str | None = None,
            all_runs: bool = False) -> str:
    df = (compare_from_files(outputs) if from_files
          else compare_from_mlflow(experiment, all_runs))
    return format_table(df)

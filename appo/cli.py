"""``python -m appo``: the pipeline's command line.

``python -m appo run`` reproduces the whole DVC pipeline (``dvc repro``: every stage whose code,
params or inputs changed) under one MLflow parent run; ``python -m appo stage NAME`` runs one
params-only stage without DVC; ``python -m appo compare`` prints the variants side by side
(from MLflow, or with ``--from-files`` from ``outputs/``); ``python -m appo experiment FILE``
runs a multi-seed experiment (:mod:`appo.experiment`) through the same pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

STAGES = ("data", "frames", "init_model", "sft")
# Every section a full params file is validated against before a pipeline run uses it.
SECTIONS = {"data": "DataConfig", "frames": "FramesConfig", "model": "ModelConfig",
            "sft": "SFTConfig", "rl": "RLConfig", "eval": "EvalConfig"}
BACKUP = ".params.yaml.orig"  # the user's params.yaml while a run's effective params replace it
RUNNER_ENV = "APPO_RUNNER_PID"  # set for dvc and the stages: the `appo run` they die with
_HEADER = "# effective params of `python -m appo run` pid {pid}; your own file is " + BACKUP


def run_stage(name: str, params: str) -> None:
    if name not in STAGES:
        raise SystemExit(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    importlib.import_module(f"appo.stages.{name}").main(["--params", params])


# --------------------------------------------------------------------------------------------
# DVC


def stage_env() -> dict[str, str]:
    """Environment for ``dvc repro``: this interpreter's ``python`` first on PATH (dvc.yaml
    runs ``python -m ...``), offline, analytics off, quiet progress bars. The MLflow parent run
    id (``APPO_PARENT_RUN_ID``) passes through from ``os.environ``."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("TQDM_MININTERVAL", "5")
    env[RUNNER_ENV] = str(os.getpid())
    return env


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "\nState:\tZ" in status.read_text())


def die_with_parent() -> None:
    """``preexec_fn`` of dvc: the kernel sends it SIGTERM when this process dies (Linux), so a
    killed ``appo run`` leaves no orphaned ``dvc repro``; the stages watch the runner pid."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def dvc_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


@contextlib.contextmanager
def working_dir(path: str | Path) -> Iterator[Path]:
    """chdir for the duration (contextlib.chdir needs Python 3.11): the MLflow store, the
    params file and the run tags are all resolved relative to the project."""
    old = Path.cwd()
    os.chdir(path)
    try:
        yield Path(path)
    finally:
        os.chdir(old)


# --------------------------------------------------------------------------------------------
# params: a run's effective params file


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"rl.algorithms.appo.perception.w_max=1.5"`` -> (path, 1.5); the value is YAML."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
        raise ValueError(f"override {text!r}: expected dotted.key=value")
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(params: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``params`` with each ``dotted.key=value`` set (missing mappings are created;
    :func:`validate_params` then rejects unknown keys)."""
    out = copy.deepcopy(params)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {text!r}: '{part}' is not a mapping")
            node = child
        node[path[-1]] = value
    return out


def validate_params(params: dict[str, Any]) -> None:
    """Strict check of every stage section (appo.config): unknown key or wrong type -> error."""
    from appo import config

    for section, cls in SECTIONS.items():
        config.from_dict(getattr(config, cls), params.get(section) or {}, section)


@contextlib.contextmanager
def params_installed(project: str | Path = ".", params_file: str | Path = "params.yaml",
                     overrides: Sequence[str] = (), keep: bool = False) -> Iterator[Path]:
    """Make ``params_file`` + ``overrides`` the project's params.yaml for the duration.

    DVC reads ``<project>/params.yaml``. With a different file or overrides, a validated
    temporary copy replaces it for the run and the original comes back afterwards (the outputs
    and dvc.lock then record the run's values, and ``dvc status`` shows the difference);
    ``keep=True`` leaves the effective params in place (comments are not preserved). The
    installed file names this process in its first line: if it is killed before restoring,
    stages refuse the file and the next call restores the user's (:func:`restore_params`).
    """
    from appo.config import load_yaml
    from appo.io import atomic_write_text

    project = Path(project).resolve()
    target = project / "params.yaml"
    restore_params(project)
    source = Path(params_file) if Path(params_file).is_absolute() else project / params_file
    if source.resolve() == target.resolve() and not overrides:
        yield target
        return
    import yaml

    params = apply_overrides(load_yaml(source), overrides)
    validate_params(params)
    backup = project / BACKUP
    if target.exists():
        os.replace(target, backup)
    try:
        header = _HEADER.format(pid=os.getpid())
        atomic_write_text(target, f"{header}\n{yaml.safe_dump(params, sort_keys=False)}")
        yield target
    finally:
        if backup.exists():
            if keep:
                backup.unlink()
            else:
                os.replace(backup, target)


def override_runner(project: str | Path = ".") -> int | None:
    """The pid of the ``appo run`` whose effective params are installed in ``project``
    (None when params.yaml is the user's own file)."""
    project = Path(project)
    if not (project / BACKUP).exists() or not (project / "params.yaml").is_file():
        return None
    with open(project / "params.yaml") as f:
        first = f.readline()
    prefix = _HEADER.split("{pid}")[0]
    pid = first[len(prefix):].split(";")[0] if first.startswith(prefix) else ""
    return int(pid) if pid.isdigit() else -1


def restore_params(project: str | Path = ".") -> None:
    """Put the user's params.yaml back when the run that installed overrides was killed
    before it could (SIGKILL, closed terminal); refuse while that run is still going."""
    project = Path(project)
    pid = override_runner(project)
    if pid is None:
        return
    if pid > 0 and alive(pid):
        raise RuntimeError(f"another `python -m appo run` (pid {pid}) is running with "
                           f"overrides in {project}; wait for it to finish")
    os.replace(project / BACKUP, project / "params.yaml")
    print(f"restored your params.yaml (the run that had replaced it, pid {pid}, was killed)")


# --------------------------------------------------------------------------------------------
# run


def run_pipeline(targets: Sequence[str] = (), *, force: bool = False, project: str | Path = ".",
                 params_file: str = "params.yaml", overrides: Sequence[str] = (),
                 keep_params: bool = False) -> None:
    """``dvc repro [targets]`` inside one MLflow parent run (children nest under it)."""
    from appo.mlflow_setup import parent_run

    project = Path(project).resolve()
    cmd = dvc_command("repro", *(["--force"] if force else []), *targets)
    with working_dir(project), \
            params_installed(project, params_file, overrides, keep_params), \
            parent_run("pipeline", tags={"runner": "appo run"},
                       params={"targets": " ".join(targets) or "all", "force": force,
                               "params_file": params_file,
                               "overrides": " ".join(overrides) or "-"},
                       artifacts=["outputs/report/report.md", "outputs/report/summary.json"]):
        proc = subprocess.run(cmd, env=stage_env(), check=False, preexec_fn=die_with_parent)
        if proc.returncode:
            raise SystemExit(f"error: dvc repro failed (exit {proc.returncode})")


# --------------------------------------------------------------------------------------------
# compare


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


def _kind(run: Any) -> str | None:
    stage = str(run.get("tags.dvc_stage") or run.get("tags.stage") or "")
    for kind in ("eval", "rl", "sft"):
        if stage == kind or stage.startswith(f"{kind}@"):
            return kind
    return None


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
    import math

    import pandas as pd

    if df.empty:
        return "(no results)"

    def num(x: Any, fmt: str) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

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


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="appo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="dvc repro the pipeline under one MLflow parent run")
    p_run.add_argument("targets", nargs="*", help="DVC stages (default: all)")
    p_run.add_argument("--params", default="params.yaml",
                       help="params file to run with (installed as params.yaml for the run)")
    p_run.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="params override, e.g. rl.steps=10 (repeatable)")
    p_run.add_argument("--keep-params", action="store_true",
                       help="keep the effective params.yaml after a run with --params/--set")
    p_run.add_argument("--force", action="store_true", help="rerun even unchanged stages")
    p_stage = sub.add_parser("stage", help="run one stage without DVC")
    p_stage.add_argument("name", choices=STAGES)
    p_stage.add_argument("--params", default="params.yaml")
    p_cmp = sub.add_parser("compare", help="table of the algorithm variants")
    p_cmp.add_argument("--from-files", action="store_true",
                       help="read outputs/ instead of querying MLflow")
    p_cmp.add_argument("--outputs", default="outputs", help="outputs root for --from-files")
    p_cmp.add_argument("--experiment", default=None, help="MLflow experiment (default appo)")
    p_cmp.add_argument("--all", dest="all_runs", action="store_true",
                       help="one row per pipeline run and variant (MLflow)")
    p_exp = sub.add_parser("experiment", help="multi-seed comparison / ablation (experiments/*.yaml)")
    p_exp.add_argument("file", help="experiment file, e.g. experiments/headline.yaml")
    p_exp.add_argument("--only", default=None, help="run just this variant")
    p_exp.add_argument("--aggregate-only", action="store_true",
                       help="rebuild the tables from the runs already collected")
    args = parser.parse_args(argv)
    from appo.config import ConfigError
    from appo.data.schema import DataError
    from appo.models.loading import ModelError

    try:
        if args.command == "run":
            run_pipeline(args.targets, force=args.force, params_file=args.params,
                         overrides=args.overrides, keep_params=args.keep_params)
        elif args.command == "compare":
            print(compare(args.from_files, args.outputs, args.experiment, args.all_runs))
        elif args.command == "experiment":
            from appo.experiment import render_markdown, run_experiment

            print(render_markdown(run_experiment(args.file, only=args.only,
                                                 aggregate_only=args.aggregate_only)))
        else:
            run_stage(args.name, args.params)
    except (ConfigError, DataError, ModelError, ValueError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()

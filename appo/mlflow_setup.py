"""MLflow defaults: tracking URI from MLFLOW_TRACKING_URI, else a local sqlite file.

Also the pipeline-wide run context. A pipeline execution (``python -m appo run``, the Prefect
flow) is one *parent* run; it exports its id as ``APPO_PARENT_RUN_ID`` and every stage process
started under it (``dvc repro`` passes the environment on) logs a *child* run nested under it.
Every run is tagged with :func:`context_tags`: git commit, DVC stage, algorithm, seed and the
data fingerprint.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

EXPERIMENT = "appo"
PARENT_ENV = "APPO_PARENT_RUN_ID"  # set by the parent run, read by the stages' RunLoggers
PARENT_TAG = "mlflow.parentRunId"  # what MLflow itself writes for a nested run
EXP_ENV = "DVC_EXP_NAME"  # set by `dvc exp run` for the stage commands it runs
# MLflow 3's UI opens an experiment without this tag in GenAI mode (traces, prompts); this
# project trains models, so its experiments open on runs, metrics and the compare view.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


def enabled() -> bool:
    """MLflow logging is on: the package imports and ``APPO_MLFLOW`` is not "0"."""
    if os.environ.get("APPO_MLFLOW", "1") == "0":
        return False
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return False
    return True


def tracking_uri(project: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the sqlite file ``mlflow.db`` of ``project``."""
    local = (Path(project) / "mlflow.db").resolve()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{local}"


def configure(experiment: str | None = None) -> str:
    """Point MLflow at the configured store and experiment; returns the tracking URI."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment(experiment or os.environ.get("APPO_EXPERIMENT", EXPERIMENT))
    if exp.tags.get(KIND_TAG) != KIND:
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
    return uri


def git_commit(path: str | Path | None = None) -> str:
    """HEAD of the git repository at ``path`` (default: the working directory; "unknown"
    outside one)."""
    return _git_commit(str(Path(path).resolve()) if path else os.getcwd())


@functools.cache
def _git_commit(cwd: str) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=cwd, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def data_fingerprint(data_dir: str | Path | None = None) -> str | None:
    """sha256 (first 16 hex) over the names and bytes of ``<data_dir>/*.json``; None if none.

    ``data_dir`` defaults to ``data.out_dir`` of ./params.yaml (else ``data/dataset``).
    """
    root = Path(data_dir) if data_dir is not None else Path(_params().get("data_dir",
                                                                          "data/dataset"))
    files = sorted(root.glob("*.json")) if root.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _params() -> dict[str, object]:
    """The two values the tags need from ./params.yaml (``APPO_PARAMS`` names another file)."""
    path = Path(os.environ.get("APPO_PARAMS", "params.yaml"))
    try:
        import yaml

        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, ValueError, ImportError):
        return {}
    if not isinstance(raw, dict):
        return {}
    out: dict[str, object] = {}
    if "seed" in raw:
        out["seed"] = raw["seed"]
    data = raw.get("data")
    if isinstance(data, dict) and data.get("out_dir"):
        out["data_dir"] = data["out_dir"]
    return out


def params_fingerprint(path: str | Path | None = None) -> str:
    """sha256 (first 8 hex) of the parsed params file ("-" if unreadable): two results with
    different fingerprints come from different configurations (comments do not count)."""
    path = Path(path or os.environ.get("APPO_PARAMS", "params.yaml"))
    try:
        import json

        import yaml

        raw = yaml.safe_load(path.read_text())
    except (OSError, ValueError, ImportError):
        return "-"
    text = json.dumps(raw, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def provenance() -> dict[str, str]:
    """Where a result comes from: the DVC experiment (``dvc exp run`` names each one in
    ``DVC_EXP_NAME``; "-" outside one) and the params fingerprint. Stored with every result
    (MLflow tags, the stages' metrics.json) so tables never mix configurations silently."""
    return {"dvc_exp": os.environ.get(EXP_ENV) or "-", "config": params_fingerprint()}


def experiment_parent(name: str) -> str:
    """The MLflow run grouping DVC experiment ``name``'s stage runs (found by its tags, else
    created, already finished), so a ``dvc exp run`` nests like a pipeline run does instead of
    leaving its runs at top level. Assumes :func:`configure` ran."""
    import mlflow

    query = f"tags.dvc_exp = '{name}' and tags.dvc_stage = 'experiment'"
    found = mlflow.search_runs(filter_string=query, max_results=1, output_format="list")
    if found:
        return found[0].info.run_id
    client = mlflow.MlflowClient()
    experiment = mlflow.get_experiment_by_name(os.environ.get("APPO_EXPERIMENT", EXPERIMENT))
    run = client.create_run(experiment.experiment_id, run_name=f"exp {name}", tags={
        "git_commit": git_commit(), "dvc_stage": "experiment", "dvc_exp": name,
        "dvc_exp_baseline": os.environ.get("DVC_EXP_BASELINE_REV", "-")})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def context_tags(tags: dict[str, str] | None = None) -> dict[str, str]:
    """Tags of a new run: git commit, DVC stage, algorithm, seed, data fingerprint, + ``tags``.

    The DVC stage comes from ``DVC_STAGE`` (set by ``dvc repro``); for a foreach stage such as
    ``rl@appo`` or ``eval_baseline@sft`` the item is the run's ``algorithm`` (the variant compared).
    Also :func:`provenance` (``dvc_exp``, ``config``). Explicit ``tags`` win. The parent is the
    open pipeline run (``APPO_PARENT_RUN_ID``), else, under ``dvc exp run``, the experiment's
    run (:func:`experiment_parent`); otherwise there is none.
    """
    out = {"git_commit": git_commit()}
    stage = os.environ.get("DVC_STAGE")
    if stage:
        out["dvc_stage"] = stage
        if "@" in stage:
            out["algorithm"] = stage.split("@", 1)[1]
    params = _params()
    if "seed" in params:
        out["seed"] = str(params["seed"])
    fingerprint = data_fingerprint(params.get("data_dir", "data/dataset"))
    if fingerprint:
        out["data_fingerprint"] = fingerprint
    out.update(provenance())
    out.update({k: str(v) for k, v in (tags or {}).items()})
    parent = os.environ.get(PARENT_ENV)
    if not parent and out["dvc_exp"] != "-":
        parent = experiment_parent(out["dvc_exp"])
    if parent:
        out[PARENT_TAG] = parent
    return out


@contextlib.contextmanager
def parent_run(run_name: str = "pipeline", tags: dict[str, str] | None = None,
               params: dict[str, object] | None = None,
               artifacts: list[str | Path] = ()) -> Iterator[str | None]:
    """One MLflow parent run around a pipeline execution; yields its id (None when off).

    While it is open ``APPO_PARENT_RUN_ID`` holds its id, so stage processes started from here
    nest their runs under it. On success the ``artifacts`` that exist (e.g. the report) are
    logged to it; it ends FAILED if the body raises.
    """
    if not enabled():
        yield None
        return
    import mlflow

    configure()
    previous = os.environ.get(PARENT_ENV)  # a pipeline started inside another one nests in it
    run = mlflow.start_run(run_name=run_name,
                           tags=context_tags({"dvc_stage": "pipeline", **(tags or {})}))
    if params:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    os.environ[PARENT_ENV] = run.info.run_id
    status = "FAILED"
    try:
        yield run.info.run_id
        for path in artifacts:
            if Path(path).is_file():
                mlflow.log_artifact(str(path))
        status = "FINISHED"
    finally:
        fingerprint = data_fingerprint()  # the data stage may have just written the data
        if fingerprint:
            mlflow.set_tag("data_fingerprint", fingerprint)
        mlflow.end_run(status=status)
        if previous is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = previous


def run_url(run_id: str) -> str:
    """The run's page in the MLflow UI (``make mlflow-ui``; ``APPO_MLFLOW_UI`` names another
    address), for links from other tools such as Prefect."""
    import mlflow

    base = os.environ.get("APPO_MLFLOW_UI", "http://127.0.0.1:5000").rstrip("/")
    experiment = mlflow.get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{experiment}/runs/{run_id}"

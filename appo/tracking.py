"""One small logging interface for every stage: a JSONL metrics file, plus MLflow when present.

Stages call ``log_params`` / ``log_metrics(step=...)`` / ``log_artifact`` on a :class:`RunLogger`
and never import MLflow themselves, so the core library runs where MLflow is not installed
(the GPU machine) and the MLflow wiring lives in one place.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: MLflow params are flat."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. ]+")


def metric_key(key: str) -> str:
    """``key`` as a metric name MLflow accepts, with its ``/`` hierarchy kept.

    Names come from the data (a VideoMMMU ``data_source`` is a URL): MLflow rejects characters
    outside ``[A-Za-z0-9_-. /]`` and any path that is not already normalised (``//``, ``.``
    or ``..`` components, a leading ``/``). Each ``/`` component is cleaned on its own and
    empty ones dropped, so ``family/https://a.io/x/accuracy`` -> ``family/https_/a.io/x/accuracy``.
    """
    parts = []
    for part in key.split("/"):
        part = _KEY_BAD_CHARS.sub("_", part).strip()
        if part in (".", ".."):
            part = part.replace(".", "_")
        if part:
            parts.append(part)
    return "/".join(parts) or "_"


class RunLogger:
    """Per-step metrics to ``<out>/metrics.jsonl`` (appended, flushed) and, if enabled, MLflow.

    ``out_dir`` None: MLflow only, no file (the data, frames and init_model stages, whose
    output folders are DVC outputs that must not change with logging).
    ``mlflow`` is None (auto: on when the package imports and ``APPO_MLFLOW`` is not "0"),
    True or False. ``run_id`` resumes an existing MLflow run after a restart. A new run gets
    :func:`appo.mlflow_setup.context_tags` (git commit, DVC stage, algorithm, seed, data
    fingerprint; ``tags`` win) and, when ``APPO_PARENT_RUN_ID`` is set (a pipeline run is
    open), is nested under that parent run.
    """

    def __init__(self, out_dir: str | Path | None, run_name: str, *,
                 mlflow: bool | None = None, tags: dict[str, str] | None = None,
                 run_id: str | None = None, nested: bool = False) -> None:
        self.path = Path(out_dir) / "metrics.jsonl" if out_dir is not None else None
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        self._mlflow = None
        self.run_id: str | None = None
        if mlflow is None:
            from appo.mlflow_setup import enabled

            mlflow = enabled()
        if mlflow:
            import mlflow as mlf

            from appo.mlflow_setup import PARENT_TAG, configure, context_tags

            configure()
            if run_id is None:
                tags = context_tags(tags)
                if nested and mlf.active_run() is not None:
                    tags.pop(PARENT_TAG, None)  # in-process nesting: MLflow links the parent
            run = mlf.start_run(run_id=run_id, run_name=None if run_id else run_name,
                                nested=nested, tags=tags)
            self._mlflow, self.run_id = mlf, run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if self._mlflow is not None:
            flat = {k: str(v)[:500] for k, v in flatten(params).items()}
            self._mlflow.log_params(flat)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {metric_key(k): float(v) for k, v in metrics.items() if v is not None}
        if self._file is not None:
            self._file.write(json.dumps({"step": step, **clean}) + "\n")
            self._file.flush()
        if self._mlflow is not None:
            finite = {k: v for k, v in clean.items() if math.isfinite(v)}
            self._mlflow.log_metrics(finite, step=step)

    def log_artifact(self, path: str | Path) -> None:
        if self._mlflow is not None and Path(path).exists():
            self._mlflow.log_artifact(str(path))

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        """``rows`` as one MLflow table artifact ``name`` (.json): a comparison across
        variants belongs in one table, not in per-variant metrics that crowd every chart."""
        if self._mlflow is not None and rows:
            import pandas as pd

            self._mlflow.log_table(pd.DataFrame(rows), artifact_file=name)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._mlflow is not None:
            self._mlflow.set_tags(tags)

    def close(self, status: str = "FINISHED") -> None:
        if self._file is not None:
            self._file.close()
        if self._mlflow is not None:
            self._mlflow.end_run(status=status)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type else "FINISHED")


class NullLogger:
    """The RunLogger interface doing nothing: for the non-main processes of a launch."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self) -> NullLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass


def _rows(text: str) -> list[tuple[str, dict[str, float]]]:
    """(line, row) pairs of a metrics.jsonl text, skipping lines that do not parse.

    A full disk or a kill can leave a torn last line (and the next run appends right after
    it); such a line is not a metric, and refusing the whole file would make the run
    unresumable without hand-editing.
    """
    pairs = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            pairs.append((line, row))
    return pairs


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """Rows of a metrics.jsonl file (for reports and tests); torn lines are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    return [row for _, row in _rows(path.read_text())]


def open_run(out_dir: str | Path, run_name: str, *, run_id: str | None = None,
             tags: dict[str, str] | None = None, main: bool = True) -> RunLogger | NullLogger:
    """A RunLogger that reopens MLflow run ``run_id`` after a resume, else starts a new run
    (a :class:`NullLogger` on the non-main processes of a launch: one run, one file)."""
    if not main:
        return NullLogger()
    if run_id is not None:
        try:
            return RunLogger(out_dir, run_name, run_id=run_id, tags=tags)
        except Exception as exc:  # the MLflow store was reset or moved: log into a new run
            print(f"{run_name}: cannot reopen MLflow run {run_id} ({exc}); starting a new run")
    return RunLogger(out_dir, run_name, tags=tags)


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Drop metric rows a crashed run logged after its last checkpoint (they are redone),
    and any torn line a kill or a full disk left; ``last_step < 0`` empties the file (a
    fresh start must not append to an earlier attempt's rows)."""
    from appo.io import atomic_write_text

    path = Path(path)
    if not path.is_file():
        return
    text = path.read_text()
    kept = [line for line, row in _rows(text) if row.get("step", 0) <= last_step]
    new = "".join(line + "\n" for line in kept)
    if new != text:
        atomic_write_text(path, new)

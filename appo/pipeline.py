"""The pipeline as a library: DVC calls, a run's params overlay and the stages' environment.

Used by the command line (:mod:`appo.cli`), the Prefect flows (``flows/``) and the multi-seed
experiments (:mod:`appo.experiment`):

- :func:`run_pipeline`: ``dvc repro [targets]`` under one MLflow parent run;
- :func:`params_installed`: a params file plus ``dotted.key=value`` overrides installed as the
  project's ``params.yaml`` for the duration of a run (validated first; the user's file comes
  back afterwards, also after a kill: :func:`restore_params`);
- :func:`stage_env`, :func:`die_with_parent`, :func:`alive`: the environment DVC and the stages
  run in, and how they stop when the runner dies.

It imports no stage: DVC runs the stages as subprocesses.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Every section a full params file is validated against before a pipeline run uses it.
SECTIONS = {"data": "DataConfig", "frames": "FramesConfig", "model": "ModelConfig",
            "sft": "SFTConfig", "rl": "RLConfig", "eval": "EvalConfig"}
BACKUP = ".params.yaml.orig"  # the user's params.yaml while a run's effective params replace it
RUNNER_ENV = "APPO_RUNNER_PID"  # set for dvc and the stages: the `appo run` they die with
_HEADER = "# effective params of `python -m appo run` pid {pid}; your own file is " + BACKUP


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

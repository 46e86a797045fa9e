"""The pipeline as a library: DVC calls, a run's params overrides and the stages' environment.

Used by the command line (:mod:`appo.cli`), the Prefect flows (``flows/``) and the multi-seed
experiments (:mod:`appo.experiment`):

- :func:`run_pipeline`: ``dvc repro [targets]`` under one MLflow parent run;
- a params file plus ``dotted.key=value`` overrides is checked before anything runs, and
  such a run happens in its own workspace, never in the user's params.yaml
  (:mod:`appo.workspace`);
- :func:`stage_env`, :func:`die_with_parent`, :func:`alive`: the environment DVC and the stages
  run in, and how they stop when the runner dies.

It imports no stage: DVC runs the stages as subprocesses.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

RUNNER_ENV = "APPO_RUNNER_PID"  # set for dvc and the stages: the `appo run` they die with


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
# run


def run_pipeline(targets: Sequence[str] = (), *, force: bool = False, project: str | Path = ".",
                 params_file: str = "params.yaml", overrides: Sequence[str] = ()) -> Path:
    """``dvc repro [targets]`` inside one MLflow parent run (children nest under it); with
    another params file or overrides, in the run's workspace (:mod:`appo.workspace`).
    Returns the folder the run happened in (its ``outputs/`` hold the results)."""
    from appo.mlflow_setup import parent_run
    from appo.workspace import run_workspace

    project = Path(project).resolve()
    cmd = dvc_command("repro", *(["--force"] if force else []), *targets)
    with run_workspace(project, params_file, overrides) as where, working_dir(where), \
            parent_run("pipeline", tags={"runner": "appo run"},
                       params={"targets": " ".join(targets) or "all", "force": force,
                               "params_file": params_file,
                               "overrides": " ".join(overrides) or "-"},
                       artifacts=["outputs/report/report.md", "outputs/report/summary.json"]):
        proc = subprocess.run(cmd, env=stage_env(), check=False, preexec_fn=die_with_parent)
        if proc.returncode:
            raise SystemExit(f"error: dvc repro failed (exit {proc.returncode})")
    return where

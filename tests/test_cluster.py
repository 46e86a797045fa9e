"""A sweep fanned out over Prefect workers (flows/cluster.py), on 127.0.0.1 only.

The team services (``python -m flows.cluster services``: Prefect server, MLflow server, a
local-directory DVC remote), two workers in clones of their own, and a two-seed micro
experiment submitted with ``--pool`` from a third clone: the shared upstream runs once, each
seed lands on a different worker, the results come back through MLflow, and the aggregate
equals the sequential path's for the same seeds. Every process the test starts is stopped by
its process group at the end, also on failure.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from appo.workspace import apply_overrides
from flows.cluster import stop_process_groups

sys.path.insert(0, str(Path(__file__).parent))
from test_dag import MICRO, ROOT, _dvc, _env, _run  # noqa: E402

GIT = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
EXPERIMENT = {"name": "fan", "split": "test", "seeds": [0, 1], "algorithms": ["grpo"]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _micro_repo(repo: Path, env: dict[str, str]) -> None:
    """The project with micro params and the experiment file, committed (clones need it)."""
    import shutil

    repo.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("appo", "flows"):
        shutil.copytree(ROOT / name, repo / name, ignore=ignore)
    for name in ("dvc.yaml", "pyproject.toml", ".gitignore", ".dvcignore"):
        shutil.copy2(ROOT / name, repo / name)
    params = apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), MICRO)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "experiments").mkdir()
    (repo / "experiments" / "fan.yaml").write_text(yaml.safe_dump(EXPERIMENT))
    _run(["git", "init", "-q"], repo, env)
    _dvc(repo, env, "init", "-q")
    _dvc(repo, env, "config", "core.analytics", "false")
    _dvc(repo, env, "config", "core.check_update", "false")
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "micro"], repo, env)


def _wait_for(path: Path, procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead, f"exited early: {dead}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout:.0f}s"
        time.sleep(1)


def _comparable(results: dict) -> dict:
    """What must not depend on where a run ran (train time does)."""
    return {"table": {k: {f: v[f] for f in ("seeds", "accuracy", "families",
                                            "perception_hit_rate", "final_reward")}
                      for k, v in results["table"].items()},
            "baselines": results["baselines"], "differences": results["differences"]}


@pytest.mark.slow
def test_sweep_fans_out_over_two_workers_and_equals_the_sequential_path(tmp_path):
    env = {**_env(tmp_path), **GIT, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_HOME": str(tmp_path / "client-prefect")}
    env.pop("MLFLOW_TRACKING_URI")
    submitter = tmp_path / "submitter"
    _micro_repo(submitter, env)
    team = tmp_path / "team"
    prefect_port, mlflow_port = _free_port(), _free_port()
    procs: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, args: list[str], cwd: Path, run_env: dict[str, str]) -> None:
        out = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=run_env,
                                      stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True))

    try:
        start("services", ["flows.cluster", "services", "--dir", str(team),
                           "--prefect-port", str(prefect_port), "--mlflow-port",
                           str(mlflow_port)], submitter, env)
        _wait_for(team / "env.sh", procs, timeout=240)
        exports = dict(line.removeprefix("export ").split("=", 1)
                       for line in (team / "env.sh").read_text().splitlines())
        assert exports["PREFECT_API_URL"] == f"http://127.0.0.1:{prefect_port}/api"
        cluster_env = {**env, "PREFECT_API_URL": exports["PREFECT_API_URL"],
                       "MLFLOW_TRACKING_URI": exports["MLFLOW_TRACKING_URI"]}
        _run([sys.executable, "-m", "flows.cluster", "deploy", "--pool", "fan"], submitter,
             cluster_env)
        for name in ("w1", "w2"):  # one clone and one worker each
            _run(["git", "clone", "-q", str(submitter), str(tmp_path / name)], tmp_path, env)
            start(name, ["flows.cluster", "worker", "--pool", "fan", "--name", name,
                         "--dvc-remote", exports["APPO_DVC_REMOTE"]], tmp_path / name,
                  cluster_env)

        out = _run([sys.executable, "-m", "appo", "experiment", "experiments/fan.yaml",
                    "--pool", "fan"], submitter, cluster_env)
        assert "sweep: main seed 0: completed" in out and "sweep: main seed 1: completed" in out
        root = submitter / "outputs" / "experiments" / "fan"
        swept = json.loads((root / "results.json").read_text())
        assert swept["table"]["grpo"]["seeds"] == [0, 1] and "sft" in swept["baselines"]

        import mlflow

        mlflow.set_tracking_uri(exports["MLFLOW_TRACKING_URI"])
        runs = mlflow.search_runs(experiment_names=["appo"], output_format="pandas")
        per_seed = runs[runs["tags.appo_sweep_run"].notna()]
        assert sorted(per_seed["tags.prefect_worker"]) == ["w1", "w2"]  # one seed each
        assert sorted(n.split("/", 1)[1] for n in per_seed["tags.mlflow.runName"]) == [
            "main/seed-0", "main/seed-1"]
        stages = runs["tags.dvc_stage"].tolist()
        assert stages.count("sft") == 1  # trained once, restored from the remote by the other
        assert stages.count("rl@grpo") == 2
        assert not (submitter / "outputs" / "runs").exists()  # the submitter ran nothing

        # the sequential path, here, for the same seeds: the same aggregate
        sequential_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'seq.db'}"}
        _run([sys.executable, "-m", "appo", "experiment", "experiments/fan.yaml"], submitter,
             sequential_env)
        sequential = json.loads((root / "results.json").read_text())
        assert _comparable(swept) == _comparable(sequential)
    except BaseException:
        for log in sorted(logs.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")
        raise
    finally:
        stop_process_groups(procs)


def test_a_sweep_needs_team_services_and_a_clone_at_the_sweeps_commit(tmp_path, monkeypatch):
    from appo.config import ConfigError
    from appo.mlflow_setup import git_commit
    from flows.cluster import check_services
    from flows.pipeline import check_commit

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(ConfigError, match="PREFECT_API_URL"):
        check_services()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")  # one machine's store
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI=http"):
        check_services()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    check_services()

    head = git_commit(ROOT)
    assert len(head) == 40
    check_commit(ROOT, head)
    check_commit(ROOT, None)  # not a sweep: no check
    with pytest.raises(RuntimeError, match=r"is at git commit \w{12}, the sweep at 000000000000"):
        check_commit(ROOT, "0" * 40)

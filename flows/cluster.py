"""Past one machine: an experiment's runs fanned out over Prefect workers.

Every machine (or every GPU) runs one worker in its own clone of the project, at the git commit
the sweep starts from; any machine submits:

    python -m flows.cluster worker --pool gpus --dvc-remote URL   # in each clone, once
    python -m appo experiment experiments/headline.yaml --pool gpus

The submitter (:func:`pool_fan_out`) creates the pool's deployment of the pipeline flow
(``appo-pipeline/pool-<pool>``), runs the experiment's shared upstream (data, frames, the SFT
warm start, the baselines' evaluations) once as the first flow run, then submits every
(variant, seed) at once. A worker takes one flow run at a time (``--limit 1``) and runs it in
its clone (``APPO_PROJECT``; the run's workspace below it): ``dvc fetch --run-cache`` from the
team remote first, so whatever any machine already ran is restored instead of run again, then
the stages, then ``dvc push --run-cache``. The flow logs the run's result files to its MLflow
parent run on the team server, where the submitter collects them into
``outputs/experiments/<name>/<variant>/seed-<s>/`` and aggregates exactly as the sequential
path does. A failed run is reported by name; ``--only VARIANT --seed S`` retries it alone.

Every machine needs ``PREFECT_API_URL`` and ``MLFLOW_TRACKING_URI`` set to the team services
(``make team-services`` prints both) and a default DVC remote (``--dvc-remote``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appo.config import BASELINES, ConfigError
from appo.experiment import RunSpec
from flows.pipeline import PROJECT_ENV, pipeline
from flows.serve import api_up

FLOW = "appo-pipeline"
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def deployment_name(pool: str) -> str:
    return f"{FLOW}/pool-{pool}"


def check_services() -> None:
    """A sweep needs servers every machine can reach: not the ephemeral Prefect server or the
    local sqlite MLflow store of one checkout."""
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError("a sweep over a pool needs PREFECT_API_URL (the team Prefect server; "
                          "make team-services prints it)", key="PREFECT_API_URL")
    if not os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        raise ConfigError("a sweep over a pool needs MLFLOW_TRACKING_URI=http://... (the team "
                          "MLflow server, where workers log results)", key="MLFLOW_TRACKING_URI")


def deploy(pool: str) -> str:
    """The pool (process type) and the pipeline flow's deployment on it, created or updated.

    A worker's flow run starts in its clone: the one pull step changes to ``$APPO_PROJECT``,
    which ``python -m flows.cluster worker`` sets, so the same deployment serves clones at
    different paths."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.callables import parameter_schema

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        flow_id = client.create_flow_from_name(FLOW)
        client.create_deployment(
            flow_id=flow_id, name=f"pool-{pool}", work_pool_name=pool,
            entrypoint="flows/pipeline.py:pipeline", tags=["appo", "sweep"],
            description="one run of an experiment sweep (python -m appo experiment --pool)",
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {
                "directory": "{{ $" + PROJECT_ENV + " }}"}}],
            parameter_openapi_schema=parameter_schema(pipeline).model_dump_for_openapi())
    return deployment_name(pool)


def submit(deployment: str, name: str, parameters: dict[str, Any]) -> Any:
    """One flow run of ``deployment``, scheduled now; returns its id without waiting."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters=parameters, flow_run_name=name, timeout=0,
                         tags=["appo", "sweep"])
    return run.id


def wait(runs: dict[str, Any], poll: float = 3.0, hint_after: float = 120.0,
         pool: str = "") -> dict[str, str]:
    """Poll the flow runs until each is final; prints each as it ends. Returns label -> state
    name. Warns once when none has started after ``hint_after`` seconds (no worker?)."""
    from prefect.client.orchestration import get_client

    states: dict[str, str] = {}
    start, hinted = time.monotonic(), False
    with get_client(sync_client=True) as client:
        while len(states) < len(runs):
            started = False
            for label, run_id in runs.items():
                if label in states:
                    continue
                state = client.read_flow_run(run_id).state
                kind = state.type.value if state else "PENDING"
                started |= kind not in ("SCHEDULED", "PENDING")
                if kind in FINAL:
                    states[label] = kind
                    print(f"sweep: {label}: {kind.lower()} ({len(states)}/{len(runs)})",
                          flush=True)
            if not started and not hinted and time.monotonic() - start > hint_after:
                print(f"sweep: no run has started after {hint_after:.0f}s; is a worker up? "
                      f"python -m flows.cluster worker --pool {pool}", flush=True)
                hinted = True
            if len(states) < len(runs):
                time.sleep(poll)
    return states


def fetch_results(run_tag: str, dest: Path) -> None:
    """The ``results/`` a worker's flow logged to the MLflow run tagged ``appo_sweep_run =
    run_tag``, copied into ``dest`` (the sequential path's layout)."""
    import mlflow

    from appo.io import atomic_path
    from appo.mlflow_setup import EXPERIMENT, configure

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # 12 bars per run
    configure()
    runs = mlflow.search_runs(experiment_names=[os.environ.get("APPO_EXPERIMENT", EXPERIMENT)],
                              filter_string=f"tags.appo_sweep_run = '{run_tag}'",
                              order_by=["start_time DESC"], max_results=1, output_format="list")
    if not runs:
        raise RuntimeError(f"no MLflow run tagged appo_sweep_run={run_tag}")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=runs[0].info.run_id,
                                                         artifact_path="results", dst_path=tmp))
        for src in sorted(p for p in local.rglob("*") if p.is_file()):
            target = dest / src.relative_to(local)
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as part:
                shutil.copyfile(src, part)


def pool_fan_out(pool: str) -> Callable[[Path, list[RunSpec]], dict[str, str]]:
    """The fan-out of :func:`appo.experiment.run_experiment` over the workers of ``pool``:
    returns label -> reason for the runs that failed (the others are collected)."""

    def fan_out(project: Path, specs: list[RunSpec]) -> dict[str, str]:
        from appo.mlflow_setup import git_commit

        check_services()
        deployment = deploy(pool)
        sweep = f"{specs[0].experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
        common = {"expect_commit": git_commit(), "sync": True}
        print(f"sweep {sweep}: {len(specs)} runs on pool {pool!r} ({deployment})", flush=True)
        first = specs[0]
        warm = submit(deployment, f"{sweep}-upstream", {
            **common, "overrides": first.overrides, "algorithms": first.variant.algorithms,
            "stages": ["sft", *(f"eval_baseline@{b}" for b in BASELINES)],
            "tags": {"appo_sweep": sweep}})
        state = wait({"shared upstream (data, SFT, baselines)": warm}, pool=pool)
        if set(state.values()) != {"COMPLETED"}:
            return {s.label: "the shared upstream run failed (see its Prefect logs)"
                    for s in specs}
        tag = {s.label: f"{sweep}/{s.variant.name}/seed-{s.seed}" for s in specs}
        runs = {s.label: submit(deployment, f"{sweep}-{s.variant.name}-seed{s.seed}", {
            **common, "overrides": s.overrides, "algorithms": s.variant.algorithms,
            "stages": s.targets, "publish_results": True,
            "tags": {"appo_sweep": sweep, "appo_sweep_run": tag[s.label]}}) for s in specs}
        states = wait(runs, pool=pool)
        failures = {label: f"flow run {kind.lower()} (see its Prefect logs)"
                    for label, kind in states.items() if kind != "COMPLETED"}
        for s in specs:
            if s.label not in failures:
                try:
                    fetch_results(tag[s.label], s.dest)
                except Exception as exc:  # noqa: BLE001 - reported by name with the others
                    failures[s.label] = f"results not collected: {exc}"
        return failures

    return fan_out


def worker(pool: str, project: Path, name: str | None, dvc_remote: str | None,
           limit: int) -> None:
    """``prefect worker start`` for this clone: its flow runs start in ``project``
    (``APPO_PROJECT``) and import its code (``PYTHONPATH``); ``dvc_remote`` becomes the
    clone's default DVC remote (local config, not committed)."""
    from appo.pipeline import dvc_command

    if dvc_remote:
        subprocess.run(dvc_command("remote", "add", "--local", "--force", "--default", "team",
                                   dvc_remote), cwd=project, check=True)
    env = {**os.environ, PROJECT_ENV: str(project),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(project),
                                                       os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type",
           "process", "--limit", str(limit), *(["--name", name] if name else [])]
    print(f"worker for {project} on pool {pool!r}: {' '.join(cmd[2:])}", flush=True)
    os.execvpe(cmd[0], cmd, env)


def stop_process_groups(procs: list[subprocess.Popen], timeout: float = 30.0) -> None:
    """SIGTERM each still running process's group (a server and its workers), then SIGKILL
    what has not exited within ``timeout`` seconds."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def services(directory: Path, host: str, prefect_port: int, mlflow_port: int,
             dvc_remote: str | None, project: Path, timeout: float = 300.0) -> None:
    """The team services, in the foreground until Ctrl-C (or SIGTERM) stops both servers:

    - a Prefect server (its database in ``<directory>/prefect``), where sweeps are submitted
      and workers poll;
    - an MLflow tracking server (backend ``<directory>/mlflow.db``, artifacts served from
      ``<directory>/mlartifacts``), where every machine logs;
    - the team DVC remote (default ``<directory>/dvc-remote``; any DVC URL, or a path every
      machine mounts), set as this clone's default.

    Prints and writes ``<directory>/env.sh`` with what every machine exports."""
    import socket

    from appo.pipeline import dvc_command

    directory = directory.resolve()
    (directory / "prefect").mkdir(parents=True, exist_ok=True)
    remote = dvc_remote or str(directory / "dvc-remote")
    if "://" not in remote:
        Path(remote).mkdir(parents=True, exist_ok=True)
    subprocess.run(dvc_command("remote", "add", "--local", "--force", "--default", "team",
                               remote), cwd=project, check=True, capture_output=True)
    address = socket.getfqdn() if host in ("0.0.0.0", "::") else host
    prefect_url = f"http://{address}:{prefect_port}/api"
    mlflow_url = f"http://{address}:{mlflow_port}"
    env = {**os.environ, "PREFECT_HOME": str(directory / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)  # the server itself must not try to reach one
    procs = [
        subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host,
                          "--port", str(prefect_port)], env=env, start_new_session=True),
        subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", host,
                          "--port", str(mlflow_port), "--workers", "2",
                          "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
                          "--artifacts-destination", str(directory / "mlartifacts")],
                         env=env, start_new_session=True)]

    def stop(*_: Any, code: int = 0) -> None:
        stop_process_groups(procs, timeout=20)
        raise SystemExit(code)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    deadline = time.monotonic() + timeout
    while not (api_up(f"http://{local}:{prefect_port}/api")
               and api_up(f"http://{local}:{mlflow_port}")):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            print("error: a team server did not come up (port in use?)", file=sys.stderr)
            stop(code=1)
        time.sleep(1)
    lines = [f"export PREFECT_API_URL={prefect_url}", f"export MLFLOW_TRACKING_URI={mlflow_url}",
             f"export APPO_DVC_REMOTE={remote}"]
    from appo.io import atomic_write_text

    atomic_write_text(directory / "env.sh", "\n".join(lines) + "\n")
    print("team services up (Ctrl-C stops them). On every machine:\n  "
          + "\n  ".join(lines)
          + "\nthen in each machine's clone: python -m flows.cluster worker --pool NAME "
          "--dvc-remote $APPO_DVC_REMOTE", flush=True)
    while all(p.poll() is None for p in procs):
        time.sleep(2)
    print("error: a team server stopped", file=sys.stderr)
    stop(code=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_worker = sub.add_parser("worker", help="run this clone's worker for a pool")
    p_worker.add_argument("--pool", required=True)
    p_worker.add_argument("--name", default=None, help="worker name (default: Prefect's)")
    p_worker.add_argument("--project", default=".", help="this clone (default: here)")
    p_worker.add_argument("--dvc-remote", default=None,
                          help="the team DVC remote (URL or path), set as this clone's default")
    p_worker.add_argument("--limit", type=int, default=1,
                          help="flow runs at once (default 1: one machine or GPU, one run)")
    p_share = sub.add_parser("share", help="push this clone's outputs and run records to the "
                             "team DVC remote, so sweeps restore them instead of rerunning")
    p_share.add_argument("--project", default=".", help="this clone (default: here)")
    p_deploy = sub.add_parser("deploy", help="create or update the pool's deployment only")
    p_deploy.add_argument("--pool", required=True)
    p_srv = sub.add_parser("services", help="Prefect server + MLflow server + DVC remote")
    p_srv.add_argument("--dir", default="team", help="their state (default: ./team)")
    p_srv.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (0.0.0.0: reachable from other machines)")
    p_srv.add_argument("--prefect-port", type=int, default=4200)
    p_srv.add_argument("--mlflow-port", type=int, default=5000)
    p_srv.add_argument("--dvc-remote", default=None,
                       help="team DVC remote (default <dir>/dvc-remote; s3://..., ssh://..., "
                       "or a path all machines mount)")
    p_srv.add_argument("--project", default=".", help="this clone (its DVC remote is set)")
    args = parser.parse_args(argv)
    if args.command == "worker":
        worker(args.pool, Path(args.project).resolve(), args.name, args.dvc_remote, args.limit)
    elif args.command == "share":
        from types import SimpleNamespace

        from appo.pipeline import working_dir
        from flows.pipeline import dvc_sync

        with working_dir(Path(args.project).resolve()):
            dvc_sync("push", SimpleNamespace(info=lambda text, *a: print(text % a)))
    elif args.command == "services":
        services(Path(args.dir), args.host, args.prefect_port, args.mlflow_port,
                 args.dvc_remote, Path(args.project).resolve())
    else:
        print(deploy(args.pool))


if __name__ == "__main__":
    main()

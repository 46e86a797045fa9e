"""Screenshots of the two UIs a user watches, taken with headless Chromium.

* MLflow's compare view of the evaluation runs of the latest full pipeline run (one column per
  variant: accuracy, CI, hit rate side by side);
* Prefect's page of the latest flow run (task runs in DAG order, logs, the comparison artifact).

It starts ``mlflow ui`` over the project's ``mlflow.db`` and a Prefect server over the project's
``.prefect/`` (what ``make mlflow-ui`` / ``make ui`` start) on spare ports, finds the runs through
their APIs, points Chromium at the pages, and stops the servers. Nothing leaves the machine.

    python tools/screenshots.py --project . --out docs/img     # after `make run`

Needs a ``chromium`` (or ``--chromium PATH``); the pages are single-page apps, so Chromium gets
a virtual-time budget to run their scripts before the shot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(1.0)
    raise SystemExit(f"{what} did not answer at {url} within {timeout:.0f} s")


@contextmanager
def server(cmd: list[str], env: dict[str, str], health: str, what: str,
           timeout: float) -> Iterator[None]:
    """Run a server in its own process group for the duration; stop the whole group after."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_http(health, timeout, what)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def shoot(chromium: str, url: str, path: Path, size: str = "1600,1000",
          budget_ms: int = 25000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--window-size={size}",
                    f"--virtual-time-budget={budget_ms}", f"--screenshot={tmp}", url],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
    if not tmp.is_file() or tmp.stat().st_size == 0:
        raise SystemExit(f"chromium wrote no screenshot of {url}")
    os.replace(tmp, path)
    return path


def mlflow_compare_url(db: Path, base: str) -> str:
    """The compare view of the eval runs under the latest pipeline run that has the most."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.dvc_stage LIKE 'eval@%'", max_results=2000,
                              order_by=["attributes.start_time DESC"])
    by_parent: dict[str, list] = {}
    for run in runs:
        by_parent.setdefault(run.data.tags.get("mlflow.parentRunId", "-"), []).append(run)
    if not by_parent:
        raise SystemExit(f"{db}: no evaluation runs (run `make run` first)")
    chosen = max(by_parent.values(), key=len)  # the first (latest) of the largest groups
    ids = json.dumps([r.info.run_id for r in chosen])
    exps = json.dumps(sorted({r.info.experiment_id for r in chosen}))
    query = urllib.parse.urlencode({"runs": ids, "experiments": exps})
    return f"{base}/#/compare-runs?{query}"


def prefect_flow_run_url(api: str) -> str:
    body = json.dumps({"sort": "START_TIME_DESC", "limit": 1}).encode()
    req = urllib.request.Request(f"{api}/flow_runs/filter", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        runs = json.loads(r.read())
    if not runs:
        raise SystemExit("the project's Prefect state has no flow run (run `make run` first)")
    return f"{api.removesuffix('/api')}/runs/flow-run/{runs[0]['id']}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", default=".", help="the project (mlflow.db, .prefect/)")
    parser.add_argument("--out", default="docs/img", help="folder for the PNGs")
    parser.add_argument("--chromium", default=shutil.which("chromium")
                        or shutil.which("chromium-browser") or "chromium")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds each server may take to start")
    args = parser.parse_args(argv)
    project, out = Path(args.project).resolve(), Path(args.out).resolve()
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PREFECT_HOME=str(project / ".prefect"), DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with server([str(bin_dir / "mlflow"), "ui", "--host", "127.0.0.1", "--port", str(port),
                 "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}"],
                env, f"{base}/health", "mlflow ui", args.timeout):
        url = mlflow_compare_url(project / "mlflow.db", base)
        print(shoot(args.chromium, url, out / "mlflow-compare.png"))

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = env | {"PREFECT_API_URL": api, "PREFECT_UI_API_URL": api}  # the UI's own API calls
    with server([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                 str(port)], env, f"{api}/health", "prefect server", args.timeout):
        url = prefect_flow_run_url(api)
        print(shoot(args.chromium, url, out / "prefect-flow-run.png"))


if __name__ == "__main__":
    main()

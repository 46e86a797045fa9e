"""Serve the pipeline flow as a Prefect deployment, so runs can be started from the UI.

``make ui`` starts a Prefect server on 127.0.0.1 and then this (with ``PREFECT_API_URL``
pointing at it). In the UI: Deployments -> appo-pipeline/appo-pipeline -> Run -> Custom run, and
set ``algorithms``, ``params_file``, ``overrides`` (e.g. ``["rl.steps=10"]``), ``force``. One
run at a time (``limit=1``): the runs share one workspace and DVC holds a repository lock.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve [--wait 60]
"""

from __future__ import annotations

import argparse
import os
import time
import urllib.request

from flows.pipeline import pipeline


def api_up(url: str) -> bool:
    """The Prefect API at ``url`` answers its health check."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def local_api(port: int) -> str | None:
    """This checkout's ``make ui`` server on 127.0.0.1:``port`` if it is up, else None: then
    ``make run`` shows in that UI; without one Prefect starts an ephemeral server whose runs
    land in the same ``.prefect/`` database, which a later ``make ui`` shows."""
    url = f"http://127.0.0.1:{port}/api"
    return url if api_up(url) else None


def wait_for_api(url: str, timeout: float) -> None:
    """Poll ``<api>/health`` until the Prefect server answers (it takes a few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        if api_up(url):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"no Prefect server answered at {url} within {timeout:.0f}s")
        time.sleep(1)


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    """Exit with a clear message when ``host:port`` is taken, before anything else is printed:
    otherwise a second ``make ui`` prints its banner, then fails to bind and silently attaches
    its deployment to the other checkout's server."""
    import socket

    with socket.socket() as sock:
        if sock.connect_ex((host, port)) == 0:
            raise SystemExit(f"port {port} on {host} is in use (another `make ui`?); "
                             f"choose another: make ui PREFECT_PORT={port + 1}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="appo-pipeline", help="deployment name")
    parser.add_argument("--wait", type=float, default=0,
                        help="seconds to wait for the Prefect API to come up first")
    parser.add_argument("--check-port", type=int, default=None, metavar="PORT",
                        help="only check that PORT on 127.0.0.1 is free (exit 1 if not)")
    parser.add_argument("--api-url", type=int, default=None, metavar="PORT",
                        help="only print the API URL of a Prefect server up on PORT (or nothing)")
    args = parser.parse_args(argv)
    if args.check_port is not None:
        check_port_free(args.check_port)
        return
    if args.api_url is not None:
        print(local_api(args.api_url) or "")
        return
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        raise SystemExit("set PREFECT_API_URL to a running Prefect server (make ui does)")
    if args.wait:
        wait_for_api(api, args.wait)
    pipeline.serve(name=args.name, limit=1, tags=["appo"],
                   description="data -> frames -> init_model -> sft -> rl -> eval -> report "
                               "(dvc repro per stage, one MLflow parent run)")


if __name__ == "__main__":
    main()

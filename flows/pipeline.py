"""Prefect flow: the DVC pipeline as Prefect tasks, one task per DVC stage, in DAG order.

Each task runs ``dvc repro --single-item <stage>`` in the project, so Prefect and DVC share one
cache and one notion of "up to date": the stage code lives only in ``dvc.yaml``, a task whose
stage did not change finishes in seconds, and ``dvc status`` / ``dvc.lock`` describe what the
flow did. Independent stages (the RL algorithms, the evaluations) run ``jobs`` at a time: DVC
releases its repository lock while a stage's command runs, and each stage is deterministic on
its own pinned threads, so running two at once changes no number, only the wall time. The
whole run is one MLflow parent run; every stage's run nests under it.

Parameters: ``algorithms`` (a subset of the DAG's ``rl@`` items; default all), ``params_file``
and ``overrides`` (``dotted.key=value``: such a run happens in its own workspace,
``outputs/runs/<overrides>-<hash>/``, sharing the DVC cache; params.yaml is never touched, see
:mod:`appo.workspace`), ``force``, ``jobs`` (stages at once; 0 = one per ``threads`` cores on
CPU, one on a GPU), and for sweeps ``stages``, ``sync``, ``tags``, ``publish_results``,
``expect_commit`` (flows/cluster.py). A transient failure (killed process, lock or database contention) is retried.

    python -m flows.pipeline                                  # make run; no server needed
    python -m flows.pipeline --algorithms grpo appo --set rl.steps=10
    python -m flows.serve                                     # deployment for the UI (make ui)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow, get_run_logger, task

from appo.pipeline import die_with_parent, dvc_command, stage_env, working_dir
from appo.workspace import run_workspace
from flows.progress import RunClock, fmt_duration

PROJECT_ENV = "APPO_PROJECT"  # a sweep worker's clone (flows/cluster.py): where its runs run

# "is busy": DVC's per-path lock, held by another dvc process on the same outputs (a hand-run
# `dvc repro` beside the flow)
TRANSIENT = ("Unable to acquire lock", "database is locked", "Resource temporarily unavailable",
             "Connection reset", "Cannot allocate memory", "Killed", "is busy, it is being blocked")


# DVC's closing advice after each stage ("To track the changes with git, run: git add ...",
# "To enable auto staging, run: dvc config core.autostage true"): useful once in a terminal,
# noise in every task log. Only `core.autostage` turns it off, and that would stage files in
# the user's git index, so the task log drops these lines instead.
GIT_HINTS = ("To track the changes with git", "git add ", "To enable auto staging",
             "dvc config core.autostage")


def is_git_hint(line: str) -> bool:
    """A line of DVC's git advice (see GIT_HINTS)."""
    return line.strip().startswith(GIT_HINTS)


def publish_summary(table: str, parent_id: str | None) -> str:
    """The comparison table and a link to the MLflow parent run as a Prefect markdown artifact
    (the flow run's Artifacts tab), so the UI shows the result, not only logs."""
    from prefect.artifacts import create_markdown_artifact

    lines = ["# APPO pipeline: comparison", "", "```", table, "```", ""]
    if parent_id:
        from appo.mlflow_setup import run_url

        lines += [f"MLflow parent run: [{parent_id[:8]}]({run_url(parent_id)}) "
                  "(all stage runs are nested under it)", ""]
    markdown = "\n".join(lines)
    create_markdown_artifact(markdown=markdown, key="appo-comparison",
                             description="variants side by side (python -m appo compare)")
    return markdown


class StageFailed(RuntimeError):
    """``dvc repro`` of one stage failed; ``transient`` failures are worth a retry."""

    def __init__(self, stage: str, returncode: int, output: str) -> None:
        self.stage, self.returncode, self.output = stage, returncode, output
        match = re.search(r"exited with (-?\d+)", output)
        code = int(match.group(1)) if match else returncode
        self.transient = code < 0 or code in (137, 143) or any(s in output for s in TRANSIENT)
        tail = "\n".join(output.splitlines()[-15:])
        super().__init__(f"stage {stage} failed (exit {returncode}"
                         f"{', transient' if self.transient else ''}):\n{tail}")


def _retry_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as exc:
        return exc.transient
    except Exception:
        return True
    return False


@task(name="dvc-stage", task_run_name="{stage}", retries=2, retry_delay_seconds=15,
      retry_condition_fn=_retry_transient)
def run_stage(stage: str, force: bool = False, pull: bool = False) -> str:
    """``dvc repro --single-item STAGE``, its output streamed into the task log; with
    ``pull``, outputs DVC's run cache knows but the local cache lacks come from the remote.

    Returns "ran", "restored" (DVC run-cache hit) or "up to date".
    """
    logger = get_run_logger()
    # --wait-for-lock: a stage running alongside briefly holds the repository lock while it
    # checks and commits its outputs (never while its command runs)
    cmd = dvc_command("--wait-for-lock", "repro", "--single-item",
                      *(["--force"] if force else []), *(["--pull"] if pull else []), stage)
    logger.info("$ %s", " ".join(["dvc", *cmd[4:]]))
    tail: deque[str] = deque(maxlen=200)
    status = "up to date"
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=stage_env(), bufsize=1, preexec_fn=die_with_parent) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if not line or is_git_hint(line):
                continue
            logger.info(line)
            tail.append(line)
            if line.startswith("Running stage"):
                status = "ran"
            elif "is cached - skipping run" in line:
                status = "restored"
    if proc.returncode:
        raise StageFailed(stage, proc.returncode, "\n".join(tail))
    return status


def plan(algorithms: list[str] | None = None, project: str | Path = ".") -> list[str]:
    """The DAG's stages in dependency order (dvc.yaml order among independent ones).

    ``algorithms`` (None or empty: all) keeps only those ``rl@``/``eval@`` items
    (``eval_baseline@*`` always stay). A kept stage downstream of a dropped one (the
    report) runs on the dropped stages' existing outputs, and is itself dropped (with a
    warning) when those do not exist.
    """
    return list(plan_graph(algorithms, project))


def plan_graph(algorithms: list[str] | None = None, project: str | Path = ".",
               targets: list[str] | None = None) -> dict[str, set[str]]:
    """:func:`plan` with each kept stage's upstream kept stages (what must finish first), in
    the same order; with ``targets``, only those stages and their upstream."""
    import networkx as nx
    from dvc.repo import Repo

    with working_dir(project), Repo(".") as repo:  # stage names are relative to the cwd
        stages = list(repo.index.stages)
        graph = repo.index.graph  # edges: stage -> the stages it depends on
        position = {s: i for i, s in enumerate(stages)}
        order = list(nx.lexicographical_topological_sort(graph.reverse(copy=True),
                                                         key=lambda s: position[s]))
        names = [s.addressing for s in order]
        dag_algos = [n.split("@", 1)[1] for n in names if n.startswith("rl@")]
        chosen = list(algorithms) if algorithms else dag_algos
        unknown = sorted(set(chosen) - set(dag_algos))
        if unknown:
            raise ValueError(f"algorithms {unknown} are not in dvc.yaml (rl@ stages: "
                             f"{', '.join(dag_algos)})")
        dropped = {s for s in order if "@" in s.addressing
                   and s.addressing.split("@", 1)[0] in ("rl", "eval")
                   and s.addressing.split("@", 1)[1] not in chosen}
        keep = []
        for stage in order:
            if stage in dropped:
                continue
            missing = [str(out) for up in nx.descendants(graph, stage) if up in dropped
                       for out in up.outs if not Path(out.fs_path).exists()]
            if missing:
                print(f"warning: skipping {stage.addressing}: it needs outputs of stages not "
                      f"selected, which do not exist: {', '.join(missing)}")
                continue
            keep.append(stage)
        if targets:
            by_name = {s.addressing: s for s in keep}
            unknown = sorted(set(targets) - set(by_name))
            if unknown:
                raise ValueError(f"stages {unknown} are not in the plan ({', '.join(by_name)})")
            wanted = {by_name[t] for t in targets}
            wanted |= {up for t in list(wanted) for up in nx.descendants(graph, t)}
            keep = [s for s in keep if s in wanted]
        kept = set(keep)
        return {stage.addressing: {up.addressing for up in nx.descendants(graph, stage)
                                   if up in kept} for stage in keep}


def check_commit(project: Path, expected: str | None) -> None:
    """A sweep's runs must run the code it was started from: a worker's clone at another git
    commit fails at once, with what to do."""
    if not expected:
        return
    from appo.mlflow_setup import git_commit

    actual = git_commit(project)
    if actual != expected:
        raise RuntimeError(f"{project} is at git commit {actual[:12]}, the sweep at "
                           f"{expected[:12]}: update that clone (git pull) and restart its worker")


def dvc_sync(action: str, logger: Any) -> None:
    """``dvc fetch --run-cache`` (before a run: every stage any machine pushed can be restored)
    or ``dvc push --run-cache`` (after: outputs and run records for the others), against the
    default remote. A failed fetch only costs time (stages run); a failed push is an error."""
    proc = subprocess.run(dvc_command(action, "--run-cache"), env=stage_env(), text=True,
                          capture_output=True, check=False, preexec_fn=die_with_parent)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    if proc.returncode and action == "push":
        raise RuntimeError(f"dvc push --run-cache failed: {' '.join(tail)} (is a default DVC "
                           "remote set? dvc remote add -d NAME URL)")
    if action == "push":
        push_uncached_outputs()
    logger.info("dvc %s --run-cache: %s", action,
                "done" if not proc.returncode else "failed, stages will run: " + " ".join(tail))


def push_uncached_outputs() -> None:
    """``dvc push --run-cache`` leaves out the ``cache: false`` outputs (the headline files
    under metrics/), yet another machine's run-cache restore of that stage needs them: without
    them every machine retrains the SFT warm start. DVC committed them to the local cache when
    it recorded the run; push those objects too."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        objs = [out.hash_info for stage in repo.index.stages for out in stage.outs
                if not out.use_cache and out.hash_info and out.hash_info.value]
        if objs:
            repo.cloud.push(objs)


def log_results(algorithms: list[str]) -> None:
    """The run's result files, laid out as :func:`appo.experiment.collect_run` copies them,
    as ``results/`` of the active MLflow run: where a sweep's submitter reads them."""
    import tempfile

    import mlflow

    from appo.experiment import collect_run

    with tempfile.TemporaryDirectory() as tmp:
        collect_run(Path("outputs"), Path(tmp), algorithms)
        mlflow.log_artifacts(tmp, "results")


def auto_jobs(params_file: str | Path = "params.yaml") -> int:
    """Stages at once when the user did not say: one per ``threads`` CPU cores (``threads: 0``,
    all cores per stage: one), and one on a GPU, whose memory the stages would share."""
    import yaml

    params = yaml.safe_load(Path(params_file).read_text()) or {}
    device = str((params.get("model") or {}).get("device", "auto"))
    if device.startswith("cuda"):
        return 1
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            return 1
    threads = int(params.get("threads") or 0)
    return max(1, (os.cpu_count() or 1) // threads) if threads > 0 else 1


Handle = TypeVar("Handle")


def schedule(upstream: dict[str, set[str]], jobs: int, submit: Callable[[str], Handle],
             as_completed: Callable[[Iterable[Handle]], Iterator[Handle]],
             on_start: Callable[[str], None] = lambda stage: None,
             on_done: Callable[[str, Any], None] = lambda stage, result: None) -> dict[str, Any]:
    """Run a DAG's stages at most ``jobs`` at a time, each as soon as its upstream is done.

    Of the stages ready to start, the one with the most stages downstream of it goes first (ties:
    plan order): an RL run, which its evaluation and the report wait for, starts before a short
    evaluation that only the report waits for, so the evaluations fill the tail instead of
    delaying the last RL run (about 45 s of the 2-core default's 15 minutes).
    ``upstream`` maps every stage (in the preferred start order) to the stages it waits for;
    ``submit(stage)`` starts one and returns a handle whose ``result()`` waits for it (a
    Prefect or ``concurrent.futures`` future); ``as_completed`` yields finished handles. After
    a failure nothing new starts; the running stages finish, then the first error is raised.
    Returns each stage's result, in completion order.
    """
    downstream = _downstream_counts(upstream)
    pending = sorted(upstream, key=lambda s: -downstream[s])  # stable: plan order among ties
    running: dict[str, Handle] = {}
    results: dict[str, Any] = {}
    error: BaseException | None = None
    while pending or running:
        while error is None and len(running) < max(1, jobs):
            ready = next((s for s in pending if upstream[s] <= results.keys()), None)
            if ready is None:
                break
            pending.remove(ready)
            on_start(ready)
            running[ready] = submit(ready)
        if not running:
            if error is None:
                raise RuntimeError(f"stages {pending} wait for stages outside the plan")
            break  # after a failure: the rest never starts
        finished = next(iter(as_completed(list(running.values()))))
        stage = next(s for s, h in running.items() if h is finished)
        del running[stage]
        try:
            results[stage] = finished.result()
        except Exception as exc:  # noqa: BLE001 - re-raised once the running stages are done
            error = error or exc
            continue
        on_done(stage, results[stage])
    if error is not None:
        raise error
    return results


def _downstream_counts(upstream: dict[str, set[str]]) -> dict[str, int]:
    """Stage -> how many stages wait for it, directly or through others."""
    children: dict[str, set[str]] = {s: set() for s in upstream}
    for stage, ups in upstream.items():
        for up in ups:
            children.setdefault(up, set()).add(stage)

    def below(stage: str, seen: set[str]) -> set[str]:
        for child in children.get(stage, ()):
            if child not in seen:
                seen.add(child)
                below(child, seen)
        return seen

    return {stage: len(below(stage, set())) for stage in upstream}


@flow(name="appo-pipeline", log_prints=True)
def pipeline(algorithms: list[str] | None = None, params_file: str = "params.yaml",
             overrides: list[str] | None = None, force: bool = False,
             project_dir: str = "", jobs: int = 0, stages: list[str] | None = None,
             sync: bool = False, tags: dict[str, str] | None = None,
             publish_results: bool = False, expect_commit: str | None = None
             ) -> dict[str, str]:
    """data -> frames -> init_model -> sft -> rl@* -> eval@* (+ eval_baseline@*) -> report,
    then the comparison.

    Args:
        algorithms: RL algorithms to run (rl@/eval@ items of dvc.yaml); empty = all.
        params_file: params file to run with, relative to the project.
        overrides: params overrides, each "dotted.key=value", e.g. "rl.steps=10".
        force: rerun every selected stage even if DVC finds it up to date.
        project_dir: the project (the folder holding dvc.yaml); empty: ``$APPO_PROJECT`` (set
            by a sweep worker for its clone), else the working directory.
        jobs: stages run at once; 0 = :func:`auto_jobs` (2 on the 2-core CPU at threads 1).
        stages: run only these stages and what they need (default: the whole plan).
        sync: fetch DVC's run cache from the default remote first and push outputs and run
            cache afterwards, so machines share every stage's results (sweeps do).
        tags: extra tags of the MLflow parent run.
        publish_results: log the run's result files to the MLflow parent run (``results/``, the
            layout :func:`appo.experiment.collect_run` copies), for a sweep's aggregation.
        expect_commit: fail at once when the project's git commit differs (a worker's clone
            must run the code the sweep was started from).
    """
    from appo.compare import compare
    from appo.mlflow_setup import parent_run

    logger = get_run_logger()
    project = Path(project_dir or os.environ.get(PROJECT_ENV) or ".").resolve()
    overrides = list(overrides or [])
    results: dict[str, str] = {}
    check_commit(project, expect_commit)
    with run_workspace(project, params_file, overrides) as where, working_dir(where):
        if sync:
            dvc_sync("fetch", logger)
        upstream = plan_graph(algorithms, where, stages)
        planned = list(upstream)
        jobs = jobs if jobs > 0 else auto_jobs()
        logger.info("stages (%d at a time): %s", jobs, ", ".join(planned))
        try:
            from prefect.runtime import flow_run

            flow_run_id = str(flow_run.id)
        except Exception:  # outside a flow run context
            flow_run_id = "-"
        worker = os.environ.get("PREFECT__WORKER_NAME", "-")  # set by a Prefect worker
        tags = dict(tags or {})
        run_name = tags.get("appo_sweep_run") or (  # a sweep's runs: named in MLflow's list
            f"{tags['appo_sweep']}/upstream" if "appo_sweep" in tags else "pipeline")
        with parent_run(run_name, tags={"runner": "prefect", "prefect_flow_run": flow_run_id,
                                          "prefect_worker": worker, **tags},
                        params={"algorithms": ",".join(algorithms or ["all"]),
                                "params_file": params_file,
                                "overrides": " ".join(overrides) or "-", "force": force,
                                "jobs": jobs},
                        artifacts=["outputs/report/report.md", "outputs/report/summary.json"]
                        ) as parent_id:
            if parent_id:
                logger.info("MLflow parent run %s", parent_id)
            from prefect.futures import as_completed

            clock = RunClock(planned, jobs=jobs)
            began: dict[str, float] = {}

            def start(stage: str) -> None:
                logger.info(clock.line(stage))
                began[stage] = time.monotonic()

            def done(stage: str, status: str) -> None:
                clock.finished(stage, time.monotonic() - began[stage], status == "ran")

            results = schedule(upstream, jobs, lambda stage: run_stage.submit(stage, force, sync),
                               as_completed, on_start=start, on_done=done)
            results = {stage: results[stage] for stage in planned}
            logger.info("all %d stages done in %s", len(planned),
                        fmt_duration(time.monotonic() - clock.start))
            if sync:
                dvc_sync("push", logger)
            if publish_results and parent_id:
                log_results(algorithms or [s.split("@", 1)[1] for s in planned
                                           if s.startswith("rl@")])
        table = compare(from_files=True)
        print("\n" + table)
        publish_summary(table, parent_id)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="+", default=None,
                        help="RL algorithms to run (default: every rl@ stage of dvc.yaml)")
    parser.add_argument("--params", default="params.yaml", help="params file to run with")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="params override (repeatable)")
    parser.add_argument("--force", action="store_true", help="rerun even unchanged stages")
    parser.add_argument("--project", default="", help="project directory (dvc.yaml; default: "
                        "$APPO_PROJECT, else the working directory)")
    parser.add_argument("--stages", nargs="+", default=None,
                        help="run only these stages and what they need (e.g. sft)")
    parser.add_argument("--jobs", type=int, default=0,
                        help="stages at once (default 0: one per `threads` CPU cores, 1 on GPU)")
    args = parser.parse_args(argv)
    results = pipeline(algorithms=args.algorithms, params_file=args.params,
                       overrides=args.overrides, force=args.force, project_dir=args.project,
                       stages=args.stages,
                       jobs=args.jobs)
    print("\n".join(f"{stage}: {status}" for stage, status in results.items()))


if __name__ == "__main__":
    main()

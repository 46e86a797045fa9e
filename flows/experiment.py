"""Prefect flow: a multi-seed experiment (experiments/*.yaml) as pipeline sub-flows.

Each (variant, seed) of the experiment is one run of the ``appo-pipeline`` flow (one task per
DVC stage, in the run's own workspace over the shared DVC cache, one MLflow parent run) with the
run's overrides, named
``<variant>-seed<s>`` in the UI; :func:`appo.experiment.run_experiment` collects the results
and builds the aggregate table, as for ``python -m appo experiment FILE``.

    python -m flows.experiment experiments/headline.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from appo.experiment import RunSpec, render_markdown, run_experiment
from appo.workspace import workspace_path
from flows.pipeline import pipeline


def _pipeline_runner(project: Path, spec: RunSpec) -> Path:
    pipeline.with_options(flow_run_name=f"{spec.variant.name}-seed{spec.seed}")(
        algorithms=spec.variant.algorithms, overrides=spec.overrides, project_dir=str(project))
    return workspace_path(project, "params.yaml", spec.overrides)


@flow(name="appo-experiment", log_prints=True)
def experiment(file: str = "experiments/headline.yaml", only: str | None = None,
               seed: int | None = None, pool: str | None = None,
               project_dir: str = ".") -> dict:
    """Every (variant, seed) of ``file`` through the pipeline flow, then the aggregate.

    Args:
        file: experiment file relative to the project.
        only: run just this variant (the aggregate still covers everything collected).
        seed: run just this seed.
        pool: fan the runs out over this Prefect work pool's workers (flows/cluster.py)
            instead of running them here one after another.
        project_dir: the project (the folder holding dvc.yaml).
    """
    fan_out = None
    if pool:
        from flows.cluster import pool_fan_out

        fan_out = pool_fan_out(pool)
    result = run_experiment(file, project=project_dir, only=only, seed=seed,
                            runner=_pipeline_runner, fan_out=fan_out)
    print(render_markdown(result))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", default="experiments/headline.yaml")
    parser.add_argument("--only", default=None, help="run just this variant")
    parser.add_argument("--seed", type=int, default=None, help="run just this seed")
    parser.add_argument("--pool", default=None, help="fan out over this Prefect work pool")
    parser.add_argument("--project", default=".", help="project directory (dvc.yaml)")
    args = parser.parse_args(argv)
    experiment(file=args.file, only=args.only, seed=args.seed, pool=args.pool,
               project_dir=args.project)


if __name__ == "__main__":
    main()

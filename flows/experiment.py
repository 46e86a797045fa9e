"""Prefect flow: a multi-seed experiment (experiments/*.yaml) as pipeline sub-flows.

Each (variant, seed) of the experiment is one run of the ``appo-pipeline`` flow (one task per
DVC stage, shared DVC cache, one MLflow parent run) with the run's overrides, named
``<variant>-seed<s>`` in the UI; its results are collected and the aggregate table
(:mod:`appo.experiment`) is printed at the end. The same runs as
``python -m appo experiment FILE``.

    python -m flows.experiment experiments/headline.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from appo.experiment import (
    Experiment,
    aggregate,
    collect_run,
    render_markdown,
    run_dir,
    run_overrides,
)
from flows.pipeline import pipeline


@flow(name="appo-experiment", log_prints=True)
def experiment(file: str = "experiments/headline.yaml", only: str | None = None,
               project_dir: str = ".") -> dict:
    """Every (variant, seed) of ``file`` through the pipeline flow, then the aggregate.

    Args:
        file: experiment file relative to the project.
        only: run just this variant (the aggregate still covers everything collected).
        project_dir: the project (the folder holding dvc.yaml).
    """
    project = Path(project_dir).resolve()
    exp = Experiment.load(project / file)
    root = project / "outputs" / "experiments"
    for variant, seed in exp.runs():
        if only is not None and variant.name != only:
            continue
        pipeline.with_options(flow_run_name=f"{variant.name}-seed{seed}")(
            algorithms=variant.algorithms, overrides=run_overrides(exp, variant, seed),
            project_dir=str(project))
        collect_run(project / "outputs", run_dir(root, exp, variant, seed), variant.algorithms)
    result = aggregate(exp, root / exp.name)
    print(render_markdown(result))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", default="experiments/headline.yaml")
    parser.add_argument("--only", default=None, help="run just this variant")
    parser.add_argument("--project", default=".", help="project directory (dvc.yaml)")
    args = parser.parse_args(argv)
    experiment(file=args.file, only=args.only, project_dir=args.project)


if __name__ == "__main__":
    main()

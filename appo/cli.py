"""``python -m appo``: the pipeline's command line.

``python -m appo run`` reproduces the whole DVC pipeline (``dvc repro``: every stage whose code,
params or inputs changed) under one MLflow parent run; ``python -m appo stage NAME`` runs one
params-only stage without DVC; ``python -m appo compare`` prints the variants side by side
(from MLflow, or with ``--from-files`` from ``outputs/``); ``python -m appo experiment FILE``
runs a multi-seed experiment (:mod:`appo.experiment`) through the same pipeline, one run
after another or, with ``--pool``, over the workers of a Prefect work pool (flows/cluster.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

STAGES = ("data", "frames", "init_model", "sft")


def run_stage(name: str, params: str) -> None:
    if name not in STAGES:
        raise SystemExit(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    importlib.import_module(f"appo.stages.{name}").main(["--params", params])


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="appo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="dvc repro the pipeline under one MLflow parent run")
    p_run.add_argument("targets", nargs="*", help="DVC stages (default: all)")
    p_run.add_argument("--params", default="params.yaml",
                       help="params file to run with (in its own workspace, outputs/runs/)")
    p_run.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="params override, e.g. rl.steps=10 (repeatable; "
                       "the run happens in outputs/runs/<overrides>-<hash>/, params.yaml is "
                       "never touched)")
    p_run.add_argument("--force", action="store_true", help="rerun even unchanged stages")
    p_stage = sub.add_parser("stage", help="run one stage without DVC")
    p_stage.add_argument("name", choices=STAGES)
    p_stage.add_argument("--params", default="params.yaml")
    p_cmp = sub.add_parser("compare", help="table of the algorithm variants")
    p_cmp.add_argument("--from-files", action="store_true",
                       help="read outputs/ instead of querying MLflow")
    p_cmp.add_argument("--outputs", default="outputs", help="outputs root for --from-files")
    p_cmp.add_argument("--experiment", default=None, help="MLflow experiment (default appo)")
    p_cmp.add_argument("--all", dest="all_runs", action="store_true",
                       help="one row per pipeline run and variant (MLflow)")
    p_exp = sub.add_parser("experiment", help="multi-seed comparison / ablation (experiments/*.yaml)")
    p_exp.add_argument("file", help="experiment file, e.g. experiments/headline.yaml")
    p_exp.add_argument("--only", default=None, help="run just this variant")
    p_exp.add_argument("--seed", type=int, default=None, help="run just this seed")
    p_exp.add_argument("--pool", default=None,
                       help="fan the runs out over the workers of this Prefect work pool "
                       "(README: Running on a cluster)")
    p_exp.add_argument("--aggregate-only", action="store_true",
                       help="rebuild the tables from the runs already collected")
    args = parser.parse_args(argv)
    from appo.config import ConfigError
    from appo.data.schema import DataError
    from appo.models.loading import ModelError

    try:
        if args.command == "run":
            from appo.pipeline import run_pipeline

            run_pipeline(args.targets, force=args.force, params_file=args.params,
                         overrides=args.overrides)
        elif args.command == "compare":
            from appo.compare import compare

            print(compare(args.from_files, args.outputs, args.experiment, args.all_runs))
        elif args.command == "experiment":
            from appo.experiment import render_markdown, run_experiment

            fan_out = None
            if args.pool:
                from flows.cluster import pool_fan_out

                fan_out = pool_fan_out(args.pool)
            print(render_markdown(run_experiment(args.file, only=args.only, seed=args.seed,
                                                 aggregate_only=args.aggregate_only,
                                                 fan_out=fan_out)))
        else:
            run_stage(args.name, args.params)
    except (ConfigError, DataError, ModelError, ValueError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()

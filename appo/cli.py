"""``python -m appo``: the pipeline's command line.

``python -m appo run`` runs the stages in DAG order on the params file (what ``dvc repro``
runs stage by stage, with caching); ``python -m appo stage NAME`` runs one stage.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

STAGES = ("data", "frames", "init_model")


def run_stage(name: str, params: str) -> None:
    if name not in STAGES:
        raise SystemExit(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    importlib.import_module(f"appo.stages.{name}").main(["--params", params])


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="appo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run every stage in DAG order")
    p_run.add_argument("--params", default="params.yaml")
    p_stage = sub.add_parser("stage", help="run one stage")
    p_stage.add_argument("name", choices=STAGES)
    p_stage.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    from appo.config import ConfigError
    from appo.data.schema import DataError
    from appo.models.loading import ModelError

    try:
        if args.command == "run":
            for name in STAGES:
                run_stage(name, args.params)
        else:
            run_stage(args.name, args.params)
    except (ConfigError, DataError, ModelError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()

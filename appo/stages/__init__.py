"""One entry point per DVC stage: ``python -m appo.stages.<stage>`` reads params.yaml."""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import Any


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or environment: shown as one clear line, no traceback."""
    from appo.config import ConfigError
    from appo.data.frames import FrameError
    from appo.data.schema import DataError
    from appo.io import OutputLockedError
    from appo.models.loading import ModelError

    return (ConfigError, DataError, FrameError, ModelError, OutputLockedError)


def stage_main(main: Callable[..., None]) -> Callable[..., None]:
    """Wrap a stage's ``main``: offline defaults, and clear one-line errors for bad input.

    A full disk or an unwritable output directory becomes ``error: cannot write <path>: ...``;
    because every artifact is written to a temporary name first, nothing half-written remains.
    """

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            _watch_runner()
            _pin_threads(sys.argv[1:] if argv is None else argv)
            main(argv)
        except user_errors() as exc:
            sys.exit(f"error: {exc}")
        except KeyboardInterrupt:  # Ctrl-C: a sentence, not a traceback; 130 as shells report
            print("error: interrupted; rerun the same command to continue from the last "
                  "checkpoint", file=sys.stderr)
            raise SystemExit(130) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM,
                             errno.ENOTDIR, errno.EEXIST):  # the last two: a file in the way
                sys.exit(f"error: cannot write {exc.filename or 'an output file'}: {exc.strerror}")
            raise

    return wrapper


def _pin_threads(argv: list[str]) -> None:
    """Apply params.yaml's ``threads`` (see :func:`appo.config.cpu_threads`) before any work."""
    import argparse

    from appo.config import cpu_threads, load_yaml

    parser = argparse.ArgumentParser(add_help=False)  # only --params; the stage parses the rest
    parser.add_argument("--params", default="params.yaml")
    path = parser.parse_known_args(argv)[0].params
    if not os.path.isfile(path):
        return  # the stage itself reports a missing params file
    threads = cpu_threads(load_yaml(path), path)
    if threads:
        import torch

        torch.set_num_threads(threads)


def _watch_runner() -> None:
    """Exit when the ``python -m appo run`` that started this stage is gone: a killed runner
    must not leave stages training on (every write is atomic, so stopping is safe)."""
    import threading
    import time

    from appo.pipeline import RUNNER_ENV, alive

    pid = os.environ.get(RUNNER_ENV, "")
    if not pid.isdigit():
        return

    def watch() -> None:
        while alive(int(pid)):
            time.sleep(1.0)
        print(f"error: the `python -m appo run` that started this stage (pid {pid}) is gone; "
              "stopping", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="appo-runner-watch", daemon=True).start()


def log_stage_run(stage: str, params: dict[str, Any], metrics: dict[str, float]) -> None:
    """One MLflow run for a stage without training curves (data, frames, init_model), so that
    every stage of a pipeline run shows up under its parent with its params and tags.

    MLflow only: these stages' output folders are DVC outputs, and a log file inside them would
    change their hash and rerun everything downstream.
    """
    from appo.tracking import RunLogger

    with RunLogger(None, stage, tags={"stage": stage}) as logger:
        logger.log_params(params)
        logger.log_metrics(metrics, step=0)

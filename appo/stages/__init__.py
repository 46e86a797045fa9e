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
    from appo.models.loading import ModelError

    return (ConfigError, DataError, FrameError, ModelError)


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
            main(argv)
        except user_errors() as exc:
            sys.exit(f"error: {exc}")
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM):
                sys.exit(f"error: cannot write {exc.filename or 'an output file'}: {exc.strerror}")
            raise

    return wrapper


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

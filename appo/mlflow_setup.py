"""MLflow defaults: tracking URI from MLFLOW_TRACKING_URI, else a local sqlite file."""

from __future__ import annotations

import os
from pathlib import Path

EXPERIMENT = "appo"


def configure(experiment: str | None = None) -> str:
    """Point MLflow at the configured store and experiment; returns the tracking URI."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment or os.environ.get("APPO_EXPERIMENT", EXPERIMENT))
    return uri

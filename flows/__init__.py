"""Prefect orchestration of the DVC pipeline (``flows.pipeline``, ``flows.serve``).

Importing the package turns Prefect's and DVC's usage analytics off (before Prefect reads its
settings); an explicit setting in the environment wins. Without ``PREFECT_API_URL`` a flow
runs against a temporary local Prefect server: nothing outside the machine is contacted.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

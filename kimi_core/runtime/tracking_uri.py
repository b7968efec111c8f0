"""Where a run's MLflow tracking lives: the rule, without MLflow itself.

The CLI checks a recipe (`status.preflight`) before it starts the run's early Ray head, and importing
`mlflow` takes 1.5-2.5 s on a 2-core machine: the rule lives here so that check imports none of it.
"""

from __future__ import annotations

import os
from pathlib import Path

from kimi_core.recipe import Recipe
from kimi_core.run_state import RunPaths
from kimi_core.runtime.failures import NotRunnableHere


def resolve_tracking_uri(default_sqlite_path: str | os.PathLike[str]) -> str:
    """`$MLFLOW_TRACKING_URI` when set, else `sqlite:////abs/path/mlflow.db`."""
    from_env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if from_env:
        return from_env
    path = Path(default_sqlite_path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def tracking_uri_for(recipe: Recipe, paths: RunPaths) -> str:
    """The run's MLflow tracking URI: `tracking.tracking_uri`, unless `$MLFLOW_TRACKING_URI` is set,
    else the sqlite file under the base dir. Several GPU nodes need a tracking server (their
    processes log from different nodes; sqlite's locking does not hold on a shared filesystem):
    `NotRunnableHere` when they would get a file."""
    configured = recipe.tracking.tracking_uri
    uri = configured if configured and not os.environ.get("MLFLOW_TRACKING_URI") else resolve_tracking_uri(paths.mlflow_db)
    c = recipe.cluster
    if c.accelerator == "gpu" and c.num_nodes > 1 and not uri.startswith(("http://", "https://")):
        raise NotRunnableHere(
            f"cluster.num_nodes = {c.num_nodes} GPU nodes need an MLflow tracking server, but the run would log to "
            f"{uri}: export MLFLOW_TRACKING_URI=http://host:5000 or set tracking.tracking_uri")
    return uri

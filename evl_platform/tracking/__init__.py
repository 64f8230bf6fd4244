"""MLflow tracking: the client, metric/tag/artifact names, and run artifacts.

The client (and so MLflow) is imported on first use: train workers only need ``names`` and
``artifacts``, and each worker process would otherwise spend about a second importing MLflow.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DEFAULT_TRACKING_URI", "Tracker", "git_commit", "resolve_tracking_uri"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("evl_platform.tracking.client"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""MLflow tracking: the client, metric/tag/artifact names, and run artifacts."""

from evl_platform.tracking.client import (
    DEFAULT_TRACKING_URI,
    Tracker,
    git_commit,
    resolve_tracking_uri,
)

__all__ = ["DEFAULT_TRACKING_URI", "Tracker", "git_commit", "resolve_tracking_uri"]

"""A small MLflow client for the platform: URI resolution, retries, and run bookkeeping.

Several processes (trials, the Ray Train controller, the driver) may write to the default
SQLite store at once. SQLite allows one writer at a time, so every connection waits for the
lock (``timeout`` on the SQLite URI) and every call is retried on "database is locked".
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from evl_platform.tracking import names

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SQLITE_TIMEOUT_S = 60
_RETRIES = 8
_BATCH = 100  # MLflow's per-call limit on params/tags in log_batch
T = TypeVar("T")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else ./mlflow.db.

    A relative SQLite path is made absolute (Ray workers run in other directories), and a
    plain directory path becomes a ``file:`` URI.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        path, sep, query = uri.removeprefix("sqlite:///").partition("?")
        if not path.startswith("/"):
            path = str(Path(path).resolve())
        return f"sqlite:///{path}{sep}{query}"
    if "://" not in uri and not uri.startswith("sqlite:"):
        return Path(uri).resolve().as_uri()
    return uri


def store_uri(uri: str) -> str:
    """The URI handed to MLflow: SQLite connections wait for the write lock."""
    if uri.startswith("sqlite:") and "timeout=" not in uri:
        return f"{uri}{'&' if '?' in uri else '?'}timeout={SQLITE_TIMEOUT_S}"
    return uri


def _retry(call: Callable[[], T], what: str) -> T:
    for attempt in range(_RETRIES):
        try:
            return call()
        except MlflowException as err:
            if "locked" not in str(err) or attempt == _RETRIES - 1:
                raise
            delay = min(8.0, 0.2 * 2**attempt) * (0.5 + random.random())
            log.debug("%s: database is locked, retrying in %.1f s", what, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class Tracker:
    """MLflow calls used by the platform, each retried while a SQLite store is locked.

    Args:
        uri: tracking URI (see :func:`resolve_tracking_uri`).
    """

    def __init__(self, uri: str | None = None) -> None:
        self.uri = resolve_tracking_uri(uri)
        self.client = MlflowClient(store_uri(self.uri))

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created if needed (safe when two processes race)."""
        found = _retry(lambda: self.client.get_experiment_by_name(name), "get experiment")
        if found is not None:
            return found.experiment_id
        try:
            return _retry(lambda: self.client.create_experiment(name), "create experiment")
        except MlflowException:
            found = _retry(lambda: self.client.get_experiment_by_name(name), "get experiment")
            if found is None:
                raise
            return found.experiment_id

    def create_run(
        self,
        experiment: str,
        *,
        run_name: str,
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
    ) -> str:
        """Starts a run in ``experiment`` (nested under ``parent_run_id``) and returns its id."""
        tags = dict(tags)
        if parent_run_id is not None:
            tags["mlflow.parentRunId"] = parent_run_id
        experiment_id = self.experiment_id(experiment)
        run = _retry(
            lambda: self.client.create_run(experiment_id, run_name=run_name, tags=tags),
            "create run",
        )
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, object]) -> None:
        """Logs parameters in batches of MLflow's per-call limit."""
        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), _BATCH):
            chunk = items[start : start + _BATCH]
            _retry(lambda c=chunk: self.client.log_batch(run_id, params=c), "log params")

    def set_tags(self, run_id: str, tags: Mapping[str, object]) -> None:
        """Sets tags on a run."""
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        _retry(lambda: self.client.log_batch(run_id, tags=items), "set tags")

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], *, step: int) -> None:
        """Logs a dict of metrics at one step."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if items:
            _retry(lambda: self.client.log_batch(run_id, metrics=items), "log metrics")

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Uploads one file or directory into the run's artifacts."""
        _retry(lambda: self.client.log_artifact(run_id, str(path), artifact_path), "log artifact")

    def last_step(self, run_id: str, key: str) -> int | None:
        """The highest step logged for metric ``key`` (``None`` if never logged)."""
        history = _retry(lambda: self.client.get_metric_history(run_id, key), "metric history")
        return max((m.step for m in history), default=None)

    def terminate(self, run_id: str, status: str = names.STATUS_FINISHED) -> None:
        """Marks a run FINISHED, FAILED or KILLED."""
        _retry(lambda: self.client.set_terminated(run_id, status), "end run")

    def terminate_open(self, run_id: str, status: str) -> None:
        """Marks a run ``status`` only if it is still RUNNING: what a dying trainer writes
        last must not undo the close of whoever ended its run first (a sweep closes the run
        of a sample ASHA stopped while that sample's trial actor may still be exiting)."""
        run = _retry(lambda: self.client.get_run(run_id), "read run")
        if run.info.status == names.STATUS_RUNNING:
            self.terminate(run_id, status)

    @contextlib.contextmanager
    def finishing(self, run_id: str) -> Iterator[None]:
        """Marks the run FINISHED when the block ends, FAILED if it raises (and re-raises)."""
        try:
            yield
        except BaseException:
            self.terminate(run_id, names.STATUS_FAILED)
            raise
        self.terminate(run_id)

    def reopen(self, run_id: str) -> None:
        """Marks a finished or failed run as running again (a resumed training)."""
        _retry(lambda: self.client.update_run(run_id, status=names.STATUS_RUNNING), "reopen run")

    def search(self, experiment: str, filter_string: str = "") -> list[Run]:
        """Every run of ``experiment`` matching ``filter_string``, newest first (none if the
        experiment does not exist)."""
        found = _retry(lambda: self.client.get_experiment_by_name(experiment), "get experiment")
        if found is None:
            return []
        runs: list[Run] = []
        token = None
        while True:
            page = _retry(
                lambda t=token: self.client.search_runs(
                    [found.experiment_id],
                    filter_string,
                    max_results=1000,
                    order_by=["attributes.start_time DESC"],
                    page_token=t,
                ),
                "search runs",
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def children(self, experiment: str, parent_run_id: str) -> list[Run]:
        """The runs of ``experiment`` nested under ``parent_run_id``."""
        return self.search(experiment, f"tags.`mlflow.parentRunId` = '{parent_run_id}'")

    def delete(self, run_id: str) -> None:
        """Deletes a run (moves it to MLflow's trash)."""
        _retry(lambda: self.client.delete_run(run_id), "delete run")


def git_commit(directory: str | Path | None = None) -> str:
    """The git commit of the project checkout (``unknown`` outside a repository)."""
    directory = Path(directory or Path(__file__).resolve().parents[2])
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"

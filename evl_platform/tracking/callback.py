"""Logs what Ray Train workers report into MLflow runs, from the Train controller.

The callback runs in the controller process, which outlives worker restarts, so a run gets
exactly one writer. Steps already logged (replayed after a restart from an older checkpoint,
or by a ``--resume``) are skipped per metric, so the history has neither gaps nor duplicates.
A pack reports every member's metrics in one report, each name prefixed with the member's key
(:func:`~evl_platform.tracking.names.member_metric`); each goes to its member's run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.train import Checkpoint, UserCallback

from evl_platform.tracking.client import Tracker
from evl_platform.tracking.names import REPORT_STEP, TIME_PREFIX, split_member_metric


class MLflowLogger(UserCallback):
    """Writes rank 0's reported metrics to their runs at their ``step``.

    Args:
        tracking_uri: the MLflow tracking URI.
        runs: member key -> its run id (``{"": run_id}`` for a run of its own); a metric
            whose member is not listed is not logged.
    """

    def __init__(self, tracking_uri: str, runs: Mapping[str, str]) -> None:
        self.tracking_uri = tracking_uri
        self.runs = dict(runs)
        self._tracker: Tracker | None = None
        self._last: dict[tuple[str, str], int] = {}

    def _client(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri)
        return self._tracker

    def _last_step(self, run_id: str, key: str) -> int:
        if (run_id, key) not in self._last:
            found = self._client().last_step(run_id, key)
            self._last[run_id, key] = -1 if found is None else found
        return self._last[run_id, key]

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Checkpoint | None
    ) -> None:
        if not metrics or REPORT_STEP not in metrics[0]:
            return
        step = int(metrics[0][REPORT_STEP])
        new: dict[str, dict[str, float]] = {}
        for name, value in metrics[0].items():
            member, key = split_member_metric(name)
            run_id = self.runs.get(member)
            if name == REPORT_STEP or run_id is None or name.startswith(TIME_PREFIX):
                continue
            if step > self._last_step(run_id, key):
                new.setdefault(run_id, {})[key] = float(value)
        for run_id, values in new.items():
            self._client().log_metrics(run_id, values, step=step)
            self._last.update({(run_id, key): step for key in values})

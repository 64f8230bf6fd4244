"""Logs what Ray Train workers report into one MLflow run, from the Train controller.

The callback runs in the controller process, which outlives worker restarts, so a run gets
exactly one writer. Steps already logged (replayed after a restart from an older checkpoint,
or by a ``--resume``) are skipped per metric, so the history has neither gaps nor duplicates.
"""

from __future__ import annotations

from typing import Any

from ray.train import Checkpoint, UserCallback

from evl_platform.tracking.client import Tracker

STEP = "step"


class MLflowLogger(UserCallback):
    """Writes rank 0's reported metrics to ``run_id`` at their ``step``.

    Args:
        tracking_uri: the MLflow tracking URI.
        run_id: the run every metric goes to.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._tracker: Tracker | None = None
        self._last: dict[str, int] = {}

    def _client(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri)
        return self._tracker

    def _last_step(self, key: str) -> int:
        if key not in self._last:
            found = self._client().last_step(self.run_id, key)
            self._last[key] = -1 if found is None else found
        return self._last[key]

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Checkpoint | None
    ) -> None:
        if not metrics or STEP not in metrics[0]:
            return
        step = int(metrics[0][STEP])
        new = {
            key: float(value)
            for key, value in metrics[0].items()
            if key != STEP and step > self._last_step(key)
        }
        if new:
            self._client().log_metrics(self.run_id, new, step=step)
            self._last.update(dict.fromkeys(new, step))

"""The sweep's progress lines: one per trial start, validation and end, with an ETA."""

from __future__ import annotations

import datetime
import time
from typing import Any

from ray.tune import Callback

from evl_platform.tracking import names


def grid_entry(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's own config: Tune passes a grid point under ``entry``."""
    return config.get("entry", config)


class TrialProgress(Callback):
    """Tune callback printing one line per trial start, validation and end, with an ETA.

    Args:
        total: trials of the sweep, including those finished by an earlier attempt.
        finished: trials already finished.
        quiet: print nothing.
    """

    def __init__(self, total: int, finished: int, quiet: bool) -> None:
        self.total, self.finished, self.quiet = total, finished, quiet
        self.began = time.monotonic()
        self.ran = 0

    @staticmethod
    def _key(trial: Any) -> str:
        entry = grid_entry(trial.config)
        sample = f"/{trial.trial_id}" if entry.get("search") else ""  # as its run's trial tag
        return entry["trial"]["key"] + sample

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{datetime.datetime.now():%H:%M:%S}] {text}", flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        running = sum(t.status == "RUNNING" for t in trials)
        self._say(f"start  {self._key(trial)}  ({running} running)")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if names.VAL_ACC1 in result and "run_id" not in result:  # not the closing summary
            self._say(
                f"val    {self._key(trial)}  step {result.get('step')}  "
                f"acc1 {result[names.VAL_ACC1]:.1f}%"
            )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.finished += 1
        self.ran += 1
        left = self.total - self.finished
        eta = datetime.timedelta(seconds=round((time.monotonic() - self.began) / self.ran * left))
        acc = (trial.last_result or {}).get(names.VAL_ACC1)
        shown = f"val acc1 {acc:.1f}%" if acc is not None else "no val result"
        self._say(f"done   {self._key(trial)}  {shown}  [{self.finished}/{self.total}, ETA {eta}]")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.finished += 1
        self._say(f"FAILED {self._key(trial)}  (see its MLflow run and the Ray logs)")

"""The sweep's progress lines: one per trial start, validation and end, with an ETA (a pack's
lines name each member's validation and end)."""

from __future__ import annotations

import datetime
import time
from typing import Any

from ray.tune import Callback

from evl_platform.sweep.plan import slug
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
        if "pack" in entry:
            return f"pack {entry['run_name']} ({len(entry['pack'])} variants)"
        sample = f"/{trial.trial_id}" if entry.get("search") else ""  # as its run's trial tag
        return entry["trial"]["key"] + sample

    @staticmethod
    def _members(trial: Any) -> dict[str, str]:
        """Member key (slug) -> trial key, for a pack; ``{"": key}`` for one trial."""
        entry = grid_entry(trial.config)
        if "pack" not in entry:
            return {"": TrialProgress._key(trial)}
        return {slug(t["key"]): t["key"] for t in entry["pack"]}

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{datetime.datetime.now():%H:%M:%S}] {text}", flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        running = sum(t.status == "RUNNING" for t in trials)
        self._say(f"start  {self._key(trial)}  ({running} running)")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if "run_id" in result:  # the closing summary
            return
        for member, key in self._members(trial).items():
            acc = result.get(names.member_metric(member, names.VAL_ACC1))
            if acc is not None:
                self._say(f"val    {key}  step {result.get('step')}  acc1 {acc:.1f}%")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        members = self._members(trial)
        result = trial.last_result or {}
        self.finished += len(members)
        self.ran += len(members)
        left = self.total - self.finished
        eta = datetime.timedelta(seconds=round((time.monotonic() - self.began) / self.ran * left))
        for member, key in members.items():
            acc = result.get(names.member_metric(member, names.VAL_ACC1))
            status = result.get(names.member_metric(member, "status"), names.STATUS_FINISHED)
            if status != names.STATUS_FINISHED:
                shown = f"{status} (its run's {names.TAG_FAILURE} tag says why)"
            else:
                shown = f"val acc1 {acc:.1f}%" if acc is not None else "no val result"
            self._say(f"done   {key}  {shown}  [{self.finished}/{self.total}, ETA {eta}]")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.finished += len(self._members(trial))
        self._say(f"FAILED {self._key(trial)}  (see its MLflow run and the Ray logs)")

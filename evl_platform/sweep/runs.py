"""A sweep's MLflow runs: the parent run, and which trials finished, can continue or restart.

Trials are deterministic (planned from the ablation file), and MLflow is the record of what
finished. ``--resume`` reopens the newest unfinished parent run of the ablation and profile;
:func:`triage` then skips trials whose run FINISHED, continues the others from their last Ray
Train checkpoint in the same MLflow run (a packed trial: its pack's checkpoint, with the other
unfinished members of its pack), and deletes a run that never got as far as its run record
(it is started again), so that every trial ends with exactly one run.
"""

from __future__ import annotations

import datetime
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Run

from evl_platform.runtime.storage import PackRecord, RunRecord
from evl_platform.sweep.plan import SweepPlan, Trial
from evl_platform.tracking import names
from evl_platform.tracking.client import Tracker, git_commit
from evl_platform.train.errors import ResumeError


@dataclass(frozen=True)
class SweepParent:
    """The sweep's parent MLflow run: its id, name and, where it belongs to a batch over
    several ablation files, the batch's name (its :data:`~names.TAG_BATCH` tag)."""

    run_id: str
    name: str
    batch: str | None = None


@dataclass(frozen=True)
class TrialTodo:
    """A trial still to run, and how: a fresh run, or continuing a Ray Train run by name
    (``packed``: a pack's run, which the trial continues with the other unfinished members
    of its pack)."""

    trial: Trial
    resume_run: str | None = None
    run_name: str | None = None
    packed: bool = False


def open_parent(
    tracker: Tracker, plan: SweepPlan, *, resume: bool, tags: Mapping[str, str] | None = None
) -> SweepParent:
    """Reopens the newest unfinished parent run (``resume``) or creates one, logging the
    sweep's params and the ablation file.

    Raises:
        ResumeError: ``resume`` and no unfinished sweep of this ablation and profile.
    """
    ablation = plan.ablation
    spec = ablation.spec
    if resume:
        query = (
            f"tags.{names.TAG_KIND} = '{names.KIND_SWEEP}' and tags.{names.TAG_ABLATION} = "
            f"'{spec.name}' and tags.{names.TAG_PROFILE} = '{ablation.profile}'"
        )
        unfinished = [
            r for r in tracker.search(spec.name, query) if r.info.status != names.STATUS_FINISHED
        ]
        if not unfinished:
            raise ResumeError(
                f"--resume: no unfinished {spec.name!r} sweep (profile {ablation.profile}) in "
                f"{tracker.uri}; start it without --resume"
            )
        run = unfinished[0]
        tracker.reopen(run.info.run_id)
        return SweepParent(run.info.run_id, run.info.run_name, run.data.tags.get(names.TAG_BATCH))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{spec.name}-{ablation.profile}-{stamp}"
    run_id = tracker.create_run(
        spec.name,
        run_name=name,
        tags={
            names.TAG_KIND: names.KIND_SWEEP,
            names.TAG_ABLATION: spec.name,
            names.TAG_PAPER_TABLE: spec.table.paper,
            names.TAG_PROFILE: ablation.profile,
            names.TAG_GIT_COMMIT: git_commit(),
            **(tags or {}),
        },
    )
    tracker.log_params(
        run_id,
        {
            "sweep.ablation_file": str(ablation.path),
            "sweep.trials": len(plan.trials),
            "sweep.seeds": ",".join(str(s) for s in sorted({t.seed for t in plan.trials})),
            "sweep.overrides": " ".join(plan.overrides) or "-",
        },
    )
    with tempfile.TemporaryDirectory() as directory:
        copy = Path(directory) / names.ARTIFACT_ABLATION
        copy.write_text(ablation.text, encoding="utf-8")
        tracker.log_artifact(run_id, copy)
    return SweepParent(run_id, name, (tags or {}).get(names.TAG_BATCH))


def trial_runs(tracker: Tracker, experiment: str, parent_run_id: str) -> dict[str, Run]:
    """The parent's training runs by trial key (ensemble runs excluded)."""
    runs = {}
    for run in tracker.children(experiment, parent_run_id):
        tags = run.data.tags
        if tags.get(names.TAG_KIND) == names.KIND_TRAIN and names.TAG_TRIAL in tags:
            runs.setdefault(tags[names.TAG_TRIAL], run)  # newest first: keep the newest
    return runs


def run_status(runs: Mapping[str, Run], key: str) -> str | None:
    """The MLflow status of a trial's run; ``None`` when it has none."""
    run = runs.get(key)
    return None if run is None else run.info.status


def triage(
    tracker: Tracker, experiment: str, parent: SweepParent, trials: Sequence[Trial], storage: str
) -> tuple[list[Trial], list[TrialTodo]]:
    """Splits trials into finished ones and ones to (re)run, deciding how to continue each."""
    runs = trial_runs(tracker, experiment, parent.run_id)
    done, todo = [], []
    for trial in trials:
        if trial.scores is not None:
            continue  # an ensemble member trained elsewhere: nothing to run
        run = runs.get(trial.key)
        if run is not None and run.info.status == names.STATUS_FINISHED:
            done.append(trial)
            continue
        if run is None:
            todo.append(TrialTodo(trial))
            continue
        ray_run = run.data.tags.get(names.TAG_RAY_RUN, "")
        pack = run.data.tags.get(names.TAG_PACK)
        if pack:  # a member stopped for a non-finite loss starts afresh, like a new trial
            record = PackRecord.read(storage, pack)
            stopped = names.TAG_FAILURE in run.data.tags
            held = record is not None and (
                trial.slug in record.members or trial.qualified_slug in record.members
            )
            if held and not stopped:
                todo.append(TrialTodo(trial, resume_run=pack, run_name=pack, packed=True))
                continue
        elif ray_run and RunRecord.read(storage, ray_run) is not None:
            todo.append(TrialTodo(trial, resume_run=ray_run, run_name=ray_run))
            continue
        # killed before its run record existed: nothing to continue
        tracker.delete(run.info.run_id)
        todo.append(TrialTodo(trial))
    return done, todo

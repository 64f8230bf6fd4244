"""Runs a batch of ablation files (:mod:`.batch`) as one sweep: packs across tables.

Each table keeps its identity: its own MLflow experiment and parent run (tagged
:data:`~evl_platform.tracking.names.TAG_BATCH`), its ``results.md``/``results.csv`` and its
rows in the report. A trial that trains runs under its own table's parent; its identical
trials in other tables train nothing, and its run's tags name every cell it fills
(:func:`~evl_platform.sweep.trials.trial_tags`), so each table's results, the report and an
MLflow search by table and row find it. Every grid file's trials run in one Tune run, packed
across files; search files run after, beside them, as one file's sweep would. ``--resume``
reopens every table's newest unfinished parent and runs only what no finished run covers.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mlflow.entities import Run

from evl_platform.runtime.session import ray_session, use_cluster_defaults
from evl_platform.runtime.storage import resolve_storage
from evl_platform.sweep.batch import BatchPlan, pack_batch
from evl_platform.sweep.packs import packing_table
from evl_platform.sweep.plan import SweepPlan
from evl_platform.sweep.runner import (
    SweepOptions,
    SweepOutcome,
    check_storage,
    kill_open_trials,
    prepare_features,
    resolve_data,
    table_outcome,
)
from evl_platform.sweep.runs import SweepParent, open_parent, triage, trial_runs
from evl_platform.sweep.summary import results_table
from evl_platform.sweep.trials import run_grid, sweep_context
from evl_platform.tracking import names
from evl_platform.tracking.client import Tracker
from evl_platform.tracking.phases import Clock, breakdown


@dataclass
class BatchOutcome:
    """What a finished batch left behind: one :class:`SweepOutcome` per table."""

    name: str
    tables: list[SweepOutcome]
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    tune_trials: int = 0
    trained: int = 0

    @property
    def failed(self) -> list[str]:
        """``ablation:key`` of every trained trial whose run did not finish."""
        return [f"{t.experiment}:{key}" for t in self.tables for key in t.failed]

    def breakdown(self) -> str:
        """Where the batch's time went (see :func:`.phases.breakdown`)."""
        return breakdown(self.timings, wall=self.seconds, trials=self.tune_trials)


def run_batch(batch: BatchPlan, options: SweepOptions | None = None) -> BatchOutcome:
    """Runs (or with ``options.resume`` finishes) every table of the batch.

    Raises:
        ResumeError: ``--resume`` finds no unfinished sweep of one of the tables.
    """
    options = options or SweepOptions()
    began = time.monotonic()
    name = f"batch-{batch.plans[0].ablation.profile}-{_now()}"
    with ray_session(options.address, log_to_driver=False) as attached:
        use_cluster_defaults(attached)
        tracker = Tracker(options.tracking_uri)
        storage = resolve_storage(options.storage_path)
        check_storage([t for p in batch.plans for t in batch.trained(p)], storage, tracker.uri)
        parents: dict[str, SweepParent] = {}
        status = names.STATUS_FAILED
        try:
            for plan in batch.plans:
                tags = {**options.tags, names.TAG_BATCH: name}
                parents[plan.ablation.name] = open_parent(
                    tracker, plan, resume=options.resume, tags=tags
                )
            if options.resume:  # the batch keeps its name: the reopened parents' tag
                name = next((p.batch for p in parents.values() if p.batch), name)
            print(
                f"batch {name}: {len(batch.plans)} tables, {batch.cells} cells trained by "
                f"{batch.unique} runs ({tracker.uri})",
                flush=True,
            )
            outcome = _run_tables(batch, tracker, parents, storage, options, name)
            outcome.seconds = time.monotonic() - began
            status = names.STATUS_FAILED if outcome.failed else names.STATUS_FINISHED
            return outcome
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see ray_session)
            status = names.STATUS_KILLED
            for plan in batch.plans:
                if plan.ablation.name in parents:
                    kill_open_trials(tracker, plan.ablation.name, parents[plan.ablation.name])
            raise
        finally:
            for parent in parents.values():
                tracker.terminate(parent.run_id, status)


def _now() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def _run_tables(
    batch: BatchPlan,
    tracker: Tracker,
    parents: Mapping[str, SweepParent],
    storage: str,
    options: SweepOptions,
    name: str,
) -> BatchOutcome:
    """Trains what no finished run covers, runs the searches, writes every table's results."""
    clock = Clock()
    contexts = {
        p.ablation.name: sweep_context(p, parents[p.ablation.name], storage, tracker.uri)
        for p in batch.plans
    }
    done, todo = [], []
    with clock.phase(names.TIME_TRACKING):
        for plan in batch.grid_plans:
            spec = plan.ablation.spec
            finished, left = triage(
                tracker, spec.name, parents[spec.name], batch.trained(plan), storage
            )
            done += finished
            todo += left
    if done:
        print(f"resuming: {len(done)} trials already finished, {len(todo)} to run", flush=True)
    with clock.phase(names.TIME_SYNTHESIS):
        resolve_data([t.trial for t in todo])
    with clock.phase(names.TIME_FEATURES):
        prepare_features([t.trial for t in todo], use_gpu=_any_gpu(batch))
    tune_trials = 0
    if todo:
        packing = pack_batch(todo, batch, enabled=options.pack)
        print(packing_table(packing), flush=True)
        first = batch.grid_plans[0]
        results = run_grid(
            first,
            packing.packs,
            {**contexts[first.ablation.name], "run_name": name},
            max_concurrent=options.max_concurrent,
            finished_before=len(done),
            quiet=options.quiet,
            sweeps=contexts,
        )
        tune_trials = len(results)
        for result in results:
            clock.add(result)
    for plan in batch.plans:
        if plan.ablation.spec.search is not None:
            from evl_platform.sweep.search import run_search

            spec = plan.ablation.spec
            context = contexts[spec.name]
            run_search(
                plan, tracker, parents[spec.name], context, max_concurrent=options.max_concurrent
            )
    with clock.phase(names.TIME_TRACKING):
        tables = _write_tables(batch, tracker, parents, storage)
    return BatchOutcome(
        name=name,
        tables=tables,
        timings=clock.seconds,
        tune_trials=tune_trials,
        trained=batch.unique,
    )


def _any_gpu(batch: BatchPlan) -> bool:
    return any(p.ablation.spec.resources.use_gpu for p in batch.plans)


def _write_tables(
    batch: BatchPlan, tracker: Tracker, parents: Mapping[str, SweepParent], storage: str
) -> list[SweepOutcome]:
    """Each table's results from its own runs and, for its copies, the runs that fill them."""
    own = {name: trial_runs(tracker, name, parent.run_id) for name, parent in parents.items()}
    outcomes = []
    for plan in batch.plans:
        spec = plan.ablation.spec
        runs = table_runs(plan, batch, own)
        table = results_table(plan, runs)
        ensembles = None
        if spec.ensemble is not None:
            from evl_platform.sweep.ensembles import run_ensembles

            ensembles = run_ensembles(plan, tracker, parents[spec.name], runs)
        outcomes.append(
            table_outcome(plan, tracker, parents[spec.name], storage, runs, table, ensembles)
        )
    return outcomes


def table_runs(
    plan: SweepPlan, batch: BatchPlan, own: Mapping[str, Mapping[str, Run]]
) -> dict[str, Run]:
    """A table's runs by trial key: its own parent's, plus for each copy the run of the
    identical trial that trained (``own``: each ablation's runs by trial key)."""
    name = plan.ablation.name
    runs: dict[str, Any] = dict(own.get(name, {}))
    for trial in plan.trials:
        home = batch.copies.get((name, trial.key))
        if home is not None and home[1] in own.get(home[0], {}):
            runs[trial.key] = own[home[0]][home[1]]
    return runs

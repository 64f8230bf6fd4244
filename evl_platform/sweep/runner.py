"""Runs an ablation on Ray Tune: one MLflow parent run, one nested training run per trial.

The driver plans the sweep (:mod:`.plan`: every trial's config resolved once), opens or
reopens the parent run and sorts the trials by what their runs say (:mod:`.runs`), extracts
the frozen features the trials share, runs the remaining trials on Tune (:mod:`.trials`, or
:mod:`.search` for a search block), runs the ensemble stage (:mod:`.ensembles`) and writes the
results table (:mod:`.summary`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Run

from evl_platform.runtime.cluster import check_shared
from evl_platform.runtime.session import ray_session, use_cluster_defaults
from evl_platform.runtime.storage import resolve_storage, shared_locations
from evl_platform.sweep.packs import Packing, pack_todo, packing_table
from evl_platform.sweep.plan import SweepPlan, Trial, plan_sweep
from evl_platform.sweep.results import ResultsTable
from evl_platform.sweep.runs import SweepParent, TrialTodo, open_parent, triage, trial_runs
from evl_platform.sweep.summary import failed_trials, results_table, write_results
from evl_platform.sweep.trials import run_grid, sweep_context
from evl_platform.tracking import names
from evl_platform.tracking.client import Tracker
from evl_platform.tracking.phases import Clock, breakdown


@dataclass
class SweepOptions:
    """How to run a sweep (everything that is not the ablation file).

    Attributes:
        profile: experiment profile (``local`` stand-ins or ``paper``); default ``local``.
        max_concurrent: trials running at once (default: what the cluster's CPUs/GPUs fit).
        seeds: run seeds ``0..seeds-1`` instead of the file's ``seeds``.
        resume: finish the newest unfinished sweep of this ablation and profile.
        address: Ray cluster address; ``None`` starts Ray locally.
        tracking_uri: MLflow tracking URI.
        storage_path: Ray storage for checkpoints (default ``./ray_results``).
        overrides: extra dotted overrides applied to every trial (``--set``).
        tags: extra tags on the parent run.
        quiet: no per-trial progress lines.
        pack: train variants that share their backbone-side inputs as packs, one backbone
            pass per batch for all of them (:mod:`.packs`); ``False`` (``--no-pack``): one
            Tune trial per variant.
    """

    profile: str | None = None
    max_concurrent: int | None = None
    seeds: int | None = None
    resume: bool = False
    address: str | None = None
    tracking_uri: str | None = None
    storage_path: str | None = None
    overrides: Sequence[str] = ()
    tags: dict[str, str] = field(default_factory=dict)
    quiet: bool = False
    pack: bool = True


@dataclass
class SweepOutcome:
    """What a finished sweep left behind."""

    parent_run_id: str
    run_name: str
    experiment: str
    table: ResultsTable
    ensembles: ResultsTable | None
    results_dir: Path
    trial_runs: dict[str, str]
    failed: list[str]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    tune_trials: int = 0

    def breakdown(self) -> str:
        """Where the time went, phase by phase (see :func:`.phases.breakdown`)."""
        return breakdown(self.timings, wall=self.seconds, trials=self.tune_trials)


def plan(path: str | Path, options: SweepOptions) -> SweepPlan:
    """The sweep of an ablation file under ``options`` (profile, seeds, ``--set``), planned
    once on the driver; see :func:`~evl_platform.sweep.plan.plan_sweep`."""
    return plan_sweep(
        path, profile=options.profile, seeds=options.seeds, overrides=options.overrides
    )


def plan_packing(planned: SweepPlan, options: SweepOptions) -> Packing:
    """How a fresh run of the plan packs its trials (what ``--dry-run`` prints)."""
    spec = planned.ablation.spec
    return pack_todo(
        [TrialTodo(t) for t in planned.trials if t.scores is None],
        enabled=options.pack,
        pack_size=spec.sweep.pack_size,
        use_gpu=spec.resources.use_gpu,
        num_workers=spec.resources.num_workers,
    )


def run_sweep(source: str | Path | SweepPlan, options: SweepOptions | None = None) -> SweepOutcome:
    """Runs (or with ``options.resume`` finishes) every trial of an ablation.

    Args:
        source: the ablation file, or a sweep already planned from it (no file is read then).
        options: how to run it; a plan's profile, seeds and overrides are the ones it holds.

    Raises:
        AblationError: a bad ablation file or trial config (nothing has run).
        ResumeError: ``--resume`` finds no unfinished sweep of this ablation.
    """
    options = options or SweepOptions()
    began = time.monotonic()
    planned = source if isinstance(source, SweepPlan) else plan(source, options)
    spec = planned.ablation.spec
    with ray_session(options.address, log_to_driver=False) as attached:
        use_cluster_defaults(attached)
        tracker = Tracker(options.tracking_uri)
        storage = resolve_storage(options.storage_path)
        check_storage(planned.trials, storage, tracker.uri)
        parent = open_parent(tracker, planned, resume=options.resume, tags=options.tags)
        print(
            f"sweep {parent.name}: {len(planned.trials)} trials of {planned.ablation.path} "
            f"(profile {planned.ablation.profile}); MLflow parent run {parent.run_id} in "
            f"experiment {spec.name!r} ({tracker.uri})",
            flush=True,
        )
        status = names.STATUS_FAILED
        try:
            outcome = _run_trials(planned, tracker, parent, storage, options)
            outcome.seconds = time.monotonic() - began
            status = names.STATUS_FAILED if outcome.failed else names.STATUS_FINISHED
            return outcome
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see ray_session)
            status = names.STATUS_KILLED
            kill_open_trials(tracker, spec.name, parent)
            raise
        finally:
            tracker.terminate(parent.run_id, status)


def kill_open_trials(tracker: Tracker, experiment: str, parent: SweepParent) -> None:
    """Marks the trial runs still RUNNING as KILLED: their trainers die with the driver and
    cannot. ``--resume`` continues them from their checkpoints whatever their status."""
    for run in trial_runs(tracker, experiment, parent.run_id).values():
        tracker.terminate_open(run.info.run_id, names.STATUS_KILLED)


def check_storage(trials: Sequence[Trial], storage: str, uri: str) -> None:
    """Refuses node-local storage on a cluster once, for every trial (see check_shared)."""
    locations: dict[str, str] = {}
    for trial in trials:
        if trial.scores is None:
            locations |= shared_locations(trial.cfg, storage, uri)
    check_shared(locations)


def _run_trials(
    planned: SweepPlan,
    tracker: Tracker,
    parent: SweepParent,
    storage: str,
    options: SweepOptions,
) -> SweepOutcome:
    """Runs what is left of the sweep and writes its results (inside the Ray session)."""
    spec = planned.ablation.spec
    clock = Clock()
    with clock.phase(names.TIME_TRACKING):
        done, todo = triage(tracker, spec.name, parent, planned.trials, storage)
    if done:
        print(f"resuming: {len(done)} trials already finished, {len(todo)} to run")
    with clock.phase(names.TIME_SYNTHESIS):
        resolve_data([t.trial for t in todo])
    with clock.phase(names.TIME_FEATURES):
        prepare_features([t.trial for t in todo], use_gpu=spec.resources.use_gpu)
    context = sweep_context(planned, parent, storage, tracker.uri)
    tune_trials = 0
    if spec.search is not None:
        from evl_platform.sweep.search import run_search

        run_search(planned, tracker, parent, context, max_concurrent=options.max_concurrent)
    elif todo:
        packing = pack_todo(
            todo,
            enabled=options.pack,
            pack_size=spec.sweep.pack_size,
            use_gpu=spec.resources.use_gpu,
            num_workers=spec.resources.num_workers,
        )
        print(packing_table(packing), flush=True)
        results = run_grid(
            planned,
            packing.packs,
            context,
            max_concurrent=options.max_concurrent,
            finished_before=len(done),
            quiet=options.quiet,
        )
        tune_trials = len(results)
        for result in results:
            clock.add(result)
    with clock.phase(names.TIME_TRACKING):
        runs = trial_runs(tracker, spec.name, parent.run_id)
        table = results_table(planned, runs)
    ensembles = None
    if spec.ensemble is not None:
        from evl_platform.sweep.ensembles import run_ensembles

        with clock.phase(names.TIME_TRACKING):
            ensembles = run_ensembles(planned, tracker, parent, runs)
    outcome = table_outcome(planned, tracker, parent, storage, runs, table, ensembles)
    outcome.timings, outcome.tune_trials = clock.seconds, tune_trials
    return outcome


def table_outcome(
    planned: SweepPlan,
    tracker: Tracker,
    parent: SweepParent,
    storage: str,
    runs: Mapping[str, Run],
    table: ResultsTable,
    ensembles: ResultsTable | None,
) -> SweepOutcome:
    """One table's outcome from its runs by trial key: its results written beside its parent
    run (:func:`~.summary.write_results`) and the trials whose run did not finish (none for a
    search, whose early-stopped samples are its own business)."""
    spec = planned.ablation.spec
    return SweepOutcome(
        parent_run_id=parent.run_id,
        run_name=parent.name,
        experiment=spec.name,
        table=table,
        ensembles=ensembles,
        results_dir=write_results(parent, storage, table, ensembles, tracker),
        trial_runs={k: r.info.run_id for k, r in runs.items()},
        failed=[] if spec.search is not None else failed_trials(planned.trials, runs),
        seconds=0.0,
    )


def resolve_data(trials: Sequence[Trial]) -> None:
    """Resolves every dataset the trials read once, generating stand-ins that are missing
    (so that no trial waits for another's generation)."""
    from evl_platform.data.source import read_splits

    seen = set()
    for trial in trials:
        if trial.scores is None and trial.cfg.data.model_dump_json() not in seen:
            seen.add(trial.cfg.data.model_dump_json())
            read_splits(trial.cfg.data)


def prepare_features(trials: Sequence[Trial], *, use_gpu: bool) -> None:
    """Extracts the frozen features the trials read, once per distinct extraction
    (:func:`~evl_platform.features.extraction_identity`), before any trial starts.

    Configs whose modules read attention maps go first: their extraction also writes the
    block outputs the others read, so the backbone runs once per dataset.
    """
    from evl_platform.features import extraction_identity, prepare_features
    from evl_platform.features.key import tensor_kinds

    configs = {}
    for trial in trials:
        if trial.scores is None and trial.cfg.features.reuse:
            configs.setdefault(extraction_identity(trial.cfg), trial.cfg)
    for cfg in sorted(configs.values(), key=lambda c: "attn" not in tensor_kinds(c)):
        stats = prepare_features(cfg, use_gpu=use_gpu)
        if stats.extracted_clips:
            print(
                f"features: extracted {stats.extracted_clips} clips of {cfg.data.dataset} in "
                f"{stats.seconds:.0f} s",
                flush=True,
            )

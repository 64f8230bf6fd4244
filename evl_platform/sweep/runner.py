"""Runs an ablation on Ray Tune: one MLflow parent run, one nested training run per trial.

Ray 2.60 runs Ray Train V2, whose trainers cannot be handed to ``Tuner``: each Tune trial is a
function trainable (:func:`run_trial`) that launches the trial's ``TorchTrainer`` through
:func:`evl_platform.train.launcher.train` and forwards its reports to Tune with
``TuneReportCallback``. The trial actor itself reserves no CPU; ``--max-concurrent`` (default:
as many trials as the cluster has worker slots) bounds how many TorchTrainers run at once.

Resume: trials are deterministic (expanded from the ablation file), and MLflow is the record
of what finished. ``--resume`` reopens the newest unfinished parent run of the ablation and
profile, skips trials whose run FINISHED, continues the others from their last Ray Train
checkpoint in the same MLflow run, and deletes a run that never got as far as its run record
(it is started again) so that every trial ends with exactly one run.
"""

from __future__ import annotations

import datetime
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from ray.tune import Callback

from evl_platform.runtime.cluster import check_shared
from evl_platform.runtime.session import ray_session, use_cluster_defaults
from evl_platform.runtime.storage import RunRecord, resolve_storage, shared_locations
from evl_platform.sweep.results import ResultsTable
from evl_platform.sweep.spec import (
    Ablation,
    Trial,
    check_trials,
    expand,
    load_ablation,
    override_strings,
)
from evl_platform.tracking import names
from evl_platform.tracking.client import Tracker, git_commit
from evl_platform.train.errors import ResumeError
from evl_platform.train.launcher import TrainOptions

_TRIAL_ACTOR_MEMORY = 64 * 1024**2


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


def plan(path: str | Path, options: SweepOptions) -> tuple[Ablation, list[Trial]]:
    """Loads the ablation and expands its trials, validating every trial's config."""
    ablation = load_ablation(path, profile=options.profile)
    trials = expand(ablation, seeds=options.seeds)
    check_trials(ablation, trials, options.overrides)
    return ablation, trials


def dry_run_table(ablation: Ablation, trials: Sequence[Trial]) -> str:
    """The trial table ``--dry-run`` prints: variant, dataset, seed, what stands in, overrides."""
    spec = ablation.spec
    lines = [
        f"{ablation.path}: {spec.name} (paper Table {spec.table.paper}), profile "
        f"{ablation.profile}, {len(trials)} trials"
    ]
    header = ("variant", "dataset", "seed", "runs on", "overrides")
    rows = []
    for trial in trials:
        if trial.scores is not None:
            runs_on, shown = f"scores file {Path(trial.scores).name}", "-"
        else:
            cfg = trial.load(ablation.profile)
            model = cfg.model.backbone.name if cfg.model.arch == "evl" else cfg.model.arch
            runs_on = f"{cfg.data.dataset}, {cfg.data.num_frames}f, {model}"
            shown = " ".join(o for o in trial.overrides if not o.startswith(("seed=", "name=")))
        rows.append((trial.variant, trial.dataset, str(trial.seed), runs_on, shown or "-"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        lines.append("  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[4]]))
    if spec.search is not None:
        space = ", ".join(
            f"{k} {next(f'{kind}{list(v)}' for kind, v in dim if v is not None)}"
            for k, dim in spec.search.space.items()
        )
        asha = f", ASHA grace {spec.search.asha.grace_period}" if spec.search.asha else ""
        lines.append(
            f"search: {spec.search.algorithm}, {spec.search.num_samples} samples per trial "
            f"row maximising {spec.search.metric}{asha}; space: {space}"
        )
    if spec.ensemble is not None:
        pairs = ", ".join(f"{a} + {b}" for a, b in spec.ensemble.pairs)
        lines.append(f"ensembles: {pairs}; alphas {list(spec.ensemble.alphas)}")
    return "\n".join(lines)


# --- the Tune trial ------------------------------------------------------------------------


def run_trial(config: dict[str, Any]) -> dict[str, Any]:
    """Tune function trainable: one trial's training run, reported to Tune as it goes.

    ``config``: ``trial`` (a :class:`Trial` dict), ``sweep`` (profile, overrides, resources,
    tracking URI, storage, experiment, parent run id and name), ``resume_run`` (a Ray Train
    run name to continue) and, in a search, ``search`` (sampled dotted overrides) and
    ``report_metric`` (only results holding this metric reach Tune).
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from evl_platform.train.launcher import train

    class MetricReportCallback(TuneReportCallback):
        """Forwards only the reports that carry ``metric``: Optuna and ASHA need it in each."""

        def __init__(self, metric: str) -> None:
            super().__init__()
            self.metric = metric

        def after_report(
            self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
        ) -> None:
            if self.metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    trial = Trial.from_dict(config["trial"])
    sweep = config["sweep"]
    sampled = config.get("search") or {}
    if sampled:  # a search sample is its own trial: key it by Tune's trial id
        trial_id = tune.get_context().get_trial_id()
        trial = Trial.from_dict(trial.to_dict() | {"key": f"{trial.key}/{trial_id}"})
    cfg = trial.load(sweep["profile"], [*sweep["overrides"], *override_strings(sampled)])
    resources = sweep["resources"]
    tags = {
        names.TAG_ABLATION: sweep["ablation"],
        names.TAG_PAPER_TABLE: sweep["paper_table"],
        names.TAG_PAPER_ROW: trial.row,
        names.TAG_VARIANT: trial.variant,
        names.TAG_DATASET_KEY: trial.dataset,
        names.TAG_SEED: str(trial.seed),
        names.TAG_TRIAL: trial.key,
        names.TAG_SWEEP: sweep["run_name"],
    }
    options = TrainOptions(
        num_workers=resources["num_workers"],
        use_gpu=resources["use_gpu"],
        cpus_per_worker=resources["cpus_per_worker"],
        tracking_uri=sweep["tracking_uri"],
        storage_path=sweep["storage"],
        resume=config.get("resume_run"),
        mlflow_experiment=sweep["experiment"],
        run_name=config.get("run_name") or f"{sweep['run_name']}-{trial.slug}",
        parent_run_id=sweep["parent_run_id"],
        tags=tags,
        check_storage=False,  # the driver checked once for the whole sweep
        callbacks=[
            MetricReportCallback(config["report_metric"])
            if config.get("report_metric")
            else TuneReportCallback()
        ],
    )
    outcome = train(cfg, options)
    return {"run_id": outcome.run_id, **outcome.metrics}


# --- the driver ------------------------------------------------------------------------------


def run_sweep(path: str | Path, options: SweepOptions | None = None) -> SweepOutcome:
    """Runs (or with ``options.resume`` finishes) every trial of an ablation file.

    Raises:
        AblationError: a bad ablation file or trial config (nothing has run).
        ResumeError: ``--resume`` finds no unfinished sweep of this ablation.
    """
    options = options or SweepOptions()
    began = time.monotonic()
    ablation, trials = plan(path, options)
    spec = ablation.spec
    with ray_session(options.address, log_to_driver=False) as attached:
        use_cluster_defaults(attached)
        tracker = Tracker(options.tracking_uri)
        storage = resolve_storage(options.storage_path)
        _check_storage(ablation, trials, options, storage, tracker.uri)
        experiment = spec.name
        parent = _open_parent(tracker, ablation, trials, options, experiment)
        print(
            f"sweep {parent.name}: {len(trials)} trials of {ablation.path} (profile "
            f"{ablation.profile}); MLflow parent run {parent.run_id} in experiment "
            f"{experiment!r} ({tracker.uri})",
            flush=True,
        )
        status = names.STATUS_FAILED
        try:
            outcome = _run_trials(ablation, trials, tracker, parent, storage, options)
            outcome.seconds = time.monotonic() - began
            status = names.STATUS_FAILED if outcome.failed else names.STATUS_FINISHED
            return outcome
        except KeyboardInterrupt:
            status = names.STATUS_KILLED
            raise
        finally:
            tracker.terminate(parent.run_id, status)


def _check_storage(
    ablation: Ablation, trials: Sequence[Trial], options: SweepOptions, storage: str, uri: str
) -> None:
    """Refuses node-local storage on a cluster once, for every trial (see check_shared)."""
    locations: dict[str, str] = {}
    for trial in trials:
        if trial.scores is None:
            locations |= shared_locations(
                trial.load(ablation.profile, options.overrides), storage, uri
            )
    check_shared(locations)


def _run_trials(
    ablation: Ablation,
    trials: Sequence[Trial],
    tracker: Tracker,
    parent: _Parent,
    storage: str,
    options: SweepOptions,
) -> SweepOutcome:
    """Runs what is left of the sweep and writes its results (inside the Ray session)."""
    spec = ablation.spec
    experiment = spec.name
    done, todo = _triage(tracker, experiment, parent, trials, storage)
    if done:
        print(f"resuming: {len(done)} trials already finished, {len(todo)} to run")
    trained = [t for t in todo if t.trial.scores is None]
    _prepare_features(ablation, [t.trial for t in trained], options)
    if spec.search is not None:
        from evl_platform.sweep.search import run_search

        run_search(ablation, trials, tracker, parent, storage, options, _context)
    elif trained:
        _run_tune(ablation, trained, parent, storage, options, len(done))
    runs = _trial_runs(tracker, experiment, parent.run_id)
    table = _table(ablation, trials, runs)
    ensembles = None
    if spec.ensemble is not None:
        from evl_platform.sweep.ensembles import run_ensembles

        ensembles = run_ensembles(ablation, trials, tracker, parent, runs)
    results_dir = _write_results(ablation, parent, storage, table, ensembles, tracker)
    failed = [
        t.key for t in trials if t.scores is None and _status(runs, t.key) != names.STATUS_FINISHED
    ]
    if spec.search is not None:
        failed = []
    return SweepOutcome(
        parent_run_id=parent.run_id,
        run_name=parent.name,
        experiment=experiment,
        table=table,
        ensembles=ensembles,
        results_dir=results_dir,
        trial_runs={k: r.info.run_id for k, r in runs.items()},
        failed=failed,
        seconds=0.0,
    )


@dataclass
class _Parent:
    run_id: str
    name: str


@dataclass
class _Todo:
    trial: Trial
    resume_run: str | None = None
    run_name: str | None = None


def _context(
    ablation: Ablation, parent: _Parent, storage: str, options: SweepOptions, tracker: Tracker
) -> dict[str, Any]:
    """The ``sweep`` entry of every trial's Tune config."""
    spec = ablation.spec
    return {
        "ablation": spec.name,
        "paper_table": spec.table.paper,
        "profile": ablation.profile,
        "overrides": list(options.overrides),
        "resources": spec.resources.model_dump(),
        "tracking_uri": tracker.uri,
        "storage": storage,
        "experiment": spec.name,
        "parent_run_id": parent.run_id,
        "run_name": parent.name,
    }


def _open_parent(
    tracker: Tracker,
    ablation: Ablation,
    trials: Sequence[Trial],
    options: SweepOptions,
    experiment: str,
) -> _Parent:
    spec = ablation.spec
    if options.resume:
        query = (
            f"tags.{names.TAG_KIND} = '{names.KIND_SWEEP}' and tags.{names.TAG_ABLATION} = "
            f"'{spec.name}' and tags.{names.TAG_PROFILE} = '{ablation.profile}'"
        )
        unfinished = [
            r for r in tracker.search(experiment, query) if r.info.status != names.STATUS_FINISHED
        ]
        if not unfinished:
            raise ResumeError(
                f"--resume: no unfinished {spec.name!r} sweep (profile {ablation.profile}) in "
                f"{tracker.uri}; start it without --resume"
            )
        run = unfinished[0]
        tracker.reopen(run.info.run_id)
        return _Parent(run.info.run_id, run.info.run_name)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{spec.name}-{ablation.profile}-{stamp}"
    run_id = tracker.create_run(
        experiment,
        run_name=name,
        tags={
            names.TAG_KIND: names.KIND_SWEEP,
            names.TAG_ABLATION: spec.name,
            names.TAG_PAPER_TABLE: spec.table.paper,
            names.TAG_PROFILE: ablation.profile,
            names.TAG_GIT_COMMIT: git_commit(),
            **options.tags,
        },
    )
    tracker.log_params(
        run_id,
        {
            "sweep.ablation_file": str(ablation.path),
            "sweep.trials": len(trials),
            "sweep.seeds": ",".join(str(s) for s in sorted({t.seed for t in trials})),
            "sweep.overrides": " ".join(options.overrides) or "-",
        },
    )
    with tempfile.TemporaryDirectory() as directory:
        copy = Path(directory) / names.ARTIFACT_ABLATION
        copy.write_text(ablation.text, encoding="utf-8")
        tracker.log_artifact(run_id, copy)
    return _Parent(run_id, name)


def _trial_runs(tracker: Tracker, experiment: str, parent_run_id: str) -> dict[str, Run]:
    """The parent's training runs by trial key (ensemble runs excluded)."""
    runs = {}
    for run in tracker.children(experiment, parent_run_id):
        tags = run.data.tags
        if tags.get(names.TAG_KIND) == names.KIND_TRAIN and names.TAG_TRIAL in tags:
            runs.setdefault(tags[names.TAG_TRIAL], run)  # newest first: keep the newest
    return runs


def _status(runs: dict[str, Run], key: str) -> str | None:
    run = runs.get(key)
    return None if run is None else run.info.status


def _triage(
    tracker: Tracker, experiment: str, parent: _Parent, trials: Sequence[Trial], storage: str
) -> tuple[list[Trial], list[_Todo]]:
    """Splits trials into finished ones and ones to (re)run, deciding how to continue each."""
    runs = _trial_runs(tracker, experiment, parent.run_id)
    done, todo = [], []
    for trial in trials:
        if trial.scores is not None:
            continue  # an ensemble member trained elsewhere: nothing to run
        run = runs.get(trial.key)
        if run is not None and run.info.status == names.STATUS_FINISHED:
            done.append(trial)
            continue
        if run is None:
            todo.append(_Todo(trial))
            continue
        ray_run = run.data.tags.get(names.TAG_RAY_RUN, "")
        if ray_run and RunRecord.read(storage, ray_run) is not None:
            todo.append(_Todo(trial, resume_run=ray_run, run_name=ray_run))
        else:  # killed before its run record existed: nothing to continue
            tracker.delete(run.info.run_id)
            todo.append(_Todo(trial))
    return done, todo


def _prepare_features(ablation: Ablation, trials: Sequence[Trial], options: SweepOptions) -> None:
    """Extracts the frozen features every trial reads, once, before any trial starts.

    Configs with T-CA go first: their extraction also writes the block outputs the
    others read, so the backbone runs once per dataset.
    """
    from evl_platform.features import prepare_features

    seen, configs = set(), []
    for trial in trials:
        cfg = trial.load(ablation.profile, options.overrides)
        if not cfg.features.reuse:
            continue
        key = (
            cfg.data.model_dump_json(),
            cfg.model.backbone.model_dump_json(),
            tuple(cfg.model.decoder.configured_feature_layers()),
            cfg.model.decoder.temporal_cross_attn,
            cfg.features.model_dump_json(),
        )
        if key not in seen:
            seen.add(key)
            configs.append(cfg)
    configs.sort(key=lambda c: not c.model.decoder.temporal_cross_attn)
    for cfg in configs:
        stats = prepare_features(cfg, use_gpu=ablation.spec.resources.use_gpu)
        if stats.extracted_clips:
            print(
                f"features: extracted {stats.extracted_clips} clips of {cfg.data.dataset} in "
                f"{stats.seconds:.0f} s",
                flush=True,
            )


def default_concurrency(ablation: Ablation) -> int:
    """Trials that fit the cluster at once: its CPUs (or GPUs) over one trial's needs."""
    import ray

    res = ablation.spec.resources
    available = ray.cluster_resources()
    if res.use_gpu:
        return max(1, int(available.get("GPU", 0) // res.num_workers))
    return max(1, int(available.get("CPU", 1) // (res.num_workers * res.cpus_per_worker)))


def _run_tune(
    ablation: Ablation,
    todo: Sequence[_Todo],
    parent: _Parent,
    storage: str,
    options: SweepOptions,
    finished_before: int,
) -> None:
    from ray import tune

    tracker = Tracker(options.tracking_uri)
    context = _context(ablation, parent, storage, options, tracker)
    configs = [
        {
            "trial": item.trial.to_dict(),
            "sweep": context,
            "resume_run": item.resume_run,
            "run_name": item.run_name,
        }
        for item in todo
    ]
    concurrent = options.max_concurrent or default_concurrency(ablation)
    progress = TrialProgress(
        total=len(todo) + finished_before, finished=finished_before, quiet=options.quiet
    )
    print(f"running {len(todo)} trials, {concurrent} at a time", flush=True)
    tuner = tune.Tuner(
        # A trial actor only drives its TorchTrainer: no CPU of its own (Tune needs a
        # non-empty request, so a token amount of memory).
        tune.with_resources(run_trial_entry, {"memory": _TRIAL_ACTOR_MEMORY}),
        param_space={"entry": tune.grid_search(configs)},
        # A finished trial's actor runs the next one: its process, imports and MLflow store
        # carry over (each trial's TorchTrainer has ended, unlike an early-stopped search
        # sample's, see search.py).
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"tune-{parent.name}",
            storage_path=storage,
            verbose=0,
            callbacks=[progress],
        ),
    )
    tuner.fit()


def _unwrap(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("entry", config)


def run_trial_entry(config: dict[str, Any]) -> dict[str, Any]:
    """Tune passes the grid entry under ``entry``."""
    return run_trial(_unwrap(config))


def _table(ablation: Ablation, trials: Sequence[Trial], runs: dict[str, Run]) -> ResultsTable:
    spec = ablation.spec
    notes = {}
    for trial in trials:
        if trial.dataset not in notes and trial.scores is None:
            notes[trial.dataset] = trial.load(ablation.profile).data.dataset
    table = ResultsTable(
        title=f"{spec.name} (paper Table {spec.table.paper}, profile {ablation.profile})",
        metric=spec.table.metric,
        rows=[],
        columns=list(spec.experiments),
        column_notes={k: v for k, v in notes.items() if v != k},
    )
    for trial in trials if spec.search is None else ():  # a search has a row per sample
        if _row(trial) not in table.rows:
            table.rows.append(_row(trial))
    for key, run in sorted(runs.items()):
        trial = next((t for t in trials if t.key == key), None)
        value = run.data.metrics.get(spec.table.metric)
        if run.info.status != names.STATUS_FINISHED or value is None:
            continue
        if trial is None and spec.search is not None:  # a search sample: its sampled values
            params = run.data.params
            sampled = _settings({k: params.get(k) for k in spec.search.space})
            column = run.data.tags[names.TAG_DATASET_KEY]
            table.add(key.split("/")[-1] + sampled, column, value)
        elif trial is not None:
            table.add(_row(trial), trial.dataset, value)
    return table


def _row(trial: Trial) -> str:
    """A trial's table row: its variant, plus its grid point if any."""
    return trial.variant + _settings(trial.grid)


def _settings(values: dict[str, Any]) -> str:
    """`` lr=0.001 dropout=0.5``: dotted keys shortened to their last part."""
    return "".join(f" {k.split('.')[-1]}={v}" for k, v in values.items())


def _write_results(
    ablation: Ablation,
    parent: _Parent,
    storage: str,
    table: ResultsTable,
    ensembles: ResultsTable | None,
    tracker: Tracker,
) -> Path:
    local = Path(storage) if "://" not in storage else Path.cwd() / "sweeps"
    directory = local / parent.name
    directory.mkdir(parents=True, exist_ok=True)
    markdown = table.markdown()
    if ensembles is not None:
        markdown += "\n" + ensembles.markdown()
        ensembles.write_csv(directory / "ensembles.csv")
        tracker.log_artifact(parent.run_id, directory / "ensembles.csv")
    (directory / names.ARTIFACT_RESULTS_MD).write_text(markdown, encoding="utf-8")
    table.write_csv(directory / names.ARTIFACT_RESULTS_CSV)
    for name in (names.ARTIFACT_RESULTS_MD, names.ARTIFACT_RESULTS_CSV):
        tracker.log_artifact(parent.run_id, directory / name)
    return directory


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
        entry = _unwrap(trial.config)
        sample = f"/{trial.trial_id}" if entry.get("search") else ""  # as its run's trial tag
        return entry["trial"]["key"] + sample

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{datetime.datetime.now():%H:%M:%S}] {text}", flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        running = sum(t.status == names.STATUS_RUNNING for t in trials)
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

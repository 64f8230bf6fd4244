"""Launches one training on Ray Train (V2 ``TorchTrainer``) and tracks it as one MLflow run.

The driver resolves the data (generating a stand-in if needed), prepares cached backbone
features when ``features.reuse`` is on, opens the MLflow run, and starts the trainer. Ray is
started locally on demand (and shut down afterwards) unless an address is given or Ray is
already initialised. A run lives under ``<storage>/<run name>/``: Ray's checkpoints plus
``evl_run.json`` (MLflow run id, config), which is what ``--resume`` continues.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from evl_platform.config import ExperimentConfig, dump_config, flatten_config
from evl_platform.runtime.cluster import check_shared
from evl_platform.runtime.session import ray_session, use_cluster_defaults
from evl_platform.runtime.storage import (
    RUN_RECORD,
    RunRecord,
    local_storage,
    resolve_storage,
    shared_locations,
)
from evl_platform.tracking import Tracker, git_commit, names
from evl_platform.train.errors import ResumeError
from evl_platform.train.state import architecture_changes

if TYPE_CHECKING:
    from evl_platform.train.worker import WorkerHook

FINAL_FILES = "final"


@dataclass
class TrainOptions:
    """How and where to run a training (everything that is not the experiment itself).

    Attributes:
        num_workers: Ray Train workers (one device each).
        use_gpu: one GPU per worker, NCCL; otherwise CPU workers with gloo.
        cpus_per_worker: CPUs reserved per worker.
        address: Ray cluster address (``auto``, ``ray://...``); ``None`` starts Ray locally.
        tracking_uri: MLflow tracking URI (default ``sqlite:///mlflow.db`` in the cwd).
        storage_path: checkpoint storage (local directory, or a shared/cloud URI on a cluster).
        resume: continue an earlier run: ``"latest"`` (newest run of the experiment) or a run
            name; ``None`` starts a new run.
        mlflow_experiment: MLflow experiment (default: the experiment's name).
        run_name: Ray/MLflow run name (default ``<experiment>-<timestamp>``).
        parent_run_id: nest the MLflow run under this run (sweeps).
        tags: extra MLflow tags (e.g. ``variant``).
        callbacks: extra Ray Train callbacks (e.g. Tune's report callback).
        worker_hooks: functions every worker calls after every step with a
            :class:`~evl_platform.train.worker.WorkerStep` (step, rank, world, model, loss):
            watch or change the run from outside it (tests inject failures with one). They
            travel to the workers with cloudpickle, so a function defined in a module the
            workers cannot import must be registered for pickling by value
            (``ray.cloudpickle.register_pickle_by_value``); an exception one raises is a
            worker failure.
        check_storage: on a cluster, refuse storage that not every node shares (see
            :func:`evl_platform.runtime.cluster.check_shared`); a sweep checks once for all trials.
    """

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    address: str | None = None
    tracking_uri: str | None = None
    storage_path: str | None = None
    resume: str | None = None
    mlflow_experiment: str | None = None
    run_name: str | None = None
    parent_run_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    callbacks: Sequence[Any] = ()
    worker_hooks: Sequence[WorkerHook] = ()
    check_storage: bool = True


@dataclass
class TrainOutcome:
    """What a finished training left behind."""

    run_id: str
    run_name: str
    storage: str
    tracking_uri: str
    metrics: dict[str, float]
    checkpoint: str | None


def find_run(storage: str, cfg: ExperimentConfig, which: str) -> RunRecord:
    """The run ``--resume`` continues: a named run, or the newest run of this experiment."""
    if which != "latest":
        record = RunRecord.read(storage, which)
        if record is None:
            raise ResumeError(f"--resume {which}: no run record at {storage}/{which}/{RUN_RECORD}")
        return record
    mine = sorted(
        (r for r in RunRecord.read_all(storage) if r.experiment == cfg.name),
        key=lambda r: r.created,
    )
    if not mine:
        raise ResumeError(
            f"--resume: no earlier run of experiment {cfg.name!r} under {storage}; "
            "start it without --resume"
        )
    return mine[-1]


def check_resumable(record: RunRecord, cfg: ExperimentConfig) -> list[str]:
    """Refuses a resume that changes the architecture; returns the other changed keys."""
    saved = ExperimentConfig.model_validate(yaml.safe_load(record.config))
    changed = architecture_changes(saved, cfg)
    if changed:
        raise ResumeError(
            f"--resume {record.run_name}: the architecture differs from the saved run "
            f"({'; '.join(changed)}); resume with the original values or start a new run"
        )
    old, new = flatten_config(saved), flatten_config(cfg)
    return sorted(k for k in new if old.get(k) != new[k])


def run_tags(cfg: ExperimentConfig, options: TrainOptions, run_name: str) -> dict[str, str]:
    """Tags carried by every training run."""
    return {
        names.TAG_KIND: names.KIND_TRAIN,
        names.TAG_PROFILE: cfg.profile,
        names.TAG_DATASET: cfg.data.dataset,
        names.TAG_BACKBONE: cfg.model.backbone.name if cfg.model.arch == "evl" else cfg.model.arch,
        names.TAG_GIT_COMMIT: git_commit(),
        names.TAG_VARIANT: cfg.name,
        names.TAG_RAY_RUN: run_name,
        **options.tags,
    }


def _open_run(
    cfg: ExperimentConfig, options: TrainOptions, tracker: Tracker, storage: str
) -> RunRecord:
    """A new MLflow run plus its record, or the record of the run being resumed."""
    if options.resume:
        record = find_run(storage, cfg, options.resume)
        changed = check_resumable(record, cfg)
        tracker.reopen(record.run_id)
        if changed:
            flat = flatten_config(cfg)
            tracker.set_tags(record.run_id, {f"resumed_with.{k}": flat[k] for k in changed})
        return record
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    run_name = options.run_name or f"{cfg.name}-{stamp}"
    mlflow_experiment = options.mlflow_experiment or cfg.name
    run_id = tracker.create_run(
        mlflow_experiment,
        run_name=run_name,
        tags=run_tags(cfg, options, run_name),
        parent_run_id=options.parent_run_id,
    )
    params = flatten_config(cfg) | {
        "run.num_workers": options.num_workers,
        "run.use_gpu": options.use_gpu,
    }
    tracker.log_params(run_id, params)
    tracker.log_metrics(run_id, model_size_metrics(cfg), step=0)
    record = RunRecord(
        run_name=run_name,
        run_id=run_id,
        experiment=cfg.name,
        mlflow_experiment=mlflow_experiment,
        config=dump_config(cfg),
        created=datetime.datetime.now().isoformat(),
    )
    record.write(storage)
    return record


def model_size_metrics(cfg: ExperimentConfig) -> dict[str, float]:
    """New parameters and GFLOPs per video (all test views) of the run's model, from
    :func:`~evl_platform.models.info.model_info` (built on the meta device: no weights)."""
    from evl_platform.models.info import model_info

    info = model_info(cfg)
    return {
        names.MODEL_NEW_PARAMS: float(info["new_params"]),
        names.MODEL_GFLOPS: float(info["gflops_total"]),
    }


def train(cfg: ExperimentConfig, options: TrainOptions | None = None) -> TrainOutcome:
    """Runs one training to the end (or continues one with ``options.resume``).

    Raises:
        ResumeError: ``--resume`` finds no run or the architecture changed.
        ray.train.TrainingFailedError: the workers failed more than ``train.max_failures``
            times; a non-finite loss (:class:`~evl_platform.train.errors.NonFiniteLossError`,
            named in the message) recurs on every restart and so ends here.
    """
    from evl_platform.data.source import read_splits

    options = options or TrainOptions()
    early = not (options.address or os.environ.get("RAY_ADDRESS"))
    if early:
        read_splits(cfg.data)  # generate a stand-in / fail on bad annotations before Ray starts
    with ray_session(options.address) as attached:
        use_cluster_defaults(attached)
        if not early:
            read_splits(cfg.data)  # into the cluster's cache, now that it is known
        storage = resolve_storage(options.storage_path)
        tracker = Tracker(options.tracking_uri)
        if options.check_storage:
            check_shared(shared_locations(cfg, storage, tracker.uri))
        record = _open_run(cfg, options, tracker, storage)
        print(
            f"MLflow run {record.run_id} (experiment {record.mlflow_experiment!r}, "
            f"{tracker.uri}); checkpoints in {storage}/{record.run_name}",
            flush=True,
        )
        status = names.STATUS_FAILED
        try:
            _log_config(tracker, cfg, storage, record)
            _prepare_features(cfg, options, tracker, record.run_id)
            result = _fit(cfg, options, tracker, record, storage)
            outcome = _finish(result, record, storage, tracker)
            status = names.STATUS_FINISHED
            return outcome
        except KeyboardInterrupt:
            status = names.STATUS_KILLED
            raise
        finally:
            tracker.terminate(record.run_id, status)


def _log_config(tracker: Tracker, cfg: ExperimentConfig, storage: str, record: RunRecord) -> None:
    """Logs the resolved config, kept next to the checkpoints when the storage is local."""
    directory = local_storage(storage)
    with tempfile.TemporaryDirectory() as scratch:
        base = directory / record.run_name if directory else Path(scratch)
        base.mkdir(parents=True, exist_ok=True)
        path = base / names.ARTIFACT_CONFIG
        path.write_text(dump_config(cfg))
        tracker.log_artifact(record.run_id, path)


def _prepare_features(
    cfg: ExperimentConfig, options: TrainOptions, tracker: Tracker, run_id: str
) -> None:
    if not cfg.features.reuse:
        return
    from evl_platform.features import prepare_features

    stats = prepare_features(cfg, use_gpu=options.use_gpu)
    if tracker.last_step(run_id, names.FEATURES_EXTRACTED_CLIPS) is None:
        tracker.log_metrics(
            run_id,
            {
                names.FEATURES_EXTRACTED_CLIPS: stats.extracted_clips,
                names.FEATURES_SECONDS: stats.seconds,
            },
            step=0,
        )


def _fit(
    cfg: ExperimentConfig,
    options: TrainOptions,
    tracker: Tracker,
    record: RunRecord,
    storage: str,
) -> Any:
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from evl_platform.tracking.callback import MLflowLogger
    from evl_platform.train.worker import train_loop_per_worker

    resources = {"CPU": options.cpus_per_worker} | ({"GPU": 1} if options.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "experiment": cfg.model_dump(mode="json"),
            "run_id": record.run_id,
            "worker_hooks": list(options.worker_hooks),
        },
        scaling_config=ScalingConfig(
            num_workers=options.num_workers,
            use_gpu=options.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=record.run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=[MLflowLogger(tracker.uri, record.run_id), *options.callbacks],
        ),
    )
    return trainer.fit()


def _finish(result: Any, record: RunRecord, storage: str, tracker: Tracker) -> TrainOutcome:
    """Uploads the final checkpoint's run files to MLflow."""
    checkpoint = result.checkpoint
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            final = Path(directory) / FINAL_FILES
            for path in sorted(final.iterdir()) if final.is_dir() else ():
                tracker.log_artifact(record.run_id, path)
            from evl_platform.serving.pyfunc import log_run_model  # the run's MLflow model

            log_run_model(tracker, record.run_id, record.config, final)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    return TrainOutcome(
        run_id=record.run_id,
        run_name=record.run_name,
        storage=storage,
        tracking_uri=tracker.uri,
        metrics=metrics,
        checkpoint=checkpoint.path if checkpoint is not None else None,
    )

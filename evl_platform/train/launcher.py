"""Launches one training on Ray Train (V2 ``TorchTrainer``) and tracks it as one MLflow run.

The driver resolves the data (generating a stand-in if needed), prepares cached backbone
features when ``features.reuse`` is on, opens the MLflow run, and starts the trainer. Ray is
started locally on demand (and shut down afterwards) unless an address is given or Ray is
already initialised. A run lives under ``<storage>/<run name>/``: Ray's checkpoints plus
``evl_run.json`` (MLflow run id, config), which is what ``--resume`` continues.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evl_platform.cluster import check_shared
from evl_platform.config import ExperimentConfig, dump_config, flatten_config
from evl_platform.tracking import Tracker, git_commit, names
from evl_platform.train.errors import ResumeError
from evl_platform.train.state import architecture_changes

DEFAULT_STORAGE = "ray_results"
RUN_RECORD = "evl_run.json"
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
        fail_at_step / fail_marker: make the last worker raise once at this step (testing the
            automatic restart); the marker file records that it happened.
        check_storage: on a cluster, refuse storage that not every node shares (see
            :func:`evl_platform.cluster.check_shared`); a sweep checks once for all trials.
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
    fail_at_step: int | None = None
    fail_marker: str | None = None
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


# Ray Train's print patch sends each worker print to the console twice; plain prints suffice.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


# Every worker process of the job runs this hook, so it lives in a module that imports
# nothing heavy: from this module it cost each of Ray Train's helper actors ~3 s of CPU.
WORKER_SETUP_HOOK = "evl_platform.train.ray_hooks.quiet_ray_workers"


def ray_init_options(num_cpus: int | None = None) -> dict[str, Any]:
    """``ray.init`` arguments for a local instance.

    The dashboard runs because Ray Train's placement-group cleaner asks the state API (served
    by the dashboard) whether a trainer's controller has died; without it, the CPUs of a
    trainer killed mid-run (a trial stopped by ASHA) are never given back.
    """
    return {
        # A new instance even when `ray start` runs on this machine: attaching is --address's.
        "address": "local",
        "num_cpus": num_cpus,
        "include_dashboard": True,
        "runtime_env": {
            "worker_process_setup_hook": WORKER_SETUP_HOOK,
            "env_vars": {
                # One actor process less per training: a local machine is not preempted.
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                # The Train controller polls its workers at this interval, and each step of
                # starting and finishing a run waits for a poll: 2 s by default.
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
            },
        },
    }


def cluster_runtime_env() -> dict[str, Any]:
    """The job-level runtime environment of a driver attached to a cluster: quiet workers,
    and the driver's own feature/stand-in cache location when it sets one (workers otherwise
    use their node's ``$EVL_PLATFORM_CACHE``, which cluster.yaml sets on every node)."""
    cache = os.environ.get("EVL_PLATFORM_CACHE")
    return {
        "worker_process_setup_hook": WORKER_SETUP_HOOK,
        "env_vars": {"EVL_PLATFORM_CACHE": cache} if cache else {},
    }


@contextlib.contextmanager
def ray_session(address: str | None = None, *, log_to_driver: bool = True) -> Iterator[bool]:
    """Uses the current Ray connection, attaches to ``address`` (or ``$RAY_ADDRESS``), or
    starts a local instance; what this call started or attached is shut down at the end.
    ``log_to_driver=False`` keeps the workers' output off this console (a sweep prints its
    own progress). Yields whether this call attached to an existing cluster."""
    import ray

    if ray.is_initialized():
        yield False
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env=cluster_runtime_env())
    else:
        ray.init(**ray_init_options(), log_to_driver=log_to_driver)
    try:
        yield bool(address)
    finally:
        ray.shutdown()


def use_cluster_defaults(attached: bool) -> None:
    """On a cluster just attached to, takes the head node's tracking URI, storage and cache
    for whatever this driver's environment does not set (see :mod:`evl_platform.cluster`)."""
    if not attached:
        return
    from evl_platform.cluster import adopt_head_environment

    for key, value in sorted(adopt_head_environment().items()):
        print(f"using the cluster's {key}={value} (from the head node)", flush=True)


def resolve_storage(path: str | None) -> str:
    """Absolute local directory or a URI (``s3://``, ``gs://``...) for Ray's run storage."""
    path = path or os.environ.get("EVL_PLATFORM_STORAGE") or DEFAULT_STORAGE
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def _local(storage: str) -> Path | None:
    return None if "://" in storage else Path(storage)


@dataclass
class RunRecord:
    """``evl_run.json``: ties a Ray run directory to its MLflow run."""

    run_name: str
    run_id: str
    experiment: str
    mlflow_experiment: str
    config: str
    created: str

    def write(self, storage: str) -> None:
        files, base = storage_files(storage)
        files.create_dir(f"{base}/{self.run_name}", recursive=True)
        with files.open_output_stream(f"{base}/{self.run_name}/{RUN_RECORD}") as out:
            out.write(json.dumps(self.__dict__, indent=2).encode())

    @staticmethod
    def read(storage: str, run_name: str) -> RunRecord | None:
        """The record of ``run_name`` under ``storage``; ``None`` when it has none."""
        files, base = storage_files(storage)
        try:
            with files.open_input_stream(f"{base}/{run_name}/{RUN_RECORD}") as record:
                return RunRecord(**json.loads(record.read()))
        except FileNotFoundError:
            return None


def storage_files(storage: str) -> tuple[Any, str]:
    """The pyarrow filesystem and base path of a storage location: a local directory or a
    bucket URI (``s3://``, ``gs://``...), the same filesystems Ray Train writes with."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(storage)


def find_run(storage: str, cfg: ExperimentConfig, which: str) -> RunRecord:
    """The run ``--resume`` continues: a named run, or the newest run of this experiment."""
    if which != "latest":
        record = RunRecord.read(storage, which)
        if record is None:
            raise ResumeError(f"--resume {which}: no run record at {storage}/{which}/{RUN_RECORD}")
        return record
    import pyarrow.fs

    files, base = storage_files(storage)
    listed = files.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
    records = [RunRecord.read(storage, i.base_name) for i in listed if i.type.name == "Directory"]
    mine = sorted((r for r in records if r and r.experiment == cfg.name), key=lambda r: r.created)
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
        names.TAG_KIND: "train",
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
        ray.train.TrainingFailedError: the workers failed more than ``train.max_failures``.
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
        status = "FAILED"
        try:
            _log_config(tracker, cfg, storage, record)
            _prepare_features(cfg, options, tracker, record.run_id)
            result = _fit(cfg, options, tracker, record, storage)
            outcome = _finish(result, record, storage, tracker)
            status = "FINISHED"
            return outcome
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            tracker.terminate(record.run_id, status)


def shared_locations(cfg: ExperimentConfig, storage: str, tracking_uri: str) -> dict[str, str]:
    """Where every node of a cluster writes, named as the user sets each one."""
    locations = {"--storage-path": storage, "the MLflow store (--tracking-uri)": tracking_uri}
    if cfg.features.reuse:
        from evl_platform.features.store import features_root

        locations["the feature cache (features.cache_dir)"] = str(features_root(cfg))
    return locations


def _log_config(tracker: Tracker, cfg: ExperimentConfig, storage: str, record: RunRecord) -> None:
    """Logs the resolved config, kept next to the checkpoints when the storage is local."""
    directory = _local(storage)
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
            "fail_at_step": options.fail_at_step,
            "fail_marker": options.fail_marker,
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
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    return TrainOutcome(
        run_id=record.run_id,
        run_name=record.run_name,
        storage=storage,
        tracking_uri=tracker.uri,
        metrics=metrics,
        checkpoint=checkpoint.path if checkpoint is not None else None,
    )

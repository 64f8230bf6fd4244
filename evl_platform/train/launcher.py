"""Launches trainings on Ray Train (V2 ``TorchTrainer``), each model tracked as one MLflow run.

:func:`train` runs one model; :func:`train_pack` runs a sweep's pack, several variants'
decoders on one frozen backbone in one ``TorchTrainer`` (see :mod:`evl_platform.train.pack`),
each variant still its own MLflow run.

The driver resolves the data (generating a stand-in if needed), prepares cached backbone
features when ``features.reuse`` is on, opens the MLflow run, and starts the trainer. Ray is
started locally on demand (and shut down afterwards) unless an address is given or Ray is
already initialised. A run lives under ``<storage>/<run name>/``: Ray's checkpoints plus
``evl_run.json`` (MLflow run id, config), which is what ``--resume`` continues; a pack
under ``<storage>/<pack name>/`` with ``evl_pack.json`` (one such record per member).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from evl_platform.config import ExperimentConfig, dump_config
from evl_platform.runtime.cluster import check_shared
from evl_platform.runtime.session import ray_session, use_cluster_defaults
from evl_platform.runtime.storage import (
    RunRecord,
    local_storage,
    resolve_storage,
    shared_locations,
)
from evl_platform.tracking import Tracker, names
from evl_platform.tracking.phases import Clock
from evl_platform.train.options import PackMember, TrainOptions, TrainOutcome
from evl_platform.train.records import (
    open_pack,
    open_run,
)
from evl_platform.train.state import FINAL_FILES, read_pack_state


def train(cfg: ExperimentConfig, options: TrainOptions | None = None) -> TrainOutcome:
    """Runs one training to the end (or continues one with ``options.resume``).

    Raises:
        ResumeError: ``--resume`` finds no run or the architecture changed.
        ray.train.TrainingFailedError: the workers failed more than ``train.max_failures``
            times; a non-finite loss (:class:`~evl_platform.train.errors.NonFiniteLossError`,
            named in the message) recurs on every restart and so ends here.
    """
    options = options or TrainOptions()
    clock = Clock()
    with _session(cfg, options, clock) as (storage, tracker):
        with clock.phase(names.TIME_TRACKING):
            record = open_run(cfg, options, tracker, storage)
        print(
            f"MLflow run {record.run_id} (experiment {record.mlflow_experiment!r}, "
            f"{tracker.uri}); checkpoints in {storage}/{record.run_name}",
            flush=True,
        )
        outcomes = _launch(
            {"": cfg}, {"": record}, options, tracker, storage, record.run_name, clock
        )
        return outcomes[""]


def train_pack(members: Sequence[PackMember], options: TrainOptions) -> dict[str, TrainOutcome]:
    """Trains several variants' decoders on one frozen backbone in one ``TorchTrainer``.

    Each member is its own MLflow run (params, metrics, artifacts and model as if it trained
    alone, plus the tag ``evl.pack``); the pack is one Ray Train run named
    ``options.run_name``, with one checkpoint holding every member. ``options.resume`` names
    a pack to continue (only the members given continue: a finished one is left alone). A
    member whose loss goes non-finite ends FAILED with the reason in its ``evl.failure`` tag;
    the others go on.

    Returns:
        Member key -> its outcome (status FINISHED or FAILED).

    Raises:
        ValueError: the members cannot share a backbone pass (:func:`.pack.check_packable`).
        ResumeError: ``options.resume`` names no pack, or a member it does not hold.
        ray.train.TrainingFailedError: the workers failed more than ``train.max_failures``
            times (every member's run ends FAILED).
    """
    from evl_platform.train.pack import check_packable

    cfgs = {m.key: m.cfg for m in members}
    check_packable(cfgs)
    clock = Clock()
    with _session(members[0].cfg, options, clock) as (storage, tracker):
        with clock.phase(names.TIME_TRACKING):
            pack = open_pack(members, options, tracker, storage)
        print(
            f"pack {pack.name}: {len(members)} variants, one MLflow run each ({tracker.uri}); "
            f"checkpoints in {storage}/{pack.name}",
            flush=True,
        )
        records = {m.key: pack.members[m.key] for m in members}
        return _launch(cfgs, records, options, tracker, storage, pack.name, clock)


@contextlib.contextmanager
def _session(
    cfg: ExperimentConfig, options: TrainOptions, clock: Clock
) -> Iterator[tuple[str, Tracker]]:
    """Ray (local or the cluster's), the storage and the tracker, the storage checked; the data
    resolved (a stand-in generated, bad annotations refused) before Ray starts when it starts
    here."""
    from evl_platform.data.source import read_splits

    early = not (options.address or os.environ.get("RAY_ADDRESS"))
    if early:
        with clock.phase(names.TIME_SYNTHESIS):
            read_splits(cfg.data)
    with ray_session(options.address) as attached:
        use_cluster_defaults(attached)
        if not early:
            with clock.phase(names.TIME_SYNTHESIS):
                read_splits(cfg.data)  # into the cluster's cache, now that it is known
        storage, tracker = resolve_storage(options.storage_path), Tracker(options.tracking_uri)
        if options.check_storage:
            check_shared(shared_locations(cfg, storage, tracker.uri))
        yield storage, tracker


def _launch(
    cfgs: Mapping[str, ExperimentConfig],
    records: Mapping[str, RunRecord],
    options: TrainOptions,
    tracker: Tracker,
    storage: str,
    run_name: str,
    clock: Clock,
) -> dict[str, TrainOutcome]:
    """Logs the configs, extracts cached features, runs the trainer and uploads each member's
    final files, ending each member's run FINISHED, FAILED or (Ctrl-C) KILLED."""
    status = dict.fromkeys(records, names.STATUS_FAILED)
    outcomes: dict[str, TrainOutcome] = {}
    try:
        directory = local_storage(storage)
        with clock.phase(names.TIME_TRACKING):
            for key, cfg in cfgs.items():
                _log_config(tracker, cfg, records[key].run_id, directory, run_name, key)
        with clock.phase(names.TIME_FEATURES):
            run_ids = [r.run_id for r in records.values()]
            _prepare_features(list(cfgs.values()), options, tracker, run_ids)
        config = [
            {"key": key, "experiment": _plain(cfg), "run_id": records[key].run_id}
            for key, cfg in cfgs.items()
        ]
        start = time.perf_counter()
        result = _fit(config, options, tracker, storage, run_name, next(iter(cfgs.values())))
        _split_fit_time(clock, time.perf_counter() - start, result.metrics or {})
        with clock.phase(names.TIME_TRACKING):
            for key in cfgs:
                outcomes[key] = _finish(result, key, records[key], storage, tracker)
                tracker.terminate(records[key].run_id, outcomes[key].status)
                del status[key]
        for outcome in outcomes.values():
            outcome.timings = dict(clock.seconds)
        return outcomes
    except KeyboardInterrupt:
        status = dict.fromkeys(status, names.STATUS_KILLED)
        raise
    finally:
        for key, value in status.items():
            tracker.terminate_open(records[key].run_id, value)


def _split_fit_time(clock: Clock, seconds: float, metrics: Mapping[str, Any]) -> None:
    """Splits the trainer's wall time into the workers' steps and validation (as they
    reported them) and the rest: start-up, model building, restore and checkpoints."""
    steps = float(metrics.get(names.TIME_TRAIN, 0.0))
    validation = float(metrics.get(names.TIME_VALIDATION, 0.0))
    clock.seconds[names.TIME_TRAIN] += steps
    clock.seconds[names.TIME_VALIDATION] += validation
    clock.seconds[names.TIME_STARTUP] += max(0.0, seconds - steps - validation)


def _plain(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as the workers receive it."""
    return cfg.model_dump(mode="json")


def _log_config(
    tracker: Tracker,
    cfg: ExperimentConfig,
    run_id: str,
    directory: Path | None,
    *parts: str,
) -> None:
    """Logs the resolved config, kept next to the checkpoints (``directory / parts``) when
    the storage is local."""
    with tempfile.TemporaryDirectory() as scratch:
        base = directory.joinpath(*parts) if directory else Path(scratch)
        base.mkdir(parents=True, exist_ok=True)
        path = base / names.ARTIFACT_CONFIG
        path.write_text(dump_config(cfg))
        tracker.log_artifact(run_id, path)


def _prepare_features(
    cfgs: Sequence[ExperimentConfig],
    options: TrainOptions,
    tracker: Tracker,
    run_ids: Sequence[str],
) -> None:
    """Extracts the cached features the configs read (those reading attention maps first:
    theirs hold the block outputs too) and logs the extraction to every run once."""
    if not cfgs[0].features.reuse:
        return
    from evl_platform.features import prepare_features
    from evl_platform.features.key import tensor_kinds

    clips, seconds = 0, 0.0
    for cfg in sorted(cfgs, key=lambda c: "attn" not in tensor_kinds(c)):
        stats = prepare_features(cfg, use_gpu=options.use_gpu)
        clips, seconds = clips + stats.extracted_clips, seconds + stats.seconds
    for run_id in run_ids:
        if tracker.last_step(run_id, names.FEATURES_EXTRACTED_CLIPS) is None:
            metrics = {names.FEATURES_EXTRACTED_CLIPS: clips, names.FEATURES_SECONDS: seconds}
            tracker.log_metrics(run_id, metrics, step=0)


def _fit(
    members: list[dict[str, Any]],
    options: TrainOptions,
    tracker: Tracker,
    storage: str,
    run_name: str,
    lead: ExperimentConfig,
) -> Any:
    """Runs the ``TorchTrainer`` of one model or one pack (``members``: the workers'
    ``{key, experiment, run_id}`` entries) to its end."""
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
    runs = {m["key"]: m["run_id"] for m in members}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"members": members, "tracking_uri": tracker.uri},
        scaling_config=ScalingConfig(
            num_workers=options.num_workers,
            use_gpu=options.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=lead.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=[MLflowLogger(tracker.uri, runs), *options.callbacks],
        ),
    )
    return trainer.fit()


def _finish(
    result: Any, key: str, record: RunRecord, storage: str, tracker: Tracker
) -> TrainOutcome:
    """Uploads a member's final files from the last checkpoint to its MLflow run, as files
    and as its MLflow model; a member that stopped early is FAILED with its reason tagged."""
    checkpoint = result.checkpoint
    status, failure = names.STATUS_FINISHED, None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            root = Path(directory) / key
            final = root / FINAL_FILES
            stopped = read_pack_state(Path(directory)).get(key)
            if stopped is not None:
                status, failure = names.STATUS_FAILED, str(stopped)
                tracker.set_tags(record.run_id, {names.TAG_FAILURE: failure})
            elif final.is_dir():
                for path in sorted(final.iterdir()):
                    tracker.log_artifact(record.run_id, path)
                from evl_platform.serving.pyfunc import log_run_model  # the run's MLflow model

                log_run_model(tracker, record.run_id, record.config, final)
    metrics = {}
    for name, value in (result.metrics or {}).items():
        member, metric = names.split_member_metric(name)
        if member == key and isinstance(value, int | float):
            metrics[metric] = value
    return TrainOutcome(
        run_id=record.run_id,
        run_name=record.run_name,
        storage=storage,
        tracking_uri=tracker.uri,
        metrics=metrics,
        checkpoint=checkpoint.path if checkpoint is not None else None,
        status=status,
        failure=failure,
    )

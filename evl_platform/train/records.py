"""A training's MLflow runs and run records: opening new ones, finding and reopening the one
``--resume`` continues (one run, or every member of a pack)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence

import yaml

from evl_platform.config import ExperimentConfig, dump_config, flatten_config
from evl_platform.runtime.storage import RUN_RECORD, PackRecord, RunRecord
from evl_platform.tracking import Tracker, git_commit, names
from evl_platform.train.errors import ResumeError
from evl_platform.train.options import PackMember, TrainOptions
from evl_platform.train.state import architecture_changes


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


def open_run(
    cfg: ExperimentConfig, options: TrainOptions, tracker: Tracker, storage: str
) -> RunRecord:
    """A new MLflow run plus its record, or the record of the run being resumed."""
    if options.resume:
        record = find_run(storage, cfg, options.resume)
        reopen_run(record, cfg, tracker)
        return record
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    run_name = options.run_name or f"{cfg.name}-{stamp}"
    record = create_run(cfg, options, tracker, run_name, run_tags(cfg, options, run_name))
    record.write(storage)
    return record


def reopen_run(record: RunRecord, cfg: ExperimentConfig, tracker: Tracker) -> None:
    """Reopens a run being resumed, tagging the config keys the resume changed."""
    changed = check_resumable(record, cfg)
    tracker.reopen(record.run_id)
    if changed:
        flat = flatten_config(cfg)
        tracker.set_tags(record.run_id, {f"resumed_with.{k}": flat[k] for k in changed})


def create_run(
    cfg: ExperimentConfig,
    options: TrainOptions,
    tracker: Tracker,
    run_name: str,
    tags: Mapping[str, str],
    member: PackMember | None = None,
) -> RunRecord:
    """A new MLflow run with the config's params and the model's size, and its record (a pack
    ``member`` naming its own experiment and parent run goes there)."""
    mlflow_experiment = (member and member.experiment) or options.mlflow_experiment or cfg.name
    parent_run_id = (member and member.parent_run_id) or options.parent_run_id
    run_id = tracker.create_run(
        mlflow_experiment, run_name=run_name, tags=dict(tags), parent_run_id=parent_run_id
    )
    params = flatten_config(cfg) | {
        "run.num_workers": options.num_workers,
        "run.use_gpu": options.use_gpu,
    }
    tracker.log_params(run_id, params)
    tracker.log_metrics(run_id, model_size_metrics(cfg), step=0)
    return RunRecord(
        run_name=run_name,
        run_id=run_id,
        experiment=cfg.name,
        mlflow_experiment=mlflow_experiment,
        config=dump_config(cfg),
        created=datetime.datetime.now().isoformat(),
    )


def model_size_metrics(cfg: ExperimentConfig) -> dict[str, float]:
    """New parameters and GFLOPs per video (all test views) of the run's model, from
    :func:`~evl_platform.models.info.model_info` (built on the meta device: no weights)."""
    from evl_platform.models.info import model_info

    info = model_info(cfg)
    return {
        names.MODEL_NEW_PARAMS: float(info["new_params"]),
        names.MODEL_GFLOPS: float(info["gflops_total"]),
    }


def open_pack(
    members: Sequence[PackMember], options: TrainOptions, tracker: Tracker, storage: str
) -> PackRecord:
    """The record of a new pack (one new MLflow run per member), or of the pack being
    resumed with its members' runs reopened."""
    if options.resume:
        pack = PackRecord.read(storage, options.resume)
        if pack is None:
            raise ResumeError(f"--resume {options.resume}: no pack record under {storage}")
        for m in members:
            if m.key not in pack.members:
                raise ResumeError(f"--resume {options.resume}: the pack has no member {m.key!r}")
            reopen_run(pack.members[m.key], m.cfg, tracker)
        return pack
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    name = options.run_name or f"pack-{stamp}"
    records = {}
    for m in members:
        tags = run_tags(m.cfg, options, name) | dict(m.tags) | {names.TAG_PACK: name}
        records[m.key] = create_run(m.cfg, options, tracker, m.run_name, tags, m)
    pack = PackRecord(name, records, datetime.datetime.now().isoformat())
    pack.write(storage)
    return pack

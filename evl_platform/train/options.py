"""What a training is told (:class:`TrainOptions`), what it leaves (:class:`TrainOutcome`), and a
pack's members (:class:`PackMember`); see :mod:`evl_platform.train.launcher`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evl_platform.config import ExperimentConfig
from evl_platform.tracking import names


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
        callbacks: extra Ray Train callbacks (e.g. Tune's report callback; a Ray Train
            ``WorkerCallback`` runs in every worker process, where tests inject faults).
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
    status: str = names.STATUS_FINISHED
    failure: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class PackMember:
    """One variant of a pack (:func:`train_pack`).

    Attributes:
        key: its name in the pack: the directory of its checkpoint files and the prefix of its
            reported metrics (letters, digits, ``-`` and ``_``).
        cfg: its resolved config.
        run_name: its MLflow run name.
        tags: its own MLflow tags (the sweep's variant tags), added to ``TrainOptions.tags``.
        experiment / parent_run_id: its MLflow experiment and parent run, when they are not
            ``TrainOptions``' (a pack across ablation files: each member under its table's).
    """

    key: str
    cfg: ExperimentConfig
    run_name: str
    tags: Mapping[str, str] = field(default_factory=dict)
    experiment: str | None = None
    parent_run_id: str | None = None

"""``evl-platform evaluate``: the multi-view evaluation of a trained model, on Ray.

The paper's protocol (every temporal x spatial view classified, softmax averaged) on the
run's resolved config and weights, with the inputs training validated on: the frozen-feature
cache when the run used it (features for other views are extracted first), decoded videos
otherwise. Each Ray task evaluates every ``world``-th video, as a training worker does; the
result is logged to a new MLflow run (kind ``evaluation``) tagged with the evaluated run's id.
"""

from __future__ import annotations

import datetime
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from evl_platform.config import ExperimentConfig, TestViewsConfig, dump_config, flatten_config
from evl_platform.inference.runs import TrainedModel, build_model, with_views
from evl_platform.tracking import names
from evl_platform.tracking.artifacts import scores_frame, write_per_class, write_scores
from evl_platform.tracking.client import Tracker
from evl_platform.train.inputs import create_source
from evl_platform.train.loop import (
    EvalResult,
    EVLForward,
    amp_dtype,
    evaluate,
    validation_metrics,
)


@dataclass
class EvalOptions:
    """How and where to evaluate.

    Attributes:
        split: the split to evaluate (``train`` is read with the test-time views).
        views: test views (default: the run's).
        num_workers: Ray tasks, one device each.
        use_gpu: one GPU per task.
        cpus_per_worker: CPUs reserved per task.
        address: Ray cluster address; ``None`` starts Ray locally.
        tracking_uri: MLflow tracking URI of the evaluation run.
        track: log the evaluation as an MLflow run.
    """

    split: Literal["train", "val"] = "val"
    views: TestViewsConfig | None = None
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    address: str | None = None
    tracking_uri: str | None = None
    track: bool = True


@dataclass
class EvalOutcome:
    """One finished evaluation."""

    result: EvalResult
    class_names: list[str]
    video_ids: list[str]
    cfg: ExperimentConfig
    split: str
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None

    @property
    def views(self) -> str:
        views = self.cfg.data.test_views
        return f"{views.temporal}x{views.spatial}"


def eval_config(
    cfg: ExperimentConfig, split: str, views: TestViewsConfig | None
) -> ExperimentConfig:
    """The config whose validation split is the evaluated split, seen through ``views``.

    The validation split stays as it is (so the feature-cache keys are training's own); for
    ``train`` the dataset's files are named explicitly, with the training annotations read as
    the validation split.
    """
    cfg = with_views(cfg, views)
    if split == "val":
        return cfg
    from evl_platform.data.source import resolve_files

    files = resolve_files(cfg.data, progress=False)
    data = cfg.data.model_copy(
        update={
            "root": str(files.root) if files.root else None,
            "train_annotations": str(files.train_annotations),
            "val_annotations": str(files.train_annotations),
            "label_map": str(files.label_map) if files.label_map else None,
            "video_extension": files.video_extension,
        }
    )
    return cfg.model_copy(update={"data": data})


def evaluate_shard(
    cfg_dict: dict, weights: dict[str, torch.Tensor], *, rank: int, world: int, use_gpu: bool
) -> tuple[EvalResult, list[str], list[str]]:
    """Evaluates every ``world``-th video from ``rank`` on; returns the result, the split's
    video ids and the class names. Runs inside a Ray task (plain PyTorch)."""
    cfg = ExperimentConfig.model_validate(cfg_dict)
    device = torch.device("cuda" if use_gpu else "cpu")
    trained = TrainedModel(cfg=cfg, weights=weights, label=cfg.name)
    model = build_model(trained, load_backbone=not cfg.features.reuse).to(device)
    per_rank = max(1, cfg.train.batch_size // world)
    source, video_ids, class_names = create_source(
        cfg, rank=rank, world=world, batch=per_rank, device=device
    )
    amp = amp_dtype(cfg.train, device)
    result = evaluate(EVLForward(model), source.val_batches(), device=device, amp=amp)
    return result, list(video_ids), list(class_names)


def evaluate_run(trained: TrainedModel, options: EvalOptions | None = None) -> EvalOutcome:
    """Evaluates a trained model on Ray and (with ``options.track``) logs an evaluation run."""
    import ray

    from evl_platform.runtime.session import ray_session

    options = options or EvalOptions()
    cfg = eval_config(trained.cfg, options.split, options.views)
    with ray_session(options.address):
        if cfg.features.reuse:
            from evl_platform.features import prepare_features

            prepare_features(cfg, use_gpu=options.use_gpu, progress=False)
        task = ray.remote(evaluate_shard).options(
            num_cpus=options.cpus_per_worker, num_gpus=1 if options.use_gpu else 0
        )
        weights = ray.put(trained.weights)
        refs = [
            task.remote(
                cfg.model_dump(mode="json"),
                weights,
                rank=rank,
                world=options.num_workers,
                use_gpu=options.use_gpu,
            )
            for rank in range(options.num_workers)
        ]
        parts = ray.get(refs)
    result = EvalResult.merge([part[0] for part in parts])
    _, video_ids, class_names = parts[0]
    outcome = EvalOutcome(result, class_names, video_ids, cfg, options.split)
    outcome.metrics = eval_metrics(result)
    if options.track:
        outcome.run_id = log_evaluation(outcome, trained, options)
    return outcome


EVAL_NAME = dict(
    zip(
        names.EVAL_METRICS,
        (
            names.EVAL_LOSS,
            names.EVAL_ACC1,
            names.EVAL_ACC5,
            names.EVAL_MEAN_CLASS_ACC,
            names.EVAL_CLIPS_PER_S,
        ),
        strict=True,
    )
)
"""Each validation metric's name in an evaluation run (``val/acc1`` -> ``eval/acc1``)."""


def eval_metrics(result: EvalResult) -> dict[str, float]:
    """The ``eval/...`` metrics of one evaluation: training's validation metrics, renamed."""
    return {EVAL_NAME[k]: v for k, v in validation_metrics(result).items()}


def log_evaluation(outcome: EvalOutcome, trained: TrainedModel, options: EvalOptions) -> str:
    """A new MLflow run with the evaluation's metrics, per-video scores and per-class accuracy,
    tagged with the evaluated run's id (whose own metrics stay untouched)."""
    cfg = outcome.cfg
    tracker = Tracker(options.tracking_uri)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    tags = {
        names.TAG_KIND: names.KIND_EVALUATION,
        names.TAG_PROFILE: cfg.profile,
        names.TAG_DATASET: cfg.data.dataset,
        names.TAG_VARIANT: cfg.name,
        names.TAG_EVALUATED_RUN: trained.run_id or trained.label,
    }
    run_id = tracker.create_run(
        trained.experiment or cfg.name,
        run_name=f"{trained.label}-eval-{outcome.split}-{outcome.views}-{stamp}",
        tags=tags,
    )
    with tracker.finishing(run_id):
        params = flatten_config(cfg) | {
            names.PARAM_EVAL_SPLIT: outcome.split,
            names.PARAM_EVAL_VIEWS: outcome.views,
            "run.num_workers": options.num_workers,
            "run.use_gpu": options.use_gpu,
        }
        tracker.log_params(run_id, params)
        tracker.log_metrics(run_id, outcome.metrics, step=0)
        with tempfile.TemporaryDirectory() as scratch:
            for path in _eval_files(outcome, Path(scratch)):
                tracker.log_artifact(run_id, path)
    return run_id


def _eval_files(outcome: EvalOutcome, directory: Path) -> list[Path]:
    result, classes = outcome.result, outcome.class_names
    frame = scores_frame(outcome.video_ids, result.indices, result.labels, result.probs, classes)
    config = directory / names.ARTIFACT_CONFIG
    config.write_text(dump_config(outcome.cfg))
    return [
        write_scores(frame, directory / names.ARTIFACT_SCORES),
        write_per_class(
            result.per_class_accuracy(len(classes)), classes, directory / names.ARTIFACT_PER_CLASS
        ),
        config,
    ]


def format_evaluation(outcome: EvalOutcome) -> str:
    """Top-1/top-5 and the per-class table, for the terminal."""
    result, classes = outcome.result, outcome.class_names
    m = outcome.metrics
    lines = [
        f"{outcome.cfg.name}: {outcome.cfg.data.dataset} {outcome.split}, "
        f"{len(result.labels)} videos, {outcome.views} views (temporal x spatial)",
        f"  top-1 {m[names.EVAL_ACC1]:.2f}%  top-5 {m[names.EVAL_ACC5]:.2f}%  "
        f"mean class top-1 {m[names.EVAL_MEAN_CLASS_ACC]:.2f}%  loss {m[names.EVAL_LOSS]:.4f}",
        "",
    ]
    counts = np.bincount(result.labels, minlength=len(classes))
    accuracy = result.per_class_accuracy(len(classes))
    width = max(len("class"), *(len(c) for c in classes))
    lines.append(f"  {'class':<{width}}  videos   top-1")
    for name, count, acc in zip(classes, counts, accuracy, strict=True):
        shown = "-" if np.isnan(acc) else f"{acc:6.1f}%"
        lines.append(f"  {name:<{width}}  {count:>6}  {shown:>7}")
    return "\n".join(lines)


def outcome_json(outcome: EvalOutcome) -> dict[str, Any]:
    """The evaluation as one JSON-ready object."""
    accuracy = outcome.result.per_class_accuracy(len(outcome.class_names))
    return {
        "experiment": outcome.cfg.name,
        "split": outcome.split,
        "views": outcome.views,
        "videos": len(outcome.result.labels),
        "metrics": outcome.metrics,
        "per_class": {
            name: None if np.isnan(acc) else float(acc)
            for name, acc in zip(outcome.class_names, accuracy, strict=True)
        },
        "run_id": outcome.run_id,
    }

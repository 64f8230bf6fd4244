"""From ``RUN`` (an MLflow run id, a run name, or a weights file plus a config) to a model.

A training run keeps its resolved config (``config.yaml``) and its trainable weights
(``weights.pt``, :func:`~evl_platform.train.state.trainable_state`) as MLflow artifacts; a
frozen backbone is not stored, because the config re-creates it exactly.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from mlflow.exceptions import MlflowException
from torch import nn

from evl_platform.config import ExperimentConfig, TestViewsConfig, load_config
from evl_platform.inference.errors import InferenceError
from evl_platform.serving.classifier import WeightsMismatch, load_trained
from evl_platform.serving.pyfunc import quiet_artifact_copies
from evl_platform.tracking import names
from evl_platform.tracking.client import Tracker


@dataclass
class TrainedModel:
    """A resolved config and the trained weights that go with it.

    Attributes:
        cfg: the run's resolved experiment config.
        weights: trainable state dict (decoder, temporal modules, head; the backbone too when
            it was finetuned).
        label: how messages name the model (run name, or file name).
        run_id: the MLflow run it came from (``None`` for a plain file).
        experiment: that run's MLflow experiment name.
    """

    cfg: ExperimentConfig
    weights: dict[str, torch.Tensor]
    label: str
    run_id: str | None = None
    experiment: str | None = None


def parse_views(text: str) -> TestViewsConfig:
    """``3x1`` -> 3 temporal x 1 spatial test views."""
    temporal, sep, spatial = text.lower().partition("x")
    try:
        if not sep:
            raise ValueError(text)
        return TestViewsConfig(temporal=int(temporal), spatial=int(spatial))
    except ValueError:
        raise ValueError(
            f"{text!r}: views are TxS, temporal x spatial (e.g. 3x1), both at least 1"
        ) from None


def with_views(cfg: ExperimentConfig, views: TestViewsConfig | None) -> ExperimentConfig:
    """The config with other test views (unchanged when ``views`` is ``None``)."""
    if views is None:
        return cfg
    data = cfg.data.model_copy(update={"test_views": views})
    return cfg.model_copy(update={"data": data})


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict saved by the platform: ``weights.pt`` or a checkpoint's ``state.pt``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise InferenceError(f"{path}: not a readable weights file ({err})") from err
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise InferenceError(f"{path}: not a state dict of tensors")
    return dict(state)


def resolve_run(
    ref: str, *, config: str | Path | None = None, tracking_uri: str | None = None
) -> TrainedModel:
    """The model ``ref`` names: a weights file (with ``config``), a run id or a run name.

    Raises:
        InferenceError: no such file or run, an ambiguous name, or a run without weights.
    """
    if Path(ref).is_file():
        if config is None:
            raise InferenceError(f"{ref}: a checkpoint file needs --config EXPERIMENT.yaml")
        return TrainedModel(
            cfg=load_config(config), weights=read_weights(ref), label=Path(ref).name
        )
    tracker = Tracker(tracking_uri)
    run = _find_run(tracker, ref)
    experiment = tracker.client.get_experiment(run.info.experiment_id).name
    with tempfile.TemporaryDirectory() as scratch, quiet_artifact_copies():
        cfg_file = _download(tracker, run.info.run_id, names.ARTIFACT_CONFIG, scratch)
        weights_file = _download(tracker, run.info.run_id, names.ARTIFACT_WEIGHTS, scratch)
        cfg = ExperimentConfig.model_validate(yaml.safe_load(Path(cfg_file).read_text()))
        weights = read_weights(weights_file)
    if config is not None:
        cfg = load_config(config)
    return TrainedModel(cfg, weights, run.info.run_name, run.info.run_id, experiment)


def _find_run(tracker: Tracker, ref: str):  # noqa: ANN202 (mlflow.entities.Run)
    try:
        return tracker.client.get_run(ref)
    except MlflowException:
        pass
    experiments = [e.experiment_id for e in tracker.client.search_experiments()]
    found = tracker.client.search_runs(
        experiments, f"attributes.run_name = '{ref}'", order_by=["attributes.start_time DESC"]
    )
    if not found:
        raise InferenceError(
            f"{ref}: no such file, and no MLflow run with this id or name in {tracker.uri}"
        )
    if len(found) > 1:
        ids = ", ".join(r.info.run_id for r in found[:5])
        raise InferenceError(f"{ref}: {len(found)} runs have this name ({ids}); give a run id")
    return found[0]


def _download(tracker: Tracker, run_id: str, artifact: str, directory: str) -> str:
    try:
        return tracker.client.download_artifacts(run_id, artifact, directory)
    except (MlflowException, OSError) as err:
        raise InferenceError(
            f"run {run_id} has no {artifact} artifact: only a finished training run (or an "
            "imported checkpoint) holds its config and weights"
        ) from err


def build_model(trained: TrainedModel, *, load_backbone: bool = True) -> nn.Module:
    """The run's model with its trained weights, in eval mode on the CPU.

    Args:
        trained: config and weights.
        load_backbone: load the backbone's pretrained weights (not needed on cached features).

    Raises:
        InferenceError: the weights do not fit the config's model.
    """
    try:
        return load_trained(
            trained.cfg, trained.weights, load_backbone=load_backbone, label=trained.label
        )
    except WeightsMismatch as err:
        raise InferenceError(str(err)) from err

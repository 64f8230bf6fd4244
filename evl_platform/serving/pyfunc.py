"""A trained EVL model as an MLflow pyfunc model (the ``model`` artifact of a run).

``mlflow.pyfunc.load_model("runs:/<run id>/model").predict(frame)`` takes a DataFrame with a
``video`` column of file paths and returns one row per video: ``label`` (the top-1 class name,
empty when the file failed), ``error`` (empty, or why the file could not be used) and one
probability column per class, in class order. The model's artifacts are the resolved config,
the trained weights and the class names; the ``evl-platform`` package itself must be
importable where it is loaded (``mlflow models serve --env-manager local``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
import pyarrow.parquet as pq
import torch
import yaml
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from evl_platform.config import ExperimentConfig
from evl_platform.serving.classifier import VideoClassifier, load_trained
from evl_platform.tracking import names
from evl_platform.tracking.artifacts import LABEL, VIDEO_ID
from evl_platform.tracking.client import Tracker

VIDEO_COLUMN = "video"
LABEL_COLUMN = "label"
ERROR_COLUMN = "error"
_CLASSES_FILE = "classes.json"


def class_names_of(cfg: ExperimentConfig) -> list[str]:
    """The class names of the config's dataset in index order (its training split), or
    ``class 0``, ``class 1``, ... when the dataset's files are not on this machine."""
    from evl_platform.data.annotations import AnnotationError
    from evl_platform.data.errors import DataSourceError
    from evl_platform.data.source import read_split, resolve_files

    try:
        return list(read_split(resolve_files(cfg.data, progress=False), "train").class_names)
    except (DataSourceError, AnnotationError, OSError):
        return [f"class {i}" for i in range(cfg.data.num_classes)]


class EVLPyfuncModel(mlflow.pyfunc.PythonModel):
    """Video paths in, class probabilities and top-1 labels out (see the module docstring)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        artifacts = context.artifacts
        cfg = ExperimentConfig.model_validate(yaml.safe_load(Path(artifacts["config"]).read_text()))
        weights = torch.load(artifacts["weights"], map_location="cpu", weights_only=True)
        classes = json.loads(Path(artifacts["classes"]).read_text())
        model = load_trained(cfg, weights, label=artifacts["weights"])
        self.classifier = VideoClassifier(model, cfg, classes)

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict | None = None,
    ) -> pd.DataFrame:
        paths = [str(p) for p in model_input[VIDEO_COLUMN]]
        classes = self.classifier.class_names
        rows = []
        for found in self.classifier.predict(paths):
            if found.probs is None:
                rows.append({LABEL_COLUMN: "", ERROR_COLUMN: found.error} | dict.fromkeys(classes))
                continue
            probs = dict(zip(classes, map(float, found.probs), strict=True))
            rows.append({LABEL_COLUMN: found.top(1, classes)[0][0], ERROR_COLUMN: ""} | probs)
        return pd.DataFrame(rows, columns=[LABEL_COLUMN, ERROR_COLUMN, *classes])


def signature(class_names: Sequence[str]) -> ModelSignature:
    """Input: a ``video`` string column; output: label, error and a double per class."""
    outputs = [ColSpec("string", LABEL_COLUMN), ColSpec("string", ERROR_COLUMN)]
    outputs += [ColSpec("double", name, required=False) for name in class_names]
    return ModelSignature(Schema([ColSpec("string", VIDEO_COLUMN)]), Schema(outputs))


def requirements() -> list[str]:
    """The pip requirements of the model: the installed package's own dependencies."""
    try:
        found = metadata.requires("evl-platform") or []
    except metadata.PackageNotFoundError:
        return ["torch", "open_clip_torch", "mlflow", "decord", "av", "pyyaml", "pandas"]
    return [req for req in found if "extra ==" not in req]


def save_pyfunc(
    directory: Path, *, config_text: str, weights: Path, class_names: Sequence[str]
) -> Path:
    """Writes the MLflow model into ``directory / "model"`` and returns that path."""
    staging = directory / "artifacts"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / names.ARTIFACT_CONFIG).write_text(config_text)
    (staging / _CLASSES_FILE).write_text(json.dumps(list(class_names)))
    target = directory / names.ARTIFACT_MODEL
    with warnings.catch_warnings(), quiet_artifact_copies():
        # an example input would be a video file of this machine
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        _save(target, staging, weights, class_names)
    return target


@contextlib.contextmanager
def quiet_artifact_copies() -> Iterator[None]:
    """No "Downloading artifacts" bars while MLflow copies the local artifacts."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _save(target: Path, staging: Path, weights: Path, class_names: Sequence[str]) -> None:
    mlflow.pyfunc.save_model(
        path=str(target),
        python_model=str(Path(__file__).with_name("model_code.py")),  # no pickled objects
        artifacts={
            "config": str(staging / names.ARTIFACT_CONFIG),
            "weights": str(weights),
            "classes": str(staging / _CLASSES_FILE),
        },
        signature=signature(class_names),
        pip_requirements=requirements(),
    )


def log_pyfunc(
    tracker: Tracker,
    run_id: str,
    *,
    config_text: str,
    weights: Path,
    class_names: Sequence[str] | None = None,
) -> None:
    """Logs the run's MLflow model as its ``model`` artifact (``runs:/<run id>/model``)."""
    if class_names is None:
        cfg = ExperimentConfig.model_validate(yaml.safe_load(config_text))
        class_names = class_names_of(cfg)
    with tempfile.TemporaryDirectory() as scratch:
        target = save_pyfunc(
            Path(scratch), config_text=config_text, weights=weights, class_names=class_names
        )
        tracker.log_artifact(run_id, target)


def log_run_model(tracker: Tracker, run_id: str, config_text: str, directory: Path) -> None:
    """Logs a finished training run's MLflow model from its final files (``directory``
    holding ``weights.pt`` and, when validation ran, ``val_scores.parquet``, whose columns
    name the classes); nothing when there are no weights."""
    weights = directory / names.ARTIFACT_WEIGHTS
    if not weights.is_file():
        return
    scores, class_names = directory / names.ARTIFACT_SCORES, None
    if scores.is_file():
        columns = pq.read_schema(scores).names
        class_names = [c for c in columns if c not in (VIDEO_ID, LABEL)]
    log_pyfunc(tracker, run_id, config_text=config_text, weights=weights, class_names=class_names)

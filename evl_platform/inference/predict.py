"""``evl-platform predict``: the top-k classes of single video files, for the terminal or JSON.

The classifying itself is :class:`~evl_platform.serving.classifier.VideoClassifier`, which the
MLflow model of a run uses too, so both give the same answer for the same file.
"""

from __future__ import annotations

from collections.abc import Sequence

from evl_platform.config import ExperimentConfig
from evl_platform.serving.classifier import Prediction, VideoClassifier
from evl_platform.serving.pyfunc import class_names_of


def create_classifier(
    cfg: ExperimentConfig, model: object, class_names: Sequence[str] | None = None
) -> VideoClassifier:
    """A classifier of the model, naming classes as the config's dataset does."""
    return VideoClassifier(model, cfg, class_names or class_names_of(cfg))


def prediction_json(prediction: Prediction, k: int, class_names: Sequence[str]) -> dict:
    """One file's result as a JSON-ready object."""
    if prediction.error is not None:
        return {"path": prediction.path, "error": prediction.error}
    top = prediction.top(k, class_names)
    return {"path": prediction.path, "top": [{"class": c, "probability": p} for c, p in top]}


def format_prediction(prediction: Prediction, k: int, class_names: Sequence[str]) -> str:
    """One file's result for the terminal: the file, then its top-k classes."""
    if prediction.error is not None:
        return f"{prediction.path}: error: {prediction.error}"
    rows = [f"  {p * 100:6.2f}%  {c}" for c, p in prediction.top(k, class_names)]
    return "\n".join([f"{prediction.path}:", *rows])

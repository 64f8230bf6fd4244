"""Classifying video files with a trained model, under the config's test views.

Each file is decoded, sampled into the test views and transformed exactly as a validation
video is (:class:`~evl_platform.data.dataset.VideoDataset` with ``train=False``); the full
model (backbone included) classifies every view and the softmax scores are averaged, the
paper's multi-view protocol. A file that cannot be used gets an error naming why; the other
files are still classified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from evl_platform.config import ExperimentConfig
from evl_platform.data.annotations import Annotations, VideoRecord
from evl_platform.data.dataset import VideoDataset
from evl_platform.data.decode import VideoError
from evl_platform.data.source import image_size
from evl_platform.models import create_model


class WeightsMismatch(ValueError):
    """Trained weights that do not fit the model their config builds."""


def load_trained(
    cfg: ExperimentConfig,
    weights: Mapping[str, torch.Tensor],
    *,
    load_backbone: bool = True,
    label: str = "weights",
) -> nn.Module:
    """The config's model with trained weights, in eval mode on the CPU.

    ``weights`` hold the trained part: everything but a frozen backbone, which the config
    re-creates (seeded random init, or its pretrained weights when ``load_backbone``).

    Raises:
        WeightsMismatch: a key the model lacks, a trained key missing, or a wrong shape.
    """
    model = create_model(cfg, load_weights=load_backbone)
    own = model.state_dict()
    frozen = not getattr(getattr(model, "backbone", None), "trainable", True)
    missing = sorted(
        k for k in own if k not in weights and not (frozen and k.startswith("backbone."))
    )
    unexpected = sorted(set(weights) - set(own))
    shapes = sorted(
        f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}"
        for k, v in weights.items()
        if k in own and v.shape != own[k].shape
    )
    if missing or unexpected or shapes:
        raise WeightsMismatch(
            f"{label}: the weights do not fit the config's model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatch {shapes[:5]})"
        )
    model.load_state_dict(dict(weights), strict=False)
    return model.eval()


@dataclass
class Prediction:
    """The outcome for one file: probabilities, or why there are none.

    Attributes:
        path: the file as given.
        probs: (classes,) view-averaged probabilities; ``None`` when the file failed.
        error: ``kind: detail`` of the failure (``missing``, ``empty``, ``unreadable``, ...).
    """

    path: str
    probs: np.ndarray | None = None
    error: str | None = None

    def top(self, k: int, class_names: Sequence[str]) -> list[tuple[str, float]]:
        """The ``k`` most probable classes with their probabilities, best first."""
        if self.probs is None:
            return []
        order = np.argsort(-self.probs, kind="stable")[:k]
        return [(class_names[i], float(self.probs[i])) for i in order]


class VideoClassifier:
    """A trained model that classifies video files under the config's test views.

    Args:
        model: the model (backbone, decoder, head) with its trained weights.
        cfg: its resolved config (test views, sampling, decoding).
        class_names: class name of each output index.
        device: where the model runs (default: the CPU).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: ExperimentConfig,
        class_names: Sequence[str],
        device: torch.device | None = None,
    ) -> None:
        self.device = device or torch.device("cpu")
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.class_names = list(class_names)

    def predict(self, paths: Sequence[str | Path]) -> list[Prediction]:
        """One :class:`Prediction` per path, in order."""
        if not paths:
            return []
        records = tuple(
            VideoRecord(video_id=str(p), path=Path(p).absolute(), label=0) for p in paths
        )
        listing = Annotations(Path("<predict>"), records, tuple(self.class_names))
        dataset = VideoDataset(
            listing, data=self.cfg.data, image_size=image_size(self.cfg), train=False
        )
        return [self._one(dataset, i, str(path)) for i, path in enumerate(paths)]

    def _one(self, dataset: VideoDataset, index: int, path: str) -> Prediction:
        try:
            views, _ = dataset.load(index)  # (V, C, T, H, W)
        except VideoError as err:
            return Prediction(path, error=f"{err.kind}: {err.detail}")
        with torch.inference_mode():
            logits = self.model(views.to(self.device)).float()  # (V, classes)
        return Prediction(path, probs=logits.softmax(-1).mean(0).cpu().numpy())

"""The models ``bench step`` times: EVL, or a CLIP backbone under the paper's baseline head."""

from __future__ import annotations

import torch
from torch import nn

from evl_platform.config import ExperimentConfig
from evl_platform.models import ClipBackbone, create_backbone, create_model


class GapClassifier(nn.Module):
    """The paper's baseline head: CLIP embedding per frame, averaged over frames, then linear.

    Args:
        backbone: the image encoder (its ``forward`` is the CLIP embedding).
        num_classes: output classes.
    """

    def __init__(self, *, backbone: ClipBackbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.visual.output_dim, num_classes)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Maps (N, 3, T, H, W) clips to (N, classes) logits."""
        n, _, t = video.shape[:3]
        embedding = self.backbone(video.transpose(1, 2).flatten(0, 1))  # (N*T, D)
        return self.fc(embedding.float().unflatten(0, (n, t)).mean(1))  # (N, classes)


def create_bench_model(cfg: ExperimentConfig, head: str) -> nn.Module:
    """The EVL model of ``cfg``, or its backbone under a global-average-pool head."""
    if head == "evl":
        return create_model(cfg, load_weights=False)
    backbone = create_backbone(cfg.model.backbone, load_weights=False)
    return GapClassifier(backbone=backbone, num_classes=cfg.data.num_classes)

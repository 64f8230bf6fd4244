"""A small 3D CNN trained end to end from scratch: a video model family unlike CLIP/EVL.

The paper's Tables 10-11 ensemble EVL with a supervised video model; on the CPU ``local``
profile this network plays that part. It reads decoded clips only (there is no frozen backbone,
so no feature cache) and satisfies what the training code asks of a model: ``forward`` on
(N, C, T, H, W) clips, ``new_parameters``, ``image_size`` and ``forward_images``.
"""

from __future__ import annotations

import torch
from torch import nn

from evl_platform.config.schema import Cnn3dConfig, ExperimentConfig
from evl_platform.models.backbone import backbone_spec
from evl_platform.models.pixels import normalize_pixels


def conv_bn_relu(
    in_channels: int,
    out_channels: int,
    *,
    kernel: tuple[int, int, int],
    stride: tuple[int, int, int],
    padding: tuple[int, int, int],
) -> nn.Sequential:
    """Conv3d (no bias) -> BatchNorm3d -> ReLU."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=False),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
    )


class Cnn3d(nn.Module):
    """Stem -> 3D conv blocks -> global average pool -> dropout -> linear.

    Args:
        stem: maps (N, 3, T, H, W) clips to (N, C0, T, H', W').
        blocks: the Conv3d-BN-ReLU blocks, in order.
        num_classes: output classes.
        dropout: dropout before the linear head.
        image_size: (height, width) of the clips the data pipeline feeds it; the network itself
            takes any size (it is used to count GFLOPs).
    """

    forward_images = 0
    """Images an image encoder ran on: always 0, this model has none (read by the training
    worker's ``train/backbone_forward_images`` metric)."""

    def __init__(
        self,
        *,
        stem: nn.Module,
        blocks: list[nn.Module],
        num_classes: int,
        dropout: float,
        image_size: tuple[int, int],
    ) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        width = _out_channels(blocks[-1]) if blocks else _out_channels(stem)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)
        self.image_size = tuple(image_size)
        _init_weights(self)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Maps (N, 3, T, H, W) clips (uint8, or normalised float) to (N, classes) logits."""
        x = self.blocks(self.stem(normalize_pixels(video, channel_dim=-4)))  # (N, C, T', H', W')
        return self.fc(self.dropout(x.mean(dim=(2, 3, 4))))  # (N, classes)

    def new_parameters(self) -> list[nn.Parameter]:
        """Every parameter: the whole network is trained from scratch."""
        return list(self.parameters())


def _out_channels(module: nn.Module) -> int:
    return [m for m in module.modules() if isinstance(m, nn.Conv3d)][-1].out_channels


def _init_weights(model: nn.Module) -> None:
    """He init for the convolutions (as torchvision's ResNets), BN at identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def create_blocks(cfg: Cnn3dConfig) -> tuple[nn.Module, list[nn.Module]]:
    """The stem (4x4 patches per frame) and ``cfg.depth`` 3x3x3 blocks.

    Block ``i`` has ``width * 2**i`` channels and halves height and width; every block after
    the first also halves time. 8 frames at 64x64 px: (8, 16, 16) after the stem, then
    (8, 8, 8), (4, 4, 4), (2, 2, 2), (1, 1, 1).
    """
    stem = conv_bn_relu(3, cfg.width, kernel=(1, 4, 4), stride=(1, 4, 4), padding=(0, 0, 0))
    blocks, channels = [], cfg.width
    for i in range(cfg.depth):
        out = cfg.width * 2**i
        time_stride = 1 if i == 0 else 2
        blocks.append(
            conv_bn_relu(
                channels, out, kernel=(3, 3, 3), stride=(time_stride, 2, 2), padding=(1, 1, 1)
            )
        )
        channels = out
    return stem, blocks


def create_cnn3d(cfg: ExperimentConfig, *, load_weights: bool = True) -> Cnn3d:
    """Builds the 3D CNN of an experiment (``model.arch: cnn3d``).

    Args:
        cfg: the resolved experiment configuration.
        load_weights: ignored: the network has no pretrained weights (random init from the
            global torch seed, like EVL's decoder).
    """
    stem, blocks = create_blocks(cfg.model.cnn3d)
    size = backbone_spec(cfg.model.backbone.name).image_size  # the clips the loader makes
    return Cnn3d(
        stem=stem,
        blocks=blocks,
        num_classes=cfg.data.num_classes,
        dropout=cfg.model.cnn3d.dropout,
        image_size=(size, size),
    )

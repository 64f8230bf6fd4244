"""Clip transforms: one random draw per clip, applied to every frame alike.

Training: random resized crop to the model's input size, then RandAugment and an optional
horizontal flip, drawn as one plan per clip (:mod:`evl_platform.data.rand_augment`) and applied
where ``data.augment.on`` says: in the loader worker, or on the training device for the whole
batch (:mod:`evl_platform.data.augment_device`). Testing: short-side resize, then a centre crop
or three crops along the long side. Both return uint8 tensors shaped (C, T, H, W): the models
normalise them with CLIP's mean and std on the device they run on
(:func:`evl_platform.models.pixels.normalize_pixels`).

Work happens on uint8 (T, C, H, W) tensors with one torch thread (loader workers give the
parallelism). RandAugment runs after the crop, at the model's input size, which costs a
fraction of augmenting the full frames as the official code does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as tnf
from torchvision.transforms.v2 import functional as F

from evl_platform.config import AugmentConfig
from evl_platform.data.rand_augment import apply_plan, draw_plan, parse_rand_augment


def _resized_crop(
    clip: torch.Tensor, top: int, left: int, height: int, width: int, size: int
) -> torch.Tensor:
    crop = clip[..., top : top + height, left : left + width]
    # bilinear without antialiasing, as the official code's F.interpolate (and cheaper)
    return tnf.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)


def random_resized_crop(
    clip: torch.Tensor,
    *,
    size: int,
    scale: tuple[float, float],
    rng: np.random.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """torchvision's RandomResizedCrop box search, one box for every frame, resized to size².

    Args:
        clip: uint8 (T, C, H, W).
        size: output side (pixels).
        scale: range of the box's area as a fraction of the frame's.
        rng: the clip's generator.
        ratio: range of the box's aspect ratio (width / height).

    Returns:
        uint8 (T, C, size, size), bilinear without antialiasing.
    """
    height, width = clip.shape[-2:]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return _resized_crop(clip, top, left, h, w, size)
    side = min(height, width)  # fallback: the largest centred square
    return _resized_crop(clip, (height - side) // 2, (width - side) // 2, side, side, size)


def resize_short_side(clip: torch.Tensor, size: int) -> torch.Tensor:
    """Resizes so the shorter side is ``size``, keeping the aspect ratio (bilinear without
    antialiasing, as the official code's test-time ``F.interpolate``)."""
    height, width = clip.shape[-2:]
    if height <= width:
        new = (size, max(size, round(width * size / height)))
    else:
        new = (max(size, round(height * size / width)), size)
    if new == (height, width):
        return clip
    return F.resize(clip, list(new), antialias=False)


def spatial_crops(clip: torch.Tensor, *, size: int, count: int) -> list[torch.Tensor]:
    """The centre crop (``count=1``) or start / centre / end crops along the long side (3)."""
    height, width = clip.shape[-2:]
    if count == 1:
        top, left = (height - size) // 2, (width - size) // 2
        return [clip[..., top : top + size, left : left + size]]
    margin = max(height, width) - size
    crops = []
    for start in (0, margin // 2, margin):
        if height > width:
            crops.append(clip[..., start : start + size, (width - size) // 2 :][..., :size])
        else:
            crops.append(clip[..., (height - size) // 2 :, start : start + size][..., :size, :])
    return crops


def channels_first(clip: torch.Tensor) -> torch.Tensor:
    """uint8 (T, C, H, W) -> contiguous uint8 (C, T, H, W), the layout the models take."""
    return torch.from_numpy(np.ascontiguousarray(clip.numpy().transpose(1, 0, 2, 3)))


class TrainTransform:
    """Random crop, RandAugment and flip with one draw per clip.

    Args:
        augment: the augmentation config (``augment.on``: where RandAugment and the flip run).
        size: model input size (pixels).
    """

    def __init__(self, augment: AugmentConfig, *, size: int) -> None:
        self.size = size
        self.scale = augment.random_resized_crop
        self.rand_augment = (
            parse_rand_augment(augment.rand_augment) if augment.rand_augment else None
        )
        self.flip = augment.horizontal_flip
        self.on_device = augment.on == "device" and (self.rand_augment is not None or self.flip)

    def __call__(
        self, frames: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """(T, H, W, 3) uint8 frames -> (C, T, size, size) uint8 and the plan still to apply
        on the device (``None`` when everything was applied here)."""
        clip = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (T, C, H, W)
        if self.scale is not None:
            clip = random_resized_crop(clip, size=self.size, scale=self.scale, rng=rng)
        else:
            clip = spatial_crops(resize_short_side(clip, self.size), size=self.size, count=1)[0]
        plan = draw_plan(self.rand_augment, flip=self.flip, rng=rng)
        if self.on_device:
            return channels_first(clip), plan
        return channels_first(apply_plan(clip, plan)), None


class TestTransform:
    """Short-side resize and ``spatial_views`` crops of one temporal view.

    Args:
        size: model input size (pixels).
        spatial_views: 1 (centre crop) or 3 (crops along the long side).
    """

    def __init__(self, *, size: int, spatial_views: int) -> None:
        self.size = size
        self.spatial_views = spatial_views

    def __call__(self, frames: np.ndarray) -> list[torch.Tensor]:
        """(T, H, W, 3) uint8 frames -> ``spatial_views`` uint8 tensors of (C, T, size, size)."""
        clip = resize_short_side(torch.from_numpy(frames).permute(0, 3, 1, 2), self.size)
        return [
            channels_first(crop)
            for crop in spatial_crops(clip, size=self.size, count=self.spatial_views)
        ]

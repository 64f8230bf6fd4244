"""Clip transforms: one random draw per clip, applied to every frame alike.

Training: random resized crop to the model's input size, RandAugment, optional horizontal
flip. Testing: short-side resize, then a centre crop or three crops along the long side. Both
return uint8 tensors shaped (C, T, H, W): the models normalise them with CLIP's mean and std on
the device they run on (:func:`evl_platform.models.pixels.normalize_pixels`).

Work happens on uint8 (T, C, H, W) tensors with one torch thread (loader workers give the
parallelism). RandAugment runs after the crop, at the model's input size, which costs a
fraction of augmenting the full frames as the official code does. The operations and their
magnitudes follow timm's ``rand-m{M}-n{N}-mstd0.5-inc1``, the policy of the video recipes the
paper builds on: N ops drawn uniformly with replacement, magnitude out of 10 with a per-op
jitter of std 0.5, "increasing" variants of the ops, each op applied with probability 0.5.

The ops are written for speed on small clips (numpy views of the tensors, whose uint8 and
float32 kernels beat torch's at this size): geometric ops are one nearest-neighbour gather
through PIL's inverse affine map, the per-pixel ops integer or float32 arithmetic that
reproduces torchvision's tensor kernels (per-frame statistics where those are per image).
Invert and Posterize are torchvision's own kernels, as fast as any here. Measured on 8-frame
clips at 224 and 64 px, one thread: torchvision v2's versions of the other ops took 0.8-1.7x
as long (AutoContrast, Equalize, Color, Contrast) to 1.6-180x (Brightness, Solarize,
Sharpness, the geometric ops), timm's per-frame PIL ops 1.1-310x; all 15 ops together, 73 ms
here against 295 ms (torchvision) and 411 ms (timm) at 224 px.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as tnf
from torchvision.transforms.v2 import functional as F

from evl_platform.config import AugmentConfig

MAGNITUDE_STD = 0.5
_FILL = 128
_GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _signed(level: float, limit: float, rng: np.random.Generator) -> float:
    return level * limit * (1 if rng.random() < 0.5 else -1)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)


def _contiguous(clip: torch.Tensor) -> torch.Tensor:
    # numpy's copy beats torch's for the channels-last uint8 clips the resize returns
    return clip if clip.is_contiguous() else _tensor(np.ascontiguousarray(clip.numpy()))


def _to_uint8(x: np.ndarray) -> torch.Tensor:
    """Clamps float32 ``x`` in place to [0, 255] and truncates, as torchvision's ``_blend``."""
    np.clip(x, 0, 255, out=x)
    return _tensor(x.astype(np.uint8))


@functools.lru_cache(maxsize=16)
def _pixel_centres(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(width) + 0.5, (np.arange(height) + 0.5)[:, None]


def _warp(clip: torch.Tensor, matrix: tuple[float, ...]) -> torch.Tensor:
    """Nearest-neighbour affine warp of every frame, out-of-image pixels set to 128.

    Args:
        clip: uint8 (T, C, H, W).
        matrix: PIL's ``Image.AFFINE`` data ``(a, b, c, d, e, f)``: the output pixel with
            centre ``(x, y)`` (pixel-edge coordinates) reads the input at
            ``(a x + b y + c, d x + e y + f)``, rounded down.

    Returns:
        The warped uint8 clip.
    """
    t, ch, h, w = clip.shape
    a, b, c, d, e, f = matrix
    xs, ys = _pixel_centres(h, w)
    src_x = np.floor(a * xs + (b * ys + c)).astype(np.intp)
    src_y = np.floor(d * xs + (e * ys + f)).astype(np.intp)
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    index = np.where(inside, src_y * w + src_x, h * w).ravel()  # h * w: the fill column
    padded = np.empty((t * ch, h * w + 1), dtype=np.uint8)
    padded[:, : h * w].reshape(t, ch, h, w)[...] = clip.numpy()
    padded[:, -1] = _FILL
    return _tensor(np.take(padded, index, axis=1).reshape(t, ch, h, w))


def _translate(clip: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Shifts every frame by (-dx, -dy) pixels (PIL's ``(1, 0, dx, 0, 1, dy)``), filling 128."""
    h, w = clip.shape[-2:]
    out = np.full(clip.shape, _FILL, dtype=np.uint8)
    if abs(dx) < w and abs(dy) < h:
        x = clip.numpy()
        out[..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)] = x[
            ..., max(dy, 0) : h - max(-dy, 0), max(dx, 0) : w - max(-dx, 0)
        ]
    return _tensor(out)


def _rotate(clip: torch.Tensor, degrees: float) -> torch.Tensor:
    """Counter-clockwise rotation about the image centre (PIL ``Image.rotate``)."""
    h, w = clip.shape[-2:]
    angle = -math.radians(degrees)
    a, b, d, e = math.cos(angle), math.sin(angle), -math.sin(angle), math.cos(angle)
    cx, cy = w / 2, h / 2
    return _warp(clip, (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy))


def _grey(x: np.ndarray) -> np.ndarray:
    """float32 (T, 3, H, W) -> floored luma (T, 1, H, W), as torchvision does for uint8."""
    grey = x[:, 0:1] * np.float32(_GREY[0])
    grey += x[:, 1:2] * np.float32(_GREY[1])
    grey += x[:, 2:3] * np.float32(_GREY[2])
    return np.floor(grey, out=grey)


def _blend(x: np.ndarray, other: np.ndarray, factor: float) -> torch.Tensor:
    """``x * factor + other * (1 - factor)`` in float32, clamped and truncated to uint8."""
    x *= np.float32(factor)
    other *= np.float32(1 - factor)
    x += other
    return _to_uint8(x)


def _contrast(clip: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with each frame's mean (floored) luma: torchvision's ``adjust_contrast``."""
    x = clip.numpy().astype(np.float32)
    mean = _grey(x).mean(axis=(1, 2, 3), keepdims=True, dtype=np.float32)
    return _blend(x, mean, factor)


def _color(clip: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the per-pixel luma: torchvision's ``adjust_saturation``."""
    x = clip.numpy().astype(np.float32)
    return _blend(x, _grey(x), factor)


def _brightness(clip: torch.Tensor, factor: float) -> torch.Tensor:
    """``min(255, floor(x * factor))``: torchvision's ``adjust_brightness``."""
    x = clip.numpy().astype(np.float32)
    x *= np.float32(factor)
    return _tensor(np.minimum(x, 255, out=x).astype(np.uint8))


def _sharpness(clip: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with PIL's SMOOTH filter (border pixels kept): torchvision's ``adjust_sharpness``.

    The blurred image is not rounded before blending (torchvision rounds it), so results can
    differ from torchvision's by one.
    """
    t, ch, h, w = clip.shape
    if h <= 2 or w <= 2:
        return clip
    x = clip.numpy().reshape(t * ch, h * w)  # flat rows: vertical neighbours are w apart
    wide = x.astype(np.int16)
    rows = wide[:, : -2 * w] + wide[:, w:-w]
    rows += wide[:, 2 * w :]
    box = rows[:, :-2] + rows[:, 1:-1]  # box[k] is centred on pixel w + 1 + k
    box += rows[:, 2:]
    box += wide[:, w + 1 : w + 1 + box.shape[1]] << 2  # kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]]
    out = x.astype(np.float32)
    inner = out[:, w + 1 : w + 1 + box.shape[1]]
    inner *= np.float32(factor)
    inner += box.astype(np.float32) * np.float32((1 - factor) / 13)
    out = out.reshape(t, ch, h, w)
    out[..., [0, -1]] = clip.numpy()[..., [0, -1]]  # the flat rows wrapped across the borders
    return _to_uint8(out)


def _autocontrast(clip: torch.Tensor) -> torch.Tensor:
    """Stretches each frame and channel to [0, 255]: torchvision's ``autocontrast``."""
    x = clip.numpy().astype(np.float32)
    low = x.min(axis=(2, 3), keepdims=True)
    high = x.max(axis=(2, 3), keepdims=True)
    flat = high == low
    inv_scale = np.where(flat, np.float32(1), (high - low) * np.float32(1 / 255))
    x -= np.where(flat, np.float32(0), low)
    x /= inv_scale
    return _to_uint8(x)


def _equalize(clip: torch.Tensor) -> torch.Tensor:
    """PIL's histogram equalisation of each frame and channel (torchvision's ``equalize``)."""
    t, ch, h, w = clip.shape
    rows = t * ch
    index = np.add(
        clip.numpy().reshape(rows, h * w), np.arange(0, rows * 256, 256)[:, None], dtype=np.intp
    )
    hist = np.bincount(index.ravel(), minlength=rows * 256).reshape(rows, 256)
    cum = np.cumsum(hist, axis=1)
    last = hist[np.arange(rows), 255 - np.argmax(hist[:, ::-1] > 0, axis=1)]
    step = (h * w - last) // 255
    safe = np.maximum(step, 1)[:, None]
    lut = np.empty((rows, 256), dtype=np.int64)
    lut[:, 0] = 0
    lut[:, 1:] = np.minimum((cum[:, :-1] + safe // 2) // safe, 255)
    lut[step == 0] = np.arange(256)  # a single-valued channel stays as it is
    return _tensor(np.take(lut.astype(np.uint8), index).reshape(t, ch, h, w))


def _solarize(clip: torch.Tensor, threshold: int) -> torch.Tensor:
    """Inverts pixels ``>= threshold``."""
    if threshold > 255:
        return clip
    x = clip.numpy()
    return _tensor(x ^ ((x >= threshold).view(np.uint8) * np.uint8(255)))


def _solarize_add(clip: torch.Tensor, add: int) -> torch.Tensor:
    """Adds ``add`` (<= 127, so no overflow) to pixels below 128."""
    x = clip.numpy()
    return _tensor(x + (x < 128).view(np.uint8) * np.uint8(add))


_Op = Callable[[torch.Tensor, float, np.random.Generator], torch.Tensor]

# level in [0, 1] = magnitude / 10; limits follow timm's auto_augment.py ("increasing" ops).
RAND_AUGMENT_OPS: dict[str, _Op] = {
    "AutoContrast": lambda c, lv, r: _autocontrast(c),
    "Equalize": lambda c, lv, r: _equalize(c),
    "Invert": lambda c, lv, r: F.invert(c),
    "Rotate": lambda c, lv, r: _rotate(c, _signed(lv, 30.0, r)),
    "Posterize": lambda c, lv, r: F.posterize(c, 4 - int(lv * 4)),
    "Solarize": lambda c, lv, r: _solarize(c, int(round(256 * (1 - lv)))),
    "SolarizeAdd": lambda c, lv, r: _solarize_add(c, int(110 * lv)),
    "Color": lambda c, lv, r: _color(c, 1 + _signed(lv, 0.9, r)),
    "Contrast": lambda c, lv, r: _contrast(c, 1 + _signed(lv, 0.9, r)),
    "Brightness": lambda c, lv, r: _brightness(c, 1 + _signed(lv, 0.9, r)),
    "Sharpness": lambda c, lv, r: _sharpness(c, 1 + _signed(lv, 0.9, r)),
    "ShearX": lambda c, lv, r: _warp(c, (1, _signed(lv, 0.3, r), 0, 0, 1, 0)),
    "ShearY": lambda c, lv, r: _warp(c, (1, 0, 0, _signed(lv, 0.3, r), 1, 0)),
    "TranslateXRel": lambda c, lv, r: _translate(c, round(_signed(lv, 0.45, r) * c.shape[-1]), 0),
    "TranslateYRel": lambda c, lv, r: _translate(c, 0, round(_signed(lv, 0.45, r) * c.shape[-2])),
}


def parse_rand_augment(spec: str) -> tuple[int, int]:
    """``"m7-n4"`` -> (magnitude 7, 4 ops)."""
    match = re.fullmatch(r"m(\d+)-n(\d+)", spec)
    if match is None:
        raise ValueError(f"RandAugment spec must look like 'm7-n4', got {spec!r}")
    return int(match.group(1)), int(match.group(2))


def rand_augment(
    clip: torch.Tensor, *, magnitude: int, num_ops: int, rng: np.random.Generator
) -> torch.Tensor:
    """Applies ``num_ops`` random ops, each with probability 0.5, to all frames.

    The ops are drawn uniformly *with* replacement (one op may come twice), as timm's
    ``RandAugment`` and the official EVL code (``video_dataset/rand_augment.py``) draw them.
    """
    names = list(RAND_AUGMENT_OPS)
    for index in rng.integers(len(names), size=num_ops):
        if rng.random() < 0.5:
            clip = _contiguous(clip)  # the ops are fastest on (T, C, H, W) memory
            level = min(max(float(rng.normal(magnitude, MAGNITUDE_STD)), 0.0), 10.0) / 10
            clip = RAND_AUGMENT_OPS[names[index]](clip, level, rng)
    return clip


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
    return _tensor(np.ascontiguousarray(clip.numpy().transpose(1, 0, 2, 3)))


class TrainTransform:
    """Random crop, RandAugment and flip with one draw per clip.

    Args:
        augment: the augmentation config.
        size: model input size (pixels).
    """

    def __init__(self, augment: AugmentConfig, *, size: int) -> None:
        self.size = size
        self.scale = augment.random_resized_crop
        self.rand_augment = (
            parse_rand_augment(augment.rand_augment) if augment.rand_augment else None
        )
        self.flip = augment.horizontal_flip

    def __call__(self, frames: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """(T, H, W, 3) uint8 frames -> (C, T, size, size) uint8."""
        clip = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (T, C, H, W)
        if self.scale is not None:
            clip = random_resized_crop(clip, size=self.size, scale=self.scale, rng=rng)
        else:
            clip = spatial_crops(resize_short_side(clip, self.size), size=self.size, count=1)[0]
        if self.rand_augment is not None:
            magnitude, num_ops = self.rand_augment
            clip = rand_augment(clip, magnitude=magnitude, num_ops=num_ops, rng=rng)
        if self.flip and rng.random() < 0.5:
            clip = clip.flip(-1)
        return channels_first(clip)


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

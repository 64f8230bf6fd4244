"""RandAugment as the paper's recipe runs it: the draw, and the CPU kernels that apply it.

A clip's augmentation is drawn once, as a *plan*: a small float64 array with one ``(op,
argument)`` row per slot, ``op`` an index into :data:`OP_NAMES` (-1: the slot's op was not
applied) and ``argument`` what the op needs (a rotation in degrees, a blend factor, a
threshold, a shift as a fraction of the frame). The RandAugment slots come first and, when the
recipe flips, a last slot holds :data:`FLIP` or -1. The loader draws the plan with the clip's
own generator right after the random resized crop, so the draws do not depend on where the
plan is applied: here, in the loader worker (:func:`apply_plan`), or on the training device
for a whole batch at once (:mod:`evl_platform.data.augment_device`), pixel for pixel the same.

The policy and magnitudes follow timm's ``rand-m{M}-n{N}-mstd0.5-inc1``, the policy of the
video recipes the paper builds on: N ops drawn uniformly *with* replacement (one op may come
twice, as timm's ``RandAugment`` and the official ``video_dataset/rand_augment.py`` draw
them), each applied with probability 0.5, magnitude out of 10 with a per-op jitter of std 0.5,
"increasing" variants of the ops.

The CPU kernels are written for speed on small clips (numpy views of uint8 (T, C, H, W)
tensors, whose uint8 and float32 kernels beat torch's at this size): geometric ops are one
nearest-neighbour gather through PIL's inverse affine map, the per-pixel ops integer or float32
arithmetic that reproduces torchvision's tensor kernels (per-frame statistics where those are
per image). Invert and Posterize are torchvision's own kernels, as fast as any here. Measured on
8-frame clips at 224 and 64 px, one thread: torchvision v2's versions of the other ops took
0.8-1.7x as long (AutoContrast, Equalize, Color, Contrast) to 1.6-180x (Brightness, Solarize,
Sharpness, the geometric ops), timm's per-frame PIL ops 1.1-310x; all 15 ops together, 73 ms
here against 295 ms (torchvision) and 411 ms (timm) at 224 px.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

MAGNITUDE_STD = 0.5
_FILL = 128
_GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


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


def affine_matrix(name: str, argument: float, height: int, width: int) -> tuple[float, ...]:
    """PIL's ``Image.AFFINE`` data of a geometric op (see :func:`_warp`).

    Rotate turns counter-clockwise by ``argument`` degrees about the image centre (PIL's
    ``Image.rotate``); the shears are about the top-left corner, as timm's; the translations
    read ``x + round(argument * width)`` (a shift by minus that many pixels).
    """
    if name == "Rotate":
        angle = -math.radians(argument)
        a, b, d, e = math.cos(angle), math.sin(angle), -math.sin(angle), math.cos(angle)
        cx, cy = width / 2, height / 2
        return (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy)
    if name == "ShearX":
        return (1, argument, 0, 0, 1, 0)
    if name == "ShearY":
        return (1, 0, 0, argument, 1, 0)
    if name == "TranslateXRel":
        return (1, 0, round(argument * width), 0, 1, 0)
    if name == "TranslateYRel":
        return (1, 0, 0, 0, 1, round(argument * height))
    raise KeyError(name)


def _signed(limit: float) -> Callable[[float, np.random.Generator], float]:
    """``level * limit`` with a random sign (drawn from the clip's generator)."""
    return lambda level, rng: level * limit * (1 if rng.random() < 0.5 else -1)


def _factor(level: float, rng: np.random.Generator) -> float:
    return 1 + _signed(0.9)(level, rng)


def _geometric(name: str) -> Callable[[torch.Tensor, float], torch.Tensor]:
    def apply(clip: torch.Tensor, argument: float) -> torch.Tensor:
        h, w = clip.shape[-2:]
        matrix = affine_matrix(name, argument, h, w)
        if name.startswith("Translate"):
            return _translate(clip, int(matrix[2]), int(matrix[5]))
        return _warp(clip, matrix)

    return apply


@dataclass(frozen=True)
class Op:
    """One RandAugment op.

    Attributes:
        argument: level in [0, 1] (magnitude / 10) and the clip's generator -> the op's
            argument (the signed ops draw their sign here).
        apply: the CPU kernel, uint8 (T, C, H, W) clip and argument -> clip.
    """

    argument: Callable[[float, np.random.Generator], float]
    apply: Callable[[torch.Tensor, float], torch.Tensor]


def _level(level: float, _: np.random.Generator) -> float:
    return level


# limits follow timm's auto_augment.py ("increasing" ops); the order is the draw's
OPS: dict[str, Op] = {
    "AutoContrast": Op(_level, lambda c, a: _autocontrast(c)),
    "Equalize": Op(_level, lambda c, a: _equalize(c)),
    "Invert": Op(_level, lambda c, a: F.invert(c)),
    "Rotate": Op(_signed(30.0), _geometric("Rotate")),
    "Posterize": Op(lambda lv, r: 4 - int(lv * 4), lambda c, a: F.posterize(c, int(a))),
    "Solarize": Op(lambda lv, r: int(round(256 * (1 - lv))), lambda c, a: _solarize(c, int(a))),
    "SolarizeAdd": Op(lambda lv, r: int(110 * lv), lambda c, a: _solarize_add(c, int(a))),
    "Color": Op(_factor, _color),
    "Contrast": Op(_factor, _contrast),
    "Brightness": Op(_factor, _brightness),
    "Sharpness": Op(_factor, _sharpness),
    "ShearX": Op(_signed(0.3), _geometric("ShearX")),
    "ShearY": Op(_signed(0.3), _geometric("ShearY")),
    "TranslateXRel": Op(_signed(0.45), _geometric("TranslateXRel")),
    "TranslateYRel": Op(_signed(0.45), _geometric("TranslateYRel")),
}
OP_NAMES: tuple[str, ...] = (*OPS, "HorizontalFlip")
FLIP = len(OPS)  # the flip slot's op index
SKIP = -1


def parse_rand_augment(spec: str) -> tuple[int, int]:
    """``"m7-n4"`` -> (magnitude 7, 4 ops)."""
    match = re.fullmatch(r"m(\d+)-n(\d+)", spec)
    if match is None:
        raise ValueError(f"RandAugment spec must look like 'm7-n4', got {spec!r}")
    return int(match.group(1)), int(match.group(2))


def draw_plan(
    rand_augment: tuple[int, int] | None, *, flip: bool, rng: np.random.Generator
) -> np.ndarray:
    """One clip's augmentation plan (module docstring), drawn from its generator.

    Args:
        rand_augment: (magnitude, number of ops), or ``None`` for no RandAugment.
        flip: whether the recipe flips (a last slot, flipped with probability 0.5).
        rng: the clip's generator.

    Returns:
        float64 (slots, 2): (op index or -1, argument) per slot.
    """
    magnitude, num_ops = rand_augment or (0, 0)
    plan = np.zeros((num_ops + flip, 2))
    plan[:, 0] = SKIP
    names = list(OPS)
    for slot, index in enumerate(rng.integers(len(names), size=num_ops)):
        if rng.random() < 0.5:
            level = min(max(float(rng.normal(magnitude, MAGNITUDE_STD)), 0.0), 10.0) / 10
            plan[slot] = index, OPS[names[index]].argument(level, rng)
    if flip and rng.random() < 0.5:
        plan[-1, 0] = FLIP
    return plan


def apply_plan(clip: torch.Tensor, plan: np.ndarray) -> torch.Tensor:
    """Applies a plan to one uint8 (T, C, H, W) clip on the CPU, slot by slot."""
    for index, argument in plan:
        if index == FLIP:
            clip = clip.flip(-1)
        elif index != SKIP:
            clip = _contiguous(clip)  # the ops are fastest on (T, C, H, W) memory
            clip = OPS[OP_NAMES[int(index)]].apply(clip, float(argument))
    return clip


def rand_augment(
    clip: torch.Tensor, *, magnitude: int, num_ops: int, rng: np.random.Generator
) -> torch.Tensor:
    """Draws and applies ``num_ops`` RandAugment slots to one uint8 (T, C, H, W) clip."""
    return apply_plan(clip, draw_plan((magnitude, num_ops), flip=False, rng=rng))

"""RandAugment and the flip on the training device: a batch's plans applied with torch kernels.

With ``data.augment.on: device`` the loader workers decode and crop, and each clip travels
with its plan (:mod:`evl_platform.data.rand_augment`). :func:`apply_plans` then augments the
whole batch where the model runs, after the host-to-device copy: slot by slot, the clips that
drew the same op are gathered and augmented together by one batched kernel with per-clip
arguments (one launch per op and slot rather than per clip), taking the work off the loader
workers, the bottleneck of a frozen-backbone run. On a CPU the loader's own numpy kernels run
instead, clip by clip: there they are faster than these (docs/benchmarks.md).

The kernels compute what the CPU kernels compute, in the same arithmetic (float32 blends,
float64 affine maps, integer lookup tables), so a clip gets the same pixels wherever it is
augmented; only a per-frame mean (Contrast) is summed in a different order, which can move a
pixel by one grey level. Nothing here waits for the device: the plans are read on the host,
and the per-clip arguments travel in one (pinned, asynchronous) copy per batch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from evl_platform.data.rand_augment import FLIP, OP_NAMES, SKIP, affine_matrix, apply_plan

_FILL = 128
_GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")

# a kernel takes uint8 clips (n, C, T, H, W) and per-clip rows (n, 8) float64 on their
# device: (batch position, argument, affine matrix a..f) and returns the augmented clips
_Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_clip(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n,) -> (n, 1, 1, 1, 1) in ``dtype``, broadcasting over a clip."""
    return values.to(dtype).view(-1, 1, 1, 1, 1)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Clamps float32 to [0, 255] and truncates, as the CPU kernels (and torchvision) do."""
    return x.clamp_(0, 255).to(torch.uint8)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """float32 (n, 3, T, H, W) -> floored luma (n, 1, T, H, W)."""
    w = torch.tensor(_GREY, dtype=torch.float32)  # 0-d CPU operands: no host-to-device copy
    grey = x[:, 0:1] * w[0]
    grey += x[:, 1:2] * w[1]
    grey += x[:, 2:3] * w[2]
    return grey.floor_()


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x * factor + other * (1 - factor)`` in float32, per clip."""
    x = x * _per_clip(factor, torch.float32)
    x += other * _per_clip(1 - factor, torch.float32)
    return _to_uint8(x)


def _color(clips: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    x = clips.float()
    return _blend(x, _grey(x), rows[:, 1])


def _contrast(clips: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    x = clips.float()
    return _blend(x, _grey(x).mean(dim=(1, 3, 4), keepdim=True), rows[:, 1])


def _brightness(clips: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    x = clips.float() * _per_clip(rows[:, 1], torch.float32)
    return x.clamp_(max=255).to(torch.uint8)


def _sharpness(clips: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Blend with the 3x3 smoothing kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 inside the
    frame (border pixels kept)."""
    h, w = clips.shape[-2:]
    if h <= 2 or w <= 2:
        return clips
    wide = clips.to(torch.int32)
    cols = wide[..., :-2, :] + wide[..., 1:-1, :] + wide[..., 2:, :]
    box = cols[..., :-2] + cols[..., 1:-1] + cols[..., 2:] + 4 * wide[..., 1:-1, 1:-1]
    factor = rows[:, 1]
    out = clips.float()
    inner = out[..., 1:-1, 1:-1] * _per_clip(factor, torch.float32)
    inner += box.float() * _per_clip((1 - factor) / 13, torch.float32)
    out[..., 1:-1, 1:-1] = inner
    return _to_uint8(out)


def _autocontrast(clips: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    x = clips.float()
    low = x.amin(dim=(-2, -1), keepdim=True)
    high = x.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    inv_scale = torch.where(flat, 1.0, (high - low) * torch.tensor(1 / 255, dtype=torch.float32))
    x -= torch.where(flat, 0.0, low)
    x /= inv_scale
    return _to_uint8(x)


def _equalize(clips: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """PIL's histogram equalisation of every frame and channel."""
    shape = clips.shape
    h, w = shape[-2:]
    planes = clips.reshape(-1, h * w).long()
    count = len(planes)
    offsets = torch.arange(0, count * 256, 256, device=clips.device)[:, None]
    flat = (planes + offsets).ravel()
    # scatter_add_, not bincount: CUDA's bincount reads the largest value back to the host
    hist = torch.zeros(count * 256, dtype=torch.long, device=clips.device)
    hist = hist.scatter_add_(0, flat, torch.ones_like(flat)).view(count, 256)
    cum = hist.cumsum(1)
    bins = torch.arange(256, device=clips.device)
    last_bin = torch.where(hist > 0, bins, -1).amax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, last_bin)) // 255
    safe = step.clamp(min=1)
    lut = torch.empty_like(hist)
    lut[:, :1] = 0
    lut[:, 1:] = ((cum[:, :-1] + safe // 2) // safe).clamp_(max=255)
    lut = torch.where(step == 0, bins, lut)  # a single-valued channel stays as it is
    return lut.gather(1, planes).to(torch.uint8).view(shape)


def _invert(clips: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return 255 - clips


def _posterize(clips: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    bits = rows[:, 1].long()
    mask = torch.bitwise_left_shift(torch.full_like(bits, 255), 8 - bits) & 255  # top bits
    return clips & _per_clip(mask, torch.uint8)


def _solarize(clips: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    threshold = _per_clip(rows[:, 1], torch.int16)  # 256: nothing inverted
    return torch.where(clips.to(torch.int16) >= threshold, 255 - clips, clips)


def _solarize_add(clips: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    add = _per_clip(rows[:, 1], torch.uint8)  # at most 110: 127 + 110 fits in uint8
    return torch.where(clips < 128, clips + add, clips)


def _warp(clips: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour affine warp through each clip's inverse map (PIL's ``AFFINE`` data in
    ``rows[:, 2:8]``), out-of-frame pixels set to 128: the CPU kernel's float64 arithmetic."""
    n, c, t, h, w = clips.shape
    a, b, cc, d, e, f = (rows[:, k].view(n, 1, 1) for k in range(2, 8))
    xs = (torch.arange(w, device=clips.device, dtype=torch.float64) + 0.5).view(1, 1, w)
    ys = (torch.arange(h, device=clips.device, dtype=torch.float64) + 0.5).view(1, h, 1)
    src_x = torch.floor(a * xs + (b * ys + cc)).long()
    src_y = torch.floor(d * xs + (e * ys + f)).long()
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    index = torch.where(inside, src_y * w + src_x, h * w).view(n, 1, h * w)
    padded = torch.cat([clips.reshape(n, c * t, h * w), clips.new_full((n, c * t, 1), _FILL)], -1)
    return padded.gather(2, index.expand(n, c * t, h * w)).view(n, c, t, h, w)


def _flip(clips: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return clips.flip(-1)


KERNELS: dict[str, _Kernel] = {
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Invert": _invert,
    "Rotate": _warp,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "SolarizeAdd": _solarize_add,
    "Color": _color,
    "Contrast": _contrast,
    "Brightness": _brightness,
    "Sharpness": _sharpness,
    "ShearX": _warp,
    "ShearY": _warp,
    "TranslateXRel": _warp,
    "TranslateYRel": _warp,
    "HorizontalFlip": _flip,
}
assert tuple(KERNELS) == OP_NAMES and OP_NAMES[FLIP] == "HorizontalFlip"


def _groups(
    plans: np.ndarray, height: int, width: int
) -> tuple[list[tuple[int, int, int]], np.ndarray]:
    """The batch's (op, first row, rows) groups in application order, and their rows: per
    clip of a group, (batch position, argument, affine matrix or zeros)."""
    groups, rows = [], []
    for slot in range(plans.shape[1]):
        ops = plans[:, slot, 0]
        for op in np.unique(ops[ops != SKIP]).astype(int):
            chosen = np.flatnonzero(ops == op)
            block = np.zeros((len(chosen), 8))
            block[:, 0] = chosen
            block[:, 1] = plans[chosen, slot, 1]
            if OP_NAMES[op] in _GEOMETRIC:
                for row in block:
                    row[2:] = affine_matrix(OP_NAMES[op], row[1], height, width)
            groups.append((op, sum(len(r) for r in rows), len(chosen)))
            rows.append(block)
    return groups, np.concatenate(rows) if rows else np.zeros((0, 8))


def apply_plans(
    clips: torch.Tensor, plans: torch.Tensor | np.ndarray, *, kernels: str = "auto"
) -> torch.Tensor:
    """Augments a batch of clips on their device by their plans.

    Args:
        clips: uint8 (N, C, T, H, W), on the training device (modified in place when only
            some clips take an op).
        plans: (N, slots, 2) float64 on the host, one :func:`~evl_platform.data.rand_augment.
            draw_plan` per clip.
        kernels: ``torch`` (the batched kernels here), ``numpy`` (the loader's CPU kernels,
            clip by clip) or ``auto``: numpy for clips on the CPU, where they are faster
            (docs/benchmarks.md), torch on any other device.

    Returns:
        The augmented uint8 clips, same shape and device.
    """
    plans = np.asarray(plans, dtype=np.float64)
    if kernels == "numpy" or (kernels == "auto" and clips.device.type == "cpu"):
        return torch.stack(
            [
                apply_plan(clip.transpose(0, 1), plan).transpose(0, 1)
                for clip, plan in zip(clips.cpu(), plans, strict=True)
            ]
        ).to(clips.device)
    groups, host_rows = _groups(plans, *clips.shape[-2:])
    if not groups:
        return clips
    host = torch.from_numpy(host_rows)
    if clips.device.type == "cuda":
        host = host.pin_memory()
    rows = host.to(clips.device, non_blocking=True)
    positions = rows[:, 0].long()
    for op, first, count in groups:
        kernel, part = KERNELS[OP_NAMES[op]], rows[first : first + count]
        if count == len(clips):  # every clip: no gather (rows are in batch order)
            clips = kernel(clips, part)
        else:
            chosen = positions[first : first + count]
            clips.index_copy_(0, chosen, kernel(clips.index_select(0, chosen), part))
    return clips

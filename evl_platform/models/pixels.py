"""CLIP's pixel normalisation, applied by the models to the uint8 clips the data pipeline makes.

Clips travel from the loader workers as uint8 (4x less memory traffic and host-to-device copy
than float32) and are normalised where the model runs, on the training device. A model given
float input takes it as already normalised.
"""

from __future__ import annotations

import functools

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@functools.cache
def _affine(device: torch.device, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's per-channel scale and offset on ``device``, shaped to broadcast over ``dims``
    trailing dimensions; made once per device, copied without waiting where it can be."""
    shape = [3] + [1] * (dims - 1)
    scale = torch.tensor([1 / (255 * s) for s in CLIP_STD]).view(shape)
    offset = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]).view(shape)
    if device.type == "cuda":
        scale, offset = scale.pin_memory(), offset.pin_memory()
    return scale.to(device, non_blocking=True), offset.to(device, non_blocking=True)


def normalize_pixels(x: torch.Tensor, *, channel_dim: int) -> torch.Tensor:
    """uint8 pixels -> CLIP-normalised float32, ``(x / 255 - mean) / std`` per channel;
    float input is returned unchanged.

    Args:
        x: pixels with the 3 colour channels on ``channel_dim`` (e.g. -3 for (B, 3, H, W)
            images, -4 for (N, 3, T, H, W) clips).
        channel_dim: the channel axis, counted from the end (negative).
    """
    if x.dtype != torch.uint8:
        return x
    scale, offset = _affine(x.device, -channel_dim)
    return torch.addcmul(offset, x.to(torch.float32), scale)

"""Which frames of a video make a clip: dense (frames x stride) and uniform segments.

Training draws one random clip; testing returns evenly spread temporal views. Every function
takes the video's frame count and returns index arrays in non-decreasing order; a video shorter
than the clip gets clamped (repeated) indices, never an error.
"""

from __future__ import annotations

import numpy as np

from evl_platform.config import DataConfig


def dense_clip(
    length: int, *, num_frames: int, stride: int, rng: np.random.Generator
) -> np.ndarray:
    """A training clip of ``num_frames`` frames ``stride`` apart from a random start.

    A video shorter than the clip span starts at 0 and repeats its last frame.
    """
    span = (num_frames - 1) * stride + 1
    start = int(rng.integers(0, length - span + 1)) if length >= span else 0
    return _clamp(start + np.arange(num_frames) * stride, length)


def dense_views(length: int, *, num_frames: int, stride: int, views: int) -> list[np.ndarray]:
    """``views`` test clips whose starts are spread evenly from the first to the last frame."""
    span = (num_frames - 1) * stride + 1
    slack = max(length - span, 0)
    starts = [round(slack * v / (views - 1)) for v in range(views)] if views > 1 else [slack // 2]
    return [_clamp(s + np.arange(num_frames) * stride, length) for s in starts]


def uniform_clip(length: int, *, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """One frame from each of ``num_frames`` equal segments, at a random offset in each."""
    segment = length / num_frames
    offsets = rng.random(num_frames)
    return _clamp(np.floor((np.arange(num_frames) + offsets) * segment), length)


def uniform_views(length: int, *, num_frames: int, views: int) -> list[np.ndarray]:
    """Test views of uniform sampling: view ``v`` takes offset ``(v + 0.5) / views`` in every
    segment, so the views interleave and together cover the segments evenly."""
    segment = length / num_frames
    return [
        _clamp(np.floor((np.arange(num_frames) + (v + 0.5) / views) * segment), length)
        for v in range(views)
    ]


def _clamp(indices: np.ndarray, length: int) -> np.ndarray:
    return np.clip(indices.astype(np.int64), 0, length - 1)


class ClipSampler:
    """Frame indices for one video as configured by ``data`` (sampling, frames, stride, views).

    Args:
        data: the data config.
        train: one random clip per call when true, ``data.test_views.temporal`` views otherwise.
    """

    def __init__(self, data: DataConfig, *, train: bool) -> None:
        self.mode = data.sampling
        self.num_frames = data.num_frames
        self.stride = data.stride
        self.views = 1 if train else data.test_views.temporal
        self.train = train

    def __call__(self, length: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
        """Index arrays, one per temporal view, for a video of ``length`` frames."""
        if length < 1:
            raise ValueError(f"a video needs at least one frame, got {length}")
        if self.train:
            if rng is None:
                raise ValueError("training sampling needs a random generator")
            if self.mode == "dense":
                return [dense_clip(length, num_frames=self.num_frames, stride=self.stride, rng=rng)]
            return [uniform_clip(length, num_frames=self.num_frames, rng=rng)]
        if self.mode == "dense":
            return dense_views(
                length, num_frames=self.num_frames, stride=self.stride, views=self.views
            )
        return uniform_views(length, num_frames=self.num_frames, views=self.views)

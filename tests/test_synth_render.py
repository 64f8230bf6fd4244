"""What the synthetic-motion renderer promises: a salient object and distinct motion paths."""

from __future__ import annotations

import numpy as np
import pytest

from evl_platform.data import synth_render as render

SIZE = 64


@pytest.mark.parametrize("kind", render.MOTION_KINDS)
def test_motion_object_stands_out_from_a_dark_background(kind: str) -> None:
    for seed in range(5):
        frames, _ = render.motion_clip(kind, np.random.default_rng(seed), 8, SIZE, SIZE)
        luminance = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        background = np.median(luminance)
        assert background < 80
        # the object's pixels differ from the background by far more than the background varies
        distance = np.abs(frames.astype(np.float32) - np.median(frames, axis=(0, 1, 2))).sum(-1)
        assert (distance > 100).sum(axis=(1, 2)).min() >= 10  # every frame shows the object


@pytest.mark.parametrize("kind", ["horizontal", "vertical"])
def test_a_slow_single_object_sweeps_nearly_the_whole_frame(kind: str) -> None:
    for seed in range(10):
        (pose,) = render._motion_poses(kind, np.random.default_rng(seed), 8, SIZE, SIZE, False)
        path = np.asarray(pose["cx" if kind == "horizontal" else "cy"])
        margin = render._EXTENT * float(pose["radius"])
        assert abs(path[-1] - path[0]) >= 0.85 * (SIZE - 2 * margin) - 1e-6


def test_a_fast_crossing_jumps_further_than_a_patch_between_sampled_frames() -> None:
    """No 8x8 patch of a 64 px fast clip shows the object in two sampled frames in a row.

    The local recipe samples 8 of 32 frames, 4 apart. A temporal convolution over a patch's
    features therefore sees the object come and go at once, the same in both directions.
    """
    for seed in range(40):
        kind = ("horizontal", "vertical")[seed % 2]
        frames, _ = render.motion_clip(kind, np.random.default_rng(seed), 32, 64, 64, True)
        f = frames.astype(int)
        on = (f.max(axis=-1) - f.min(axis=-1)) > 100  # (T, H, W) object pixels
        for offset in range(4):
            sampled = on[offset::4].reshape(8, 8, 8, 8, 8).any(axis=(2, 4))  # (8, rows, cols)
            seen = sampled.any(axis=(1, 2))
            assert seen.sum() >= 2, (seed, offset)
            assert not (sampled[1:] & sampled[:-1]).any(), (seed, offset)
            where = [np.argwhere(p).mean(0) for p in sampled[seen]]  # (row, col) centroids
            axis = 1 if kind == "horizontal" else 0
            steps = np.diff([w[axis] for w in where])
            assert (steps > 0).all() if kind == "horizontal" else (steps < 0).all(), seed


def test_two_objects_converge_along_a_diagonal() -> None:
    for seed in range(20):
        first, second = render._motion_poses(
            "two_objects", np.random.default_rng(seed), 8, SIZE, SIZE, False
        )
        dx = first["cx"][-1] - first["cx"][0]
        dy = first["cy"][-1] - first["cy"][0]
        slope = abs(dy / dx)
        assert 0.5 < slope < 2.0  # 45 degrees +- 0.2 rad, never (near) horizontal or vertical
        start = np.hypot(first["cx"][0] - second["cx"][0], first["cy"][0] - second["cy"][0])
        end = np.hypot(first["cx"][-1] - second["cx"][-1], first["cy"][-1] - second["cy"][-1])
        assert end < start


def test_each_motion_pair_has_its_own_object_colour() -> None:
    """One frame tells the pair (by its objects' colour, on a grey background)."""
    for kind in render.MOTION_KINDS:
        colour = render.MOTION_COLOURS[kind]
        for seed in range(5):
            frames, placeholders = render.motion_clip(
                kind, np.random.default_rng(seed), 8, SIZE, SIZE
            )
            assert all(p.startswith(f"{colour} ") for p in placeholders)
            pixels = frames[0].reshape(-1, 3).astype(float)
            background = np.median(pixels, axis=0)
            assert np.ptp(background) <= 16  # grey: no tint tells the pair
            objects = pixels[np.abs(pixels - background).max(axis=1) > 60]
            assert len(objects) > 0
            painted = np.median(objects, axis=0)
            assert np.abs(painted - np.asarray(render.PALETTE[colour])).max() <= 30

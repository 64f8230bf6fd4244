"""Frame sampling and clip transforms: the indices and pixels a model actually sees."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from evl_platform.config import AugmentConfig, DataConfig
from evl_platform.config import TestViewsConfig as ViewsConfig
from evl_platform.data.augment_device import apply_plans
from evl_platform.data.rand_augment import OPS, parse_rand_augment, rand_augment
from evl_platform.data.sampling import (
    ClipSampler,
    dense_clip,
    dense_views,
    uniform_clip,
    uniform_views,
)
from evl_platform.data.transforms import TestTransform as EvalTransform
from evl_platform.data.transforms import TrainTransform, spatial_crops
from evl_platform.models.pixels import CLIP_MEAN, CLIP_STD, normalize_pixels


def _op(name: str, clip: torch.Tensor, level: float, rng: np.random.Generator) -> torch.Tensor:
    """RandAugment op ``name`` at ``level``, its argument drawn from ``rng``."""
    return OPS[name].apply(clip, OPS[name].argument(level, rng))


@pytest.mark.parametrize("length", [1, 3, 7, 8, 9, 31, 32, 300])
@pytest.mark.parametrize("views", [1, 2, 3, 5])
def test_uniform_test_views_shape_and_order(length: int, views: int) -> None:
    clips = uniform_views(length, num_frames=8, views=views)
    assert len(clips) == views
    for clip in clips:
        assert clip.shape == (8,)
        assert clip.min() >= 0 and clip.max() <= length - 1
        assert np.all(np.diff(clip) >= 0)
        if length >= 8:  # one distinct frame per segment
            assert np.all(np.diff(clip) > 0)
            segment = length / 8
            assert np.all(clip >= np.floor(np.arange(8) * segment))
            assert np.all(clip < np.ceil(np.arange(1, 9) * segment))


def test_uniform_test_views_interleave_and_cover() -> None:
    clips = uniform_views(96, num_frames=8, views=3)  # segments of 12 frames
    assert [c.tolist() for c in clips] == [
        [2, 14, 26, 38, 50, 62, 74, 86],
        [6, 18, 30, 42, 54, 66, 78, 90],
        [10, 22, 34, 46, 58, 70, 82, 94],
    ]
    assert uniform_views(96, num_frames=8, views=1)[0].tolist() == [6, 18, 30, 42, 54, 66, 78, 90]


def test_uniform_train_clip_one_frame_per_segment() -> None:
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        clip = uniform_clip(80, num_frames=8, rng=rng)
        assert np.all(clip // 10 == np.arange(8))
        seen.add(int(clip[0]))
    assert seen == set(range(10))  # the offset inside a segment is random
    short = uniform_clip(3, num_frames=8, rng=rng)
    assert short.shape == (8,) and short.max() <= 2 and np.all(np.diff(short) >= 0)


def test_dense_clip_and_views() -> None:
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(300):
        clip = dense_clip(200, num_frames=8, stride=16, rng=rng)
        assert np.all(np.diff(clip) == 16) and clip[-1] <= 199
        starts.add(int(clip[0]))
    assert min(starts) == 0 and max(starts) == 200 - 113  # span (8-1)*16+1 = 113
    views = dense_views(200, num_frames=8, stride=16, views=3)
    assert [int(v[0]) for v in views] == [0, 44, 87]
    assert int(views[-1][-1]) == 199
    assert dense_views(200, num_frames=8, stride=16, views=1)[0][0] == 43
    # shorter than the span: clamped to the last frame, never an error
    short = dense_views(50, num_frames=8, stride=16, views=3)
    assert all(v.tolist() == [0, 16, 32, 48, 49, 49, 49, 49] for v in short)
    assert dense_clip(1, num_frames=8, stride=16, rng=rng).tolist() == [0] * 8


def test_clip_sampler_follows_config() -> None:
    data = DataConfig(sampling="uniform", num_frames=4, test_views=ViewsConfig(temporal=2))
    assert len(ClipSampler(data, train=False)(40)) == 2
    assert len(ClipSampler(data, train=True)(40, np.random.default_rng(0))) == 1
    with pytest.raises(ValueError, match="random generator"):
        ClipSampler(data, train=True)(40)
    dense = DataConfig(sampling="dense", num_frames=4, stride=3)
    (clip,) = ClipSampler(dense, train=True)(40, np.random.default_rng(1))
    assert np.all(np.diff(clip) == 3)


def _moving_square(frames: int = 8, size: tuple[int, int] = (72, 96)) -> np.ndarray:
    clip = np.full((frames, *size, 3), 40, dtype=np.uint8)
    for t in range(frames):
        x = 8 + t * 8
        clip[t, 26:46, x : x + 16] = (250, 30, 30)
    return clip


def _red_centroid_x(clip: torch.Tensor) -> np.ndarray:
    red = clip[0] - clip[1]  # (T, H, W): high where the square is
    weights = (red > red.amax(dim=(1, 2), keepdim=True) * 0.5).float()
    xs = torch.arange(clip.shape[-1]).float()
    return ((weights.sum(1) * xs).sum(-1) / weights.sum((1, 2)).clamp(min=1)).numpy()


def _augmented(transform: TrainTransform, frames: np.ndarray, seed: int) -> torch.Tensor:
    """The clip the model gets: on the loader, or its plan applied as the device would."""
    clip, plan = transform(frames, np.random.default_rng(seed))
    return clip if plan is None else apply_plans(clip[None], plan[None])[0]


@pytest.mark.parametrize("on", ["loader", "device"])
def test_train_transform_is_identical_across_frames(on: str) -> None:
    frame = _moving_square()[3]
    still = np.repeat(frame[None], 8, axis=0)
    transform = TrainTransform(AugmentConfig(on=on), size=64)
    for seed in range(40):
        out = _augmented(transform, still, seed)
        assert out.shape == (3, 8, 64, 64) and out.dtype == torch.uint8
        assert torch.equal(out[:, :1].expand_as(out), out), f"seed {seed}: frames differ"


@pytest.mark.parametrize("on", ["loader", "device"])
def test_flip_only_where_allowed(on: str) -> None:
    clip = _moving_square()
    crop_only = AugmentConfig(rand_augment=None, random_resized_crop=(0.6, 1.0), on=on)
    directions = {}
    for flip in (False, True):
        transform = TrainTransform(crop_only.model_copy(update={"horizontal_flip": flip}), size=64)
        signs = set()
        for seed in range(30):
            x = _red_centroid_x(_augmented(transform, clip, seed))
            signs.add(bool(x[-1] > x[0]))
        directions[flip] = signs
    assert directions[False] == {True}  # left-to-right motion stays left-to-right
    assert directions[True] == {True, False}


def test_device_augmentation_gives_the_loaders_pixels() -> None:
    """The same clip and seed give the same pixels whether the loader augments or the training
    device does, with either kernel set: torch's batched kernels (what a GPU runs, here on
    the CPU) or the numpy ones."""
    frames = np.stack([_moving_square(size=(60, 80))[t] for t in range(4)])
    frames = frames.astype(np.int16) + np.random.default_rng(0).integers(0, 60, frames.shape)
    frames = frames.clip(0, 255).astype(np.uint8)  # uneven histograms for Equalize and co.
    loader = TrainTransform(AugmentConfig(on="loader"), size=48)
    device = TrainTransform(AugmentConfig(on="device"), size=48)
    seeds = range(24)
    expected = torch.stack([loader(frames, np.random.default_rng(s))[0] for s in seeds])
    cropped, plans = zip(*(device(frames, np.random.default_rng(s)) for s in seeds), strict=True)
    plans = np.stack(plans)
    assert len({int(op) for op in plans[..., 0].ravel()}) >= 12  # most ops, and the flip
    for kernels in ("torch", "numpy"):
        out = apply_plans(torch.stack(cropped), plans, kernels=kernels)
        assert torch.equal(out, expected), kernels
    assert not torch.equal(torch.stack(cropped), expected)


def test_rand_augment_ops_keep_shape_and_dtype() -> None:
    clip = torch.from_numpy(_moving_square()).permute(0, 3, 1, 2)[..., :64, :64].contiguous()
    rng = np.random.default_rng(0)
    changed = 0
    for name in OPS:
        out = _op(name, clip, 0.7, rng)
        assert out.shape == clip.shape and out.dtype == torch.uint8, name
        changed += not torch.equal(out, clip)
    assert changed >= len(OPS) - 1
    assert parse_rand_augment("m7-n4") == (7, 4)
    with pytest.raises(ValueError, match="m7-n4"):
        parse_rand_augment("rand-m7")
    # the same generator state gives the same augmentation
    a = rand_augment(clip, magnitude=7, num_ops=4, rng=np.random.default_rng(5))
    b = rand_augment(clip, magnitude=7, num_ops=4, rng=np.random.default_rng(5))
    assert torch.equal(a, b)


def test_test_transform_resize_crops_and_normalisation() -> None:
    mean_grey = np.array(CLIP_MEAN) * 255
    frames = np.broadcast_to(mean_grey.round().astype(np.uint8), (4, 48, 96, 3)).copy()
    (centre,) = EvalTransform(size=32, spatial_views=1)(frames)
    assert centre.shape == (3, 4, 32, 32) and centre.dtype == torch.uint8
    # the model normalises on its device: CLIP's mean maps to ~0, one grey level to 1/(255 std)
    normalised = normalize_pixels(centre[None], channel_dim=-4)
    assert normalised.dtype == torch.float32 and normalised.abs().max() < 0.01
    step = normalize_pixels(centre[None] + 1, channel_dim=-4) - normalised
    expected = torch.tensor([1 / (255 * s) for s in CLIP_STD]).view(3, 1, 1, 1)
    torch.testing.assert_close(step[0], expected.expand_as(step[0]), rtol=1e-4, atol=1e-6)
    floats = torch.randn(2, 3, 4, 8, 8)
    assert normalize_pixels(floats, channel_dim=-4) is floats  # float input: already normalised
    three = EvalTransform(size=32, spatial_views=3)(_moving_square(size=(48, 96)))
    assert len(three) == 3 and all(c.shape == (3, 8, 32, 32) for c in three)


def test_spatial_crops_positions() -> None:
    clip = torch.arange(40).view(1, 1, 1, 40).expand(2, 3, 20, 40)
    left, centre, right = spatial_crops(clip, size=20, count=3)
    assert left[0, 0, 0, [0, -1]].tolist() == [0, 19]
    assert centre[0, 0, 0, [0, -1]].tolist() == [10, 29]
    assert right[0, 0, 0, [0, -1]].tolist() == [20, 39]
    tall = clip.transpose(-1, -2)  # (…, 40, 20): crops go down the long side
    assert [c[0, 0, 0, 0].item() for c in spatial_crops(tall, size=20, count=3)] == [0, 10, 20]
    (only,) = spatial_crops(clip, size=20, count=1)
    assert only[0, 0, 0, 0].item() == 10


def _test_image(seed: int = 0) -> torch.Tensor:
    """Two skewed-noise frames, (2, 3, 30, 44) uint8: non-square, uneven histograms."""
    noise = np.random.default_rng(seed).random((2, 3, 30, 44))
    return torch.from_numpy((noise**2 * 200 + 20).astype(np.uint8))


def _sign(seed: int) -> int:
    """The sign the ops draw first from ``default_rng(seed)``."""
    return 1 if np.random.default_rng(seed).random() < 0.5 else -1


def _affine_reference(clip: torch.Tensor, **kwargs: object) -> torch.Tensor:
    params = {"angle": 0.0, "translate": [0, 0], "scale": 1.0, "shear": [0.0, 0.0]}
    params.update(kwargs)
    return F.affine(clip, **params, interpolation=InterpolationMode.NEAREST, fill=[128.0] * 3)


@pytest.mark.parametrize("seed", [0, 2, 3, 5])
def test_geometric_ops_match_torchvision_affine(seed: int) -> None:
    clip, level, sign = _test_image(seed), 0.7, _sign(seed)
    h, w = clip.shape[-2:]
    shear = math.degrees(math.atan(sign * level * 0.3))
    references = {
        # counter-clockwise, as PIL's Image.rotate; F.affine's angle is clockwise
        "Rotate": _affine_reference(clip, angle=-sign * level * 30),
        # timm shears with PIL's AFFINE data (1, f, 0, 0, 1, 0): about the top-left corner
        "ShearX": _affine_reference(clip, shear=[shear, 0.0], center=[0, 0]),
        "ShearY": _affine_reference(clip, shear=[0.0, shear], center=[0, 0]),
        # PIL's (1, 0, p, 0, 1, 0) reads x + p: a shift by -p
        "TranslateXRel": _affine_reference(clip, translate=[-round(sign * level * 0.45 * w), 0]),
        "TranslateYRel": _affine_reference(clip, translate=[0, -round(sign * level * 0.45 * h)]),
    }
    for name, expected in references.items():
        out = _op(name, clip, level, np.random.default_rng(seed))
        assert out.shape == clip.shape and out.dtype == torch.uint8
        differ = (out != expected).any(dim=1).float().mean().item()  # pixels, over frames
        # only pixel centres landing exactly on a rounding tie may differ
        assert differ < (1e-9 if name.startswith("Translate") else 0.03), (name, differ)
        assert (out == 128).all(dim=1).float().mean() > 0.05, name  # the fill shows


def test_lookup_table_ops_are_exact() -> None:
    clip = _test_image()
    wide = clip.to(torch.int32)
    for level in (0.0, 0.37, 0.7, 1.0):
        rng = np.random.default_rng(0)
        bits = 4 - int(level * 4)
        threshold = int(round(256 * (1 - level)))
        add = int(110 * level)
        expected = {
            "Invert": 255 - wide,
            "Posterize": wide >> (8 - bits) << (8 - bits) if bits else 0 * wide,
            "Solarize": torch.where(wide >= threshold, 255 - wide, wide),
            "SolarizeAdd": torch.where(wide < 128, (wide + add).clamp(max=255), wide),
        }
        for name, reference in expected.items():
            out = _op(name, clip, level, rng)
            assert out.dtype == torch.uint8 and torch.equal(out.to(torch.int32), reference), name
    for seed in (0, 2):  # both signs
        factor = 1 + _sign(seed) * 0.7 * 0.9
        out = _op("Brightness", clip, 0.7, np.random.default_rng(seed))
        expected = (wide.float() * np.float32(factor)).floor().clamp(0, 255).to(torch.uint8)
        assert torch.equal(out, expected)
        assert torch.equal(out, F.adjust_brightness(clip, factor))


@pytest.mark.parametrize("seed", [0, 2])
def test_colour_ops_match_torchvision(seed: int) -> None:
    clip, level = _test_image(seed), 0.7
    factor = 1 + _sign(seed) * level * 0.9
    references = {
        "Color": (F.adjust_saturation(clip, factor), 1),
        "Contrast": (F.adjust_contrast(clip, factor), 1),  # per-frame mean, as per image
        "Sharpness": (F.adjust_sharpness(clip, factor), 1),
        "AutoContrast": (F.autocontrast(clip), 1),
        "Equalize": (F.equalize(clip), 0),
    }
    for name, (expected, tolerance) in references.items():
        out = _op(name, clip, level, np.random.default_rng(seed))
        assert out.shape == clip.shape and out.dtype == torch.uint8, name
        error = (out.to(torch.int16) - expected.to(torch.int16)).abs().max().item()
        assert error <= tolerance, (name, error)
        assert not torch.equal(out, clip), name


def test_per_frame_ops_use_each_frames_statistics() -> None:
    clip = _test_image()
    clip[1] = clip[1] // 2  # a darker second frame
    for name, reference in {
        "Equalize": F.equalize,
        "AutoContrast": F.autocontrast,
        "Contrast": lambda c: F.adjust_contrast(c, 1 + _sign(0) * 0.63),
    }.items():
        out = _op(name, clip, 0.7, np.random.default_rng(0))
        for t in range(2):
            diff = out[t].to(torch.int16) - reference(clip[t]).to(torch.int16)
            assert diff.abs().max() <= 1, name


def test_ops_accept_channels_last_clips() -> None:
    clip = _test_image()
    strided = clip.contiguous(memory_format=torch.channels_last)
    for name in OPS:
        a = _op(name, clip, 0.7, np.random.default_rng(1))
        b = _op(name, strided, 0.7, np.random.default_rng(1))
        assert torch.equal(a, b), name

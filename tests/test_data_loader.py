"""The training/eval loader on real files: synthetic stand-ins and broken videos."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    BAD_KINDS_WRITTEN,
    SMALL,
    layout_data,
    listing_data,
    write_bad_videos,
    write_config,
)

from evl_platform.cli import main
from evl_platform.config import load_config
from evl_platform.data.dataset import TooManyBadVideos, VideoLoader
from evl_platform.data.decode import VideoError, read_clip
from evl_platform.data.source import create_dataset, read_splits, resolve_files
from evl_platform.data.synth import SyntheticLayout, write_video


@pytest.mark.parametrize("stand_in", ["motion_small", "appearance_small"])
def test_stand_in_clips_have_configured_shapes(
    stand_in: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    layout: SyntheticLayout = request.getfixturevalue(stand_in)
    sampling = {"sampling": "uniform"} if stand_in == "motion_small" else {"sampling": "dense"}
    cfg = write_config(
        tmp_path / "exp.yaml",
        layout_data(layout, stride=2, test_views={"temporal": 3, "spatial": 3}, **sampling),
    )
    splits = read_splits(cfg.data)
    assert splits["train"].class_names == layout.class_names
    assert splits["val"].class_names == layout.class_names
    assert len(splits["train"].records) == 10 * SMALL.clips_per_class
    assert len(splits["val"].records) == 10 * SMALL.val_clips_per_class
    train = create_dataset(cfg, splits["train"], train=True)
    val = create_dataset(cfg, splits["val"], train=False)
    sample = train[0]
    assert sample.clip.shape == (3, 8, 32, 32) and sample.clip.dtype == torch.uint8
    assert sample.bad == () and sample.label == splits["train"].records[0].label
    assert val[0].clip.shape == (9, 3, 8, 32, 32)  # 3 temporal x 3 spatial views
    # the same (seed, epoch, index) gives the same clip; another epoch gives another draw
    assert torch.equal(train[1].clip, train[1].clip)
    train.set_epoch(1)
    assert not torch.equal(train[1].clip, create_dataset(cfg, splits["train"], train=True)[1].clip)


def _list_with_bad_videos(tmp_path: Path, layout: SyntheticLayout, good: int) -> tuple[Path, dict]:
    """An EVL list file with ``good`` real stand-in videos followed by every bad kind."""
    splits = read_splits(
        write_config(tmp_path / "src.yaml", layout_data(layout, sampling="dense")).data
    )
    records = splits["train"].records[:good]
    bad = write_bad_videos(tmp_path / "bad")
    lines = [f"{r.path} {r.label}" for r in records]
    lines += [f"{path} {i}" for i, path in enumerate(bad.values())]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing, bad


def _bad_config(tmp_path: Path, listing: Path, **data: object):
    return write_config(tmp_path / "bad.yaml", listing_data(listing, tmp_path) | data)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_replaces_and_counts_bad_videos(
    workers: int, tmp_path: Path, appearance_small: SyntheticLayout
) -> None:
    listing, bad = _list_with_bad_videos(tmp_path, appearance_small, good=14)
    cfg = _bad_config(tmp_path, listing, max_bad_fraction=0.5)
    annotations = read_splits(cfg.data)["train"]
    total = len(annotations.records)  # 14 good + 5 bad + 1 over-reporting
    dataset = create_dataset(cfg, annotations, train=True)
    loader = VideoLoader(
        dataset, batch_size=4, num_workers=workers, shuffle=True, max_bad_fraction=0.5
    )
    seen = 0
    for batch in loader.epoch(0):
        assert batch.clips.shape[1:] == (3, 8, 32, 32)
        delivered = {str(annotations.records[i].path) for i in batch.indices.tolist()}
        assert not delivered & {str(bad[name]) for name in BAD_KINDS_WRITTEN}
        seen += len(batch.labels)
    assert seen == total  # the epoch finished; every bad item was replaced
    expected = {}
    for kind in BAD_KINDS_WRITTEN.values():
        expected[kind] = expected.get(kind, 0) + 1
    assert loader.bad.by_kind() == expected
    assert set(loader.bad.videos) == {str(bad[name]) for name in BAD_KINDS_WRITTEN}


def test_loader_stops_above_threshold_listing_files(
    tmp_path: Path, appearance_small: SyntheticLayout
) -> None:
    listing, bad = _list_with_bad_videos(tmp_path, appearance_small, good=14)
    cfg = _bad_config(tmp_path, listing, max_bad_fraction=0.1)
    dataset = create_dataset(cfg, read_splits(cfg.data)["train"], train=False)
    loader = VideoLoader(dataset, batch_size=4, num_workers=0, shuffle=False, max_bad_fraction=0.1)
    with pytest.raises(TooManyBadVideos) as err:
        list(loader.epoch(0))
    message = str(err.value)
    assert message.startswith(f"{listing}: 5 of 20 videos are unusable (25.0% > ")
    for name in BAD_KINDS_WRITTEN:
        assert str(bad[name]) in message
    assert "evl-platform data check" in message


def _slow_video(path: Path) -> None:
    """A 4K video: decoding its frames takes far longer than a small clip's."""
    t = np.linspace(0, 255, 3840, dtype=np.float32)
    frame = np.broadcast_to(t[None, :, None], (2160, 3840, 3)).astype(np.uint8)
    write_video(path, np.stack([np.roll(frame, 40 * i, axis=1) for i in range(12)]), fps=12)


def test_decoding_time_limit(tmp_path: Path, appearance_small: SyntheticLayout) -> None:
    slow = tmp_path / "slow.mp4"
    _slow_video(slow)
    small = next((appearance_small.root).glob("*.mp4"))
    choose = lambda n: [np.arange(min(n, 8))]  # noqa: E731
    start = time.perf_counter()
    read_clip(slow, choose, timeout_s=60)
    slow_s = time.perf_counter() - start
    limit = slow_s / 4
    start = time.perf_counter()
    with pytest.raises(VideoError) as err:
        read_clip(slow, choose, timeout_s=limit)
    assert err.value.kind == "timeout" and time.perf_counter() - start < slow_s
    assert len(read_clip(small, choose, timeout_s=limit)[0]) == 8  # the next video still works


@pytest.mark.parametrize("decoder", ["decord", "pyav", "torchcodec"])
def test_decoders_agree(decoder: str, motion_small: SyntheticLayout) -> None:
    if decoder == "torchcodec":
        pytest.importorskip("torchcodec")
    video = next(motion_small.root.glob("*.mp4"))
    choose = lambda n: [np.array([0, 3, 3, 15]), np.array([1, 2])]  # noqa: E731
    views = read_clip(video, choose, decoder=decoder)
    reference = read_clip(video, choose, decoder="decord")
    assert [v.shape for v in views] == [(4, 96, 128, 3), (2, 96, 128, 3)]
    for a, b in zip(views, reference, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 2


def test_local_profile_generates_stand_in_once(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVL_PLATFORM_CACHE", str(tmp_path / "cache"))
    cfg = write_config(
        tmp_path / "local.yaml",
        {
            "dataset": "synthetic-motion",
            "format": "ssv2_json",
            "synthetic": {"clips_per_class": 1, "val_clips_per_class": 1, "video_frames": 8},
        },
    )
    first = resolve_files(cfg.data)
    assert "generating synthetic-motion stand-in into" in capfd.readouterr().err
    assert first.train_annotations.is_relative_to(tmp_path / "cache")
    second = resolve_files(cfg.data)
    assert "using cached synthetic-motion stand-in at" in capfd.readouterr().err
    assert second == first
    assert len(read_splits(cfg.data)["train"].records) == 10


EXPERIMENTS = sorted(p for p in Path("experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_loads_clips_under_the_local_profile(path: Path) -> None:
    small = ["data.synthetic.clips_per_class=1", "data.synthetic.val_clips_per_class=1"]
    cfg = load_config(path, profile="local", overrides=small)
    splits = read_splits(cfg.data, progress=False)
    assert len(splits["train"].class_names) == cfg.data.num_classes
    train = create_dataset(cfg, splits["train"], train=True)
    val = create_dataset(cfg, splits["val"], train=False)
    size = 64  # tiny-vit
    assert train[0].clip.shape == (3, cfg.data.num_frames, size, size)
    views = cfg.data.test_views.total
    assert val[0].clip.shape == (views, 3, cfg.data.num_frames, size, size)
    assert train[0].bad == () and val[0].bad == ()


@pytest.mark.parametrize("path", ["k400_vitb16_8f", "ssv2_vitb16_8f"])
def test_paper_profile_without_data_is_one_clear_error(
    path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = Path("experiments", f"{path}.yaml").resolve()
    monkeypatch.chdir(tmp_path)
    assert main(["data", "check", str(config), "--profile", "paper"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert f"{config}: data.train_annotations: {config.parent.parent / 'data'}" in err

"""The dataset identity of the feature cache: computed once per dataset, kept in a sidecar,
checked by the listing (annotation files and video folders), never a stat per video."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import listing_data, write_config

from evl_platform.config import ExperimentConfig
from evl_platform.data.source import read_splits, resolve_files
from evl_platform.features.identity import compute_identity, sidecar_dir
from evl_platform.features.key import split_inputs

VIDEOS = 40


@pytest.fixture
def dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ExperimentConfig:
    """A 10-class EVL list of 40 placeholder videos in two folders, and its experiment (with a
    cache directory of its own, where the sidecars go)."""
    monkeypatch.setenv("EVL_PLATFORM_CACHE", str(tmp_path / "cache"))
    lines = []
    for i in range(VIDEOS):
        video = tmp_path / "videos" / f"part{i % 2}" / f"clip{i:03d}.mp4"
        video.parent.mkdir(parents=True, exist_ok=True)
        video.write_bytes(b"x" * i)
        lines.append(f"{video} {i % 10}")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(lines) + "\n")
    cfg = write_config(tmp_path / "exp.yaml", listing_data(listing, tmp_path))
    _settle(tmp_path)
    return cfg


def _settle(tmp_path: Path, *, folders_only: bool = False) -> None:
    """Dates every folder (and file) a minute back: written well before anyone reads them."""
    for path in [tmp_path, *tmp_path.rglob("*")]:
        if folders_only and not path.is_dir():
            continue
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns - 60 * 10**9))


def _identity(cfg: ExperimentConfig, split: str = "train") -> dict:
    files = resolve_files(cfg.data, progress=False)
    return split_inputs(cfg, split, read_splits(cfg.data, files=files)[split], files)["dataset"]


@pytest.fixture
def video_stats(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The video files ``os.stat`` is called on while the test runs."""
    seen: list[str] = []
    real = os.stat

    def stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if str(path).endswith(".mp4"):
            seen.append(str(path))
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", stat)
    yield seen


def test_identity_is_computed_once_then_checked_without_a_stat_per_video(
    dataset: ExperimentConfig, video_stats: list[str]
) -> None:
    first = _identity(dataset)
    assert len(video_stats) == VIDEOS  # the first computation stats every video once
    video_stats.clear()
    for _ in range(3):  # every later trial and worker
        assert _identity(dataset) == first
    assert video_stats == []
    # the stored identity is the one computed from the files, as it always was (a sha256 of
    # one JSON line per video): caches written before the sidecar keep their keys
    files = resolve_files(dataset.data, progress=False)
    train = read_splits(dataset.data)["train"]
    assert compute_identity(train, files) == first
    videos = hashlib.sha256()
    for r in train.records:
        stat = r.path.stat()
        line = [r.video_id, str(r.path), r.label, [stat.st_size, stat.st_mtime_ns]]
        videos.update(json.dumps(line).encode() + b"\n")
    assert first["videos_sha256"] == videos.hexdigest()
    assert len(list(sidecar_dir().glob("*.json"))) == 1


def test_a_changed_listing_recomputes_the_identity(
    dataset: ExperimentConfig, tmp_path: Path
) -> None:
    first = _identity(dataset)
    video = tmp_path / "videos" / "part1" / "clip001.mp4"
    replacement = video.with_name("new.mp4")  # re-encoded and renamed into place
    replacement.write_bytes(b"re-encoded")
    os.replace(replacement, video)
    replaced = _identity(dataset)
    assert replaced["videos_sha256"] != first["videos_sha256"]
    video.unlink()  # missing now
    missing = _identity(dataset)
    assert missing["videos_sha256"] not in (first["videos_sha256"], replaced["videos_sha256"])
    assert _identity(dataset) == missing


def test_changed_annotations_or_class_order_never_meet_an_old_sidecar(
    dataset: ExperimentConfig,
) -> None:
    first = _identity(dataset)
    listing = Path(dataset.data.train_annotations)
    lines = listing.read_text().splitlines()
    lines[0] = lines[0].rsplit(" ", 1)[0] + " 9"  # one label changed
    listing.write_text("\n".join(lines) + "\n")
    relabelled = _identity(dataset)
    assert relabelled["videos_sha256"] != first["videos_sha256"]
    assert relabelled["annotations_sha256"] != first["annotations_sha256"]
    labels = json.loads(Path(dataset.data.label_map).read_text())
    names = sorted(labels, key=labels.get)
    Path(dataset.data.label_map).write_text(json.dumps({n: i for i, n in enumerate(names[::-1])}))
    assert _identity(dataset)["label_map_sha256"] != relabelled["label_map_sha256"]


def test_a_bad_or_unwritable_sidecar_only_costs_the_computation(
    dataset: ExperimentConfig, video_stats: list[str], tmp_path: Path
) -> None:
    first = _identity(dataset)
    (sidecar,) = sidecar_dir().glob("*.json")
    sidecar.write_text("{not json")
    assert _identity(dataset) == first
    assert json.loads(sidecar.read_text())["identity"] == first  # written again
    sidecar_dir().rename(tmp_path / "old-sidecars")
    sidecar_dir().write_text("a file where the sidecar folder should be")
    video_stats.clear()
    assert _identity(dataset) == first
    assert len(video_stats) == VIDEOS


def test_a_dataset_changing_while_its_identity_is_computed_is_not_stored(
    dataset: ExperimentConfig, tmp_path: Path, video_stats: list[str]
) -> None:
    (tmp_path / "videos" / "part0" / "extra.txt").write_text("written just now")
    first = _identity(dataset)
    assert not sidecar_dir().exists() or not list(sidecar_dir().glob("*.json"))
    _settle(tmp_path, folders_only=True)  # the videos are as they were
    video_stats.clear()
    assert _identity(dataset) == first and len(video_stats) == VIDEOS  # computed again, stored
    video_stats.clear()
    assert _identity(dataset) == first and video_stats == []

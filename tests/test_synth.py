"""Synthetic stand-ins: real mp4s, real annotation formats, reversal pairs, determinism, cache."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import decord
import numpy as np
import pytest

from evl_platform.data import synth, synth_render
from evl_platform.data.synth import (
    SYNTHETIC_DATASETS,
    SyntheticLayout,
    SynthParams,
    default_cache_dir,
    ensure_synthetic,
    generate,
    synthetic_dir,
    write_video,
)

PARAMS = SynthParams(clips_per_class=2, val_clips_per_class=1, num_frames=16)
DATASETS = ("synthetic-motion", "synthetic-appearance")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SyntheticLayout]:
    return {
        name: generate(name, tmp_path_factory.mktemp(name), PARAMS, workers=2, progress=False)
        for name in DATASETS
    }


def layout_file(layout: SyntheticLayout, split: str) -> Path:
    return layout.train_annotations if split == "train" else layout.val_annotations


def read_entries(layout: SyntheticLayout, split: str) -> list[dict]:
    """Annotation rows of one split, each with ``class`` (class name) and ``path`` added."""
    path = layout_file(layout, split)
    if layout.format == "ssv2_json":
        rows = json.loads(path.read_text())
        for row in rows:
            row["class"] = row["template"].replace("[", "").replace("]", "")
            row["path"] = str(layout.root / f"{row['id']}{layout.video_extension}")
        return rows
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["class"] = row["label"]
        stem = f"{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}"
        row["path"] = str(layout.root / f"{stem}{layout.video_extension}")
    return rows


def decode(path: str) -> np.ndarray:
    reader = decord.VideoReader(path, num_threads=1)
    return reader.get_batch(list(range(len(reader)))).asnumpy()  # (T, H, W, 3)


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("name", DATASETS)
def test_every_video_decodes_to_the_requested_shape(
    layouts: dict[str, SyntheticLayout], name: str
) -> None:
    layout = layouts[name]
    assert layout.video_extension == ".mp4" and layout.root == layout.directory / "videos"
    entries = read_entries(layout, "train") + read_entries(layout, "validation")
    assert len(entries) == 10 * 3
    assert len(list(layout.root.iterdir())) == len(entries)
    for entry in entries:
        reader = decord.VideoReader(entry["path"], num_threads=1)
        assert len(reader) == PARAMS.num_frames
        frames = reader.get_batch(list(range(PARAMS.num_frames))).asnumpy()
        assert frames.shape == (PARAMS.num_frames, PARAMS.height, PARAMS.width, 3)
        assert np.ptp(frames) > 100  # not a blank video: an object shows


@pytest.mark.parametrize("name", DATASETS)
def test_class_counts_per_split(layouts: dict[str, SyntheticLayout], name: str) -> None:
    layout = layouts[name]
    assert len(layout.class_names) >= 10 and len(set(layout.class_names)) == len(layout.class_names)
    for split, count in (
        ("train", PARAMS.clips_per_class),
        ("validation", PARAMS.val_clips_per_class),
    ):
        counts = Counter(row["class"] for row in read_entries(layout, split))
        assert counts == dict.fromkeys(layout.class_names, count)


def test_motion_annotations_follow_the_ssv2_format(layouts: dict[str, SyntheticLayout]) -> None:
    layout = layouts["synthetic-motion"]
    assert layout.format == "ssv2_json" and layout.label_map is not None
    labels = json.loads(layout.label_map.read_text())
    assert labels == {name: str(i) for i, name in enumerate(layout.class_names)}
    assert "Moving something from left to right" in labels
    train, val = read_entries(layout, "train"), read_entries(layout, "validation")
    ids = [row["id"] for row in train + val]
    assert len(set(ids)) == len(ids) and all(i.isdecimal() for i in ids)
    for row in train + val:
        assert set(row) == {"id", "label", "template", "placeholders", "class", "path"}
        assert row["class"] in labels
        assert len(row["placeholders"]) == row["template"].count("[something]") >= 1
        filled = row["template"]
        for placeholder in row["placeholders"]:
            filled = filled.replace("[something]", placeholder, 1)
        assert row["label"] == filled[0].lower() + filled[1:]


def test_appearance_annotations_follow_the_kinetics_format(
    layouts: dict[str, SyntheticLayout],
) -> None:
    layout = layouts["synthetic-appearance"]
    assert layout.format == "kinetics_csv" and layout.label_map is None
    assert layout.class_names == tuple(sorted(layout.class_names))
    keys = set()
    for split, value in (("train", "train"), ("validation", "validate")):
        header = layout_file(layout, split).read_text().splitlines()[0]
        assert header == "label,youtube_id,time_start,time_end,split"
        for row in read_entries(layout, split):
            assert row["split"] == value and row["label"] in layout.class_names
            assert re.fullmatch(r"[A-Za-z0-9_-]{11}", row["youtube_id"])
            assert int(row["time_end"]) > int(row["time_start"]) >= 0
            keys.add((row["youtube_id"], row["time_start"], row["time_end"]))
    assert len(keys) == 10 * 3


def test_reversal_twins_are_the_same_frames_backwards(layouts: dict[str, SyntheticLayout]) -> None:
    layout = layouts["synthetic-motion"]
    index = {name: i for i, name in enumerate(layout.class_names)}
    for split in ("train", "validation"):
        rows = read_entries(layout, split)
        for first, twin in zip(rows[::2], rows[1::2], strict=True):
            assert index[twin["class"]] == index[first["class"]] + 1
            assert index[first["class"]] % 2 == 0
            assert int(twin["id"]) == int(first["id"]) + 1
            assert twin["placeholders"] == first["placeholders"]
            clip, reversed_twin = decode(first["path"]), decode(twin["path"])[::-1]
            per_frame = np.abs(reversed_twin.astype(float) - clip).mean(axis=(1, 2, 3))
            assert per_frame.max() < 4, (first["id"], per_frame)
    # a moving clip is not its own reversal: left-to-right differs from right-to-left
    first, twin = read_entries(layout, "train")[:2]
    assert first["class"] == "Moving something from left to right"
    clip, twin_frames = decode(first["path"]).astype(float), decode(twin["path"]).astype(float)
    reversed_error = np.abs(twin_frames[0] - clip[-1]).mean()
    assert np.abs(twin_frames[0] - clip[0]).mean() > max(3.0, 3 * reversed_error)


def object_in_view(frames: np.ndarray) -> np.ndarray:
    """(T,) whether each frame shows a saturated object pixel (the motion background is grey)."""
    f = frames.astype(int)
    return ((f.max(axis=-1) - f.min(axis=-1)) > 100).any(axis=(1, 2))


def test_every_other_translation_clip_is_a_fast_crossing(
    layouts: dict[str, SyntheticLayout],
) -> None:
    layout = layouts["synthetic-motion"]
    for name in ("Moving something from left to right", "Moving something up"):
        rows = [row for row in read_entries(layout, "train") if row["class"] == name]
        assert len(rows) == PARAMS.clips_per_class == 2
        slow, fast = (object_in_view(decode(row["path"])) for row in rows)
        assert slow.all(), name  # a slow sweep stays in view
        assert fast.any() and not fast[0] and not fast[-1], (name, fast)  # in, across, out


@pytest.mark.parametrize("name", DATASETS)
def test_generation_is_byte_deterministic(
    layouts: dict[str, SyntheticLayout], name: str, tmp_path: Path
) -> None:
    reference = tree_bytes(layouts[name].directory)
    again = generate(name, tmp_path / "same", PARAMS, workers=1, progress=False)
    assert tree_bytes(again.directory) == reference  # annotations and videos, other worker count
    other = generate(name, tmp_path / "other", replace(PARAMS, seed=1), progress=False)
    changed = tree_bytes(other.directory)
    assert changed[layouts[name].train_annotations.name] != reference[again.train_annotations.name]
    videos = [k for k in reference if k.startswith("videos")]
    if name == "synthetic-motion":  # same ids, different content
        assert all(changed[k] != reference[k] for k in videos)
    else:  # youtube ids depend on the seed
        assert not set(videos) & set(changed)


def test_appearance_classes_differ_in_simple_colour_statistics(
    layouts: dict[str, SyntheticLayout],
) -> None:
    layout = layouts["synthetic-appearance"]

    def features(split: str) -> tuple[np.ndarray, list[str]]:
        rows = read_entries(layout, split)
        pixels = [decode(row["path"]).reshape(-1, 3).astype(float) for row in rows]
        stats = [np.concatenate([p.mean(0), p.std(0)]) for p in pixels]
        return np.array(stats), [row["class"] for row in rows]

    x, y = features("train")
    centroids = np.array([x[[c == name for c in y]].mean(0) for name in layout.class_names])
    mean_colour = centroids[:, :3]
    gaps = [np.linalg.norm(a - b) for a, b in itertools.combinations(mean_colour, 2)]
    assert np.mean(np.array(gaps) > 8) >= 0.8
    x_val, y_val = features("validation")
    nearest = np.argmin(((x_val[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = np.mean([layout.class_names[k] == c for k, c in zip(nearest, y_val, strict=True)])
    # Far above chance (0.1), short of the ceiling: the two classes of a background pattern
    # differ only in their object, a small share of the pixels, and one clip in ten shows the
    # other class's object.
    assert accuracy >= 0.4


def test_ensure_synthetic_generates_once_then_reuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = SynthParams(clips_per_class=1, val_clips_per_class=1, num_frames=8)
    first = ensure_synthetic("synthetic-motion", params, cache_dir=tmp_path, progress=False)
    assert first.directory == synthetic_dir("synthetic-motion", params, tmp_path)
    assert "generating synthetic-motion stand-in into" in capsys.readouterr().err
    mtimes = {p: p.stat().st_mtime_ns for p in first.directory.rglob("*")}
    second = ensure_synthetic("synthetic-motion", params, cache_dir=tmp_path, progress=False)
    assert second == first
    assert capsys.readouterr().err.strip() == (
        f"using cached synthetic-motion stand-in at {first.directory}"
    )
    assert {p: p.stat().st_mtime_ns for p in first.directory.rglob("*")} == mtimes
    assert sorted(p.name for p in (tmp_path / "synthetic").iterdir()) == [first.directory.name]
    mode = (tmp_path / "synthetic").stat().st_mode & 0o777
    assert first.directory.stat().st_mode & 0o777 == mode  # not mkdtemp's 0700
    other = synthetic_dir("synthetic-motion", SynthParams(seed=1), tmp_path)
    assert other != first.directory
    assert synthetic_dir("synthetic-appearance", params, tmp_path) != first.directory


def test_ensure_synthetic_loses_a_race_gracefully(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    params = SynthParams(clips_per_class=1, val_clips_per_class=1, num_frames=4)
    winner = ensure_synthetic("synthetic-appearance", params, cache_dir=tmp_path, progress=False)
    before = tree_bytes(winner.directory)
    calls = []

    def is_complete(directory: Path) -> bool:  # the first check misses: another process wins
        calls.append(directory)
        return len(calls) > 1 and real(directory)

    real = synth._is_complete
    monkeypatch.setattr(synth, "_is_complete", is_complete)
    loser = ensure_synthetic("synthetic-appearance", params, cache_dir=tmp_path, progress=False)
    assert loser == winner and tree_bytes(loser.directory) == before
    assert "finished" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "synthetic").iterdir()] == [winner.directory.name]


def test_failed_generation_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(synth, "generate", broken)
    with pytest.raises(OSError, match="disk full"):
        ensure_synthetic("synthetic-motion", PARAMS, cache_dir=tmp_path, progress=False)
    assert list((tmp_path / "synthetic").iterdir()) == []


def test_concurrent_processes_share_one_complete_dataset(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from evl_platform.data.synth import SynthParams, ensure_synthetic\n"
        "params = SynthParams(clips_per_class=1, val_clips_per_class=1, num_frames=4)\n"
        "layout = ensure_synthetic('synthetic-motion', params, cache_dir=sys.argv[1],"
        " workers=1, progress=False)\n"
        "print(layout.directory)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert len(set(outputs)) == 1
    directory = Path(outputs[0])
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]  # no leftovers
    assert (directory / synth.MANIFEST).is_file() and len(list(directory.glob("videos/*"))) == 20


def test_default_cache_dir_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVL_PLATFORM_CACHE", str(tmp_path / "evl"))
    assert default_cache_dir() == tmp_path / "evl"
    assert synthetic_dir("synthetic-motion", PARAMS).parent == tmp_path / "evl" / "synthetic"
    monkeypatch.delenv("EVL_PLATFORM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "evl-platform"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "evl-platform"


def test_unknown_dataset_lists_the_registered_ones(tmp_path: Path) -> None:
    assert list(SYNTHETIC_DATASETS) == sorted(DATASETS)
    with pytest.raises(KeyError, match="synthetic-appearance, synthetic-motion"):
        generate("synthetic-nothing", tmp_path, PARAMS, progress=False)
    with pytest.raises(KeyError, match="synthetic-nothing"):
        ensure_synthetic("synthetic-nothing", PARAMS, cache_dir=tmp_path)


def test_params_reject_odd_sizes() -> None:
    with pytest.raises(ValueError, match="even"):
        SynthParams(width=127)
    with pytest.raises(ValueError):
        SynthParams(num_frames=1)


@pytest.mark.parametrize("faststart", [False, True])
def test_write_video_roundtrip(tmp_path: Path, faststart: bool) -> None:
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 256, (1, 8, 6, 3), dtype=np.uint8), 16, axis=1)
    frames = np.repeat(np.repeat(frames, 5, axis=0), 16, axis=2)  # (5, 128, 96, 3) blocky
    path = tmp_path / "clip.mp4"
    write_video(path, frames, fps=10, faststart=faststart)
    data = path.read_bytes()
    assert (data.index(b"moov") < data.index(b"mdat")) == faststart
    decoded = decode(str(path))
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(float) - frames).mean() < 4
    with pytest.raises(ValueError, match="even"):
        write_video(path, frames[:, :7], fps=10)


def test_encoding_the_same_frames_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    """Two-object motion clips at 64 px made x264's mb-tree rate control differ run to run."""
    for seed in range(20):
        frames, _ = synth_render.motion_clip("two_objects", np.random.default_rng(seed), 32, 64, 64)
        write_video(tmp_path / "a.mp4", frames, fps=8)
        write_video(tmp_path / "b.mp4", frames, fps=8)
        assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes(), seed


def _keyframes(path: Path) -> list[int]:
    """Indices of the keyframes of a video's stream, in decoding order."""
    import av

    with av.open(str(path)) as container:
        packets = [p for p in container.demux(video=0) if p.size]
        return [i for i, p in enumerate(packets) if p.is_keyframe]


def test_vp9_webm_is_written_at_the_keyframe_interval_and_read_back_by_both_decoders(
    tmp_path: Path,
) -> None:
    """SSv2-like stand-ins: VP9 in webm, decodable by decord and PyAV, same bytes twice."""
    import av

    frames, _ = synth_render.motion_clip("horizontal", np.random.default_rng(0), 24, 240, 426)
    path = tmp_path / "clip.webm"
    write_video(path, frames, fps=12, codec="vp9", keyframe_interval=8)
    with av.open(str(path)) as container:
        assert container.format.name.startswith("matroska,webm")
        assert container.streams.video[0].codec_context.name == "vp9"
        by_pyav = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    by_decord = decode(str(path))
    assert by_decord.shape == by_pyav.shape == frames.shape
    assert np.abs(by_decord.astype(float) - frames).mean() < 6
    assert _keyframes(path) == [0, 8, 16]
    write_video(tmp_path / "again.webm", frames, fps=12, codec="vp9", keyframe_interval=8)
    assert (tmp_path / "again.webm").read_bytes() == path.read_bytes()


def test_h264_keyframe_interval_is_the_one_asked_for(tmp_path: Path) -> None:
    frames = synth_render.appearance_clip(0, np.random.default_rng(0), 30, 64, 96)
    write_video(tmp_path / "a.mp4", frames, fps=25, keyframe_interval=12)
    assert _keyframes(tmp_path / "a.mp4")[:3] == [0, 12, 24]
    with pytest.raises(ValueError, match="codec"):
        SynthParams(codec="av1")


def test_a_webm_stand_in_is_generated_annotated_and_read_with_its_extension(
    tmp_path: Path,
) -> None:
    params = SynthParams(
        clips_per_class=1, val_clips_per_class=1, num_frames=8, codec="vp9", keyframe_interval=4
    )
    layout = ensure_synthetic("synthetic-motion", params, cache_dir=tmp_path, progress=False)
    assert layout.video_extension == ".webm"
    videos = sorted(layout.root.iterdir())
    assert len(videos) == 20 and all(v.suffix == ".webm" for v in videos)
    rows = read_entries(layout, "train")
    assert all(Path(r["path"]).exists() for r in rows)
    assert ensure_synthetic("synthetic-motion", params, cache_dir=tmp_path).directory == (
        layout.directory
    )


def test_the_codec_and_keyframe_interval_name_their_own_cache_but_the_defaults_keep_the_old_one(
    tmp_path: Path,
) -> None:
    """Stand-ins cached before the codec fields existed stay valid: the key of the default
    parameters is the one generator version 7 always computed."""
    import hashlib
    import json

    params = SynthParams()
    before = {k: v for k, v in asdict(params).items() if k not in ("codec", "keyframe_interval")}
    blob = json.dumps(["synthetic-motion", before, synth.GENERATOR_VERSION], sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    assert synthetic_dir("synthetic-motion", params, tmp_path).name == f"synthetic-motion-{key}"
    keys = {
        synthetic_dir("synthetic-motion", p, tmp_path)
        for p in (params, replace(params, codec="vp9"), replace(params, keyframe_interval=12))
    }
    assert len(keys) == 3

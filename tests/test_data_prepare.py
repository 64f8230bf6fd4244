"""``evl-platform data prepare`` on real files: bad inputs, resume, the three annotation
formats (VP9 webm input included), keyframes, and one training step on the prepared copy."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import BAD_KINDS_WRITTEN, layout_data, write_bad_videos, write_config

from evl_platform.cli import main
from evl_platform.config import load_config
from evl_platform.data.annotations import save_label_map
from evl_platform.data.check import check_data
from evl_platform.data.prepare import encode_settings, prepare_dataset
from evl_platform.data.prepare_encode import (
    TMP_MARKER,
    EncodeSettings,
    encode_video,
    output_size,
)
from evl_platform.data.source import read_splits
from evl_platform.data.synth import SyntheticLayout

pytestmark = pytest.mark.usefixtures("ray_local")

FIXED_VIEWS = {"random_resized_crop": None, "rand_augment": None, "horizontal_flip": False}


def _keyframes(path: Path) -> tuple[int, list[int], tuple[int, int]]:
    """(frames, indices of the keyframes in display order, (width, height)) of a video."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = sorted((p for p in container.demux(stream) if p.size), key=lambda p: p.pts)
        size = (stream.codec_context.width, stream.codec_context.height)
        return len(packets), [i for i, p in enumerate(packets) if p.is_keyframe], size


@pytest.fixture
def listed_experiment(tmp_path: Path, appearance_small: SyntheticLayout) -> Path:
    """An evl_list experiment: 12 good stand-in clips (relative paths) and every bad kind."""
    root = tmp_path / "input"
    (root / "clips").mkdir(parents=True)
    for path in sorted(appearance_small.root.glob("*.mp4"))[:12]:
        (root / "clips" / path.name).symlink_to(path)
    bad = write_bad_videos(root / "bad")
    good = sorted((root / "clips").glob("*.mp4"))
    lines = [f"clips/{path.name} {i % 10}" for i, path in enumerate(good)]
    lines += [f"bad/{path.name} 0" for path in bad.values()]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    save_label_map([f"class {i}" for i in range(10)], tmp_path / "labels.json")
    data = {
        "dataset": "listed",
        "format": "evl_list",
        "root": str(root),
        "train_annotations": "list.txt",
        "val_annotations": "list.txt",
        "label_map": "labels.json",
        "sampling": "dense",
        "stride": 2,
        "max_bad_fraction": 0.5,
    }
    write_config(tmp_path / "listed.yaml", data)
    return tmp_path / "listed.yaml"


def _prepare(config: Path, out: Path, *extra: str) -> int:
    return main(["data", "prepare", str(config), "--out", str(out), *extra])


def _set_lines(printed: str) -> list[str]:
    """The ``--set`` arguments the command printed."""
    [line] = [line for line in printed.splitlines() if line.strip().startswith("--set ")]
    return shlex.split(line)


def test_bad_inputs_are_listed_and_left_out(
    listed_experiment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "prepared"
    assert _prepare(listed_experiment, out, "--short-side", "48", "--keyframe-interval", "4") == 0
    printed = capsys.readouterr().out
    assert "written 13, already prepared 0, bad 5" in printed  # 12 good + over-reporting
    with open(out / "prepare_problems.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    listed = {(r["split"], Path(r["path"]).stem, r["status"]) for r in rows}
    kinds = BAD_KINDS_WRITTEN.items()
    assert listed == {(split, name, kind) for split in ("train", "val") for name, kind in kinds}
    assert all(r["detail"] for r in rows)

    overrides = _set_lines(printed)
    prepared = load_config(listed_experiment, overrides=overrides[1::2])
    splits = read_splits(prepared.data)
    expected = [f"clips/{p.stem}" for p in sorted((tmp_path / "input/clips").glob("*.mp4"))]
    assert [r.video_id for r in splits["train"].records] == [*expected, "bad/over_reporting"]
    assert [r.label for r in splits["val"].records] == [*(i % 10 for i in range(12)), 0]
    # the prepared copy has no problem the input did not have, not even its header warning
    report = check_data(prepared, workers=1, progress=False)
    assert not report.problems()
    assert report.summary()["resolutions"] == {"64x48": 26}

    frames, keyframes, size = _keyframes(out / "clips" / f"{Path(expected[0]).name}.mp4")
    assert (frames, keyframes, size) == (16, [0, 4, 8, 12], (64, 48))


def test_rerun_redoes_only_missing_files(
    listed_experiment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "prepared"
    assert _prepare(listed_experiment, out) == 0
    videos = sorted(out.rglob("*.mp4"))
    assert len(videos) == 13
    for gone in videos[:3]:
        gone.unlink()
    left = {path: path.stat().st_mtime_ns for path in videos[3:]}
    (out / "clips" / f".x.mp4{TMP_MARKER}0123abcd").write_bytes(b"half a video")  # a killed run's
    capsys.readouterr()

    assert _prepare(listed_experiment, out) == 0
    assert "written 3, already prepared 10, bad 5" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in videos[3:]} == left
    assert all(path.exists() for path in videos[:3])
    assert not [p for p in out.rglob("*") if TMP_MARKER in p.name]

    # other encoding settings into the same directory would mix two encodings: refused
    assert _prepare(listed_experiment, out, "--short-side", "32") == 2
    assert "use another --out" in capsys.readouterr().err


def _webm_copy(layout: SyntheticLayout, directory: Path) -> dict:
    """The motion stand-in re-encoded as VP9 webm (SSv2's container), as a ``data`` section."""
    directory.mkdir()
    for path in layout.root.glob(f"*{layout.video_extension}"):
        with av.open(str(path)) as src, av.open(str(directory / f"{path.stem}.webm"), "w") as dst:
            context = src.streams.video[0].codec_context
            stream = dst.add_stream("libvpx-vp9", rate=12)
            stream.width, stream.height, stream.pix_fmt = context.width, context.height, "yuv420p"
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
            for frame in src.decode(video=0):
                frame.pts = None
                dst.mux(stream.encode(frame))
            dst.mux(stream.encode())
    return layout_data(layout, root=str(directory), video_extension=".webm")


@pytest.mark.parametrize("dataset", ["synthetic-appearance", "synthetic-motion"])
def test_annotations_read_back_with_the_same_ids_and_labels(
    dataset: str,
    tmp_path: Path,
    appearance_small: SyntheticLayout,
    motion_small: SyntheticLayout,
) -> None:
    if dataset == "synthetic-motion":  # SSv2 JSON over VP9 webm files
        data = _webm_copy(motion_small, tmp_path / "webm")
    else:  # Kinetics CSV
        data = layout_data(appearance_small)
    cfg = write_config(tmp_path / "exp.yaml", data)
    report = prepare_dataset(cfg, tmp_path / "prepared", encode_settings(cfg), progress=False)
    assert report.written == report.videos and not report.problems

    before = read_splits(cfg.data)
    after = read_splits(load_config(tmp_path / "exp.yaml", overrides=report.overrides()).data)
    for split in ("train", "val"):
        assert [(r.video_id, r.label) for r in after[split].records] == [
            (r.video_id, r.label) for r in before[split].records
        ]
        assert after[split].class_names == before[split].class_names
        assert all(r.path.parent == tmp_path / "prepared" for r in after[split].records)
    if dataset == "synthetic-motion":  # every field of the SSv2 entries is kept
        entries = json.loads(report.annotations["train"].read_text())
        assert entries == json.loads(motion_small.train_annotations.read_text())
    path = after["train"].records[0].path
    assert path.suffix == ".mp4" and _keyframes(path)[1] == [0]  # uniform: every 16 frames


def test_keyframes_fall_every_interval_whatever_the_input_keyframes(tmp_path: Path) -> None:
    source = tmp_path / "gop5.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(source), mode="w") as container:  # input keyframes at 0, 5, 10, 15
        stream = container.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"x264-params": "keyint=5:min-keyint=5:scenecut=0"}
        for pixels in rng.integers(0, 256, (16, 48, 64, 3), dtype=np.uint8):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    assert _keyframes(source)[1] == [0, 5, 10, 15]
    settings = EncodeSettings(short_side=32, keyframe_interval=4)
    result = encode_video(str(source), str(tmp_path / "out.mp4"), settings)
    assert (result.status, result.frames, result.width, result.height) == ("ok", 16, 42, 32)
    assert _keyframes(tmp_path / "out.mp4") == (16, [0, 4, 8, 12], (42, 32))


def test_output_size_keeps_the_aspect_never_upscales_and_stays_even() -> None:
    assert output_size(1280, 720, 256) == (456, 256)
    assert output_size(720, 1280, 256) == (256, 456)
    assert output_size(320, 240, 256) == (320, 240)
    assert output_size(171, 129, 256) == (170, 128)


def test_prepared_dataset_trains_one_step(
    tmp_path: Path, motion_small: SyntheticLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    schedule = {"num_steps": 1, "batch_size": 2, "eval_every": 1, "checkpoint_every": 1}
    write_config(
        tmp_path / "exp.yaml",
        layout_data(motion_small, augment=FIXED_VIEWS),
        name="prepared",
        train={**schedule, "amp": "none", "log_every": 1},
    )
    assert _prepare(tmp_path / "exp.yaml", tmp_path / "prepared") == 0
    overrides = _set_lines(capsys.readouterr().out)
    assert f"data.root={tmp_path / 'prepared'}" in overrides
    code = main(
        [
            "train",
            str(tmp_path / "exp.yaml"),
            *overrides,
            "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db",
            "--storage-path",
            str(tmp_path / "storage"),
        ]
    )
    assert code == 0
    assert "finished prepared" in capsys.readouterr().out

"""``evl-platform data check`` and ``bench data`` on real files, through the command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import BAD_KINDS_WRITTEN, write_bad_videos, write_config

from evl_platform.cli import main
from evl_platform.data.annotations import save_label_map
from evl_platform.data.check import check_data
from evl_platform.data.dataset import VideoLoader
from evl_platform.data.source import create_dataset, read_splits
from evl_platform.data.synth import SyntheticLayout


@pytest.fixture
def broken_experiment(tmp_path: Path, appearance_small: SyntheticLayout) -> Path:
    """An experiment whose list has 15 good stand-in videos and one of every bad kind."""
    bad = write_bad_videos(tmp_path / "bad")
    good = sorted(appearance_small.root.glob("*.mp4"))[:15]
    lines = [f"{path} {i % 10}" for i, path in enumerate(good)]
    lines += [f"{path} 0" for path in bad.values()]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    save_label_map([f"class {i}" for i in range(10)], tmp_path / "labels.json")
    write_config(
        tmp_path / "broken.yaml",
        {
            "dataset": "broken-test",
            "format": "evl_list",
            "train_annotations": "list.txt",
            "val_annotations": "list.txt",
            "label_map": "labels.json",
            "sampling": "uniform",
            "max_bad_fraction": 0.25,
        },
    )
    return tmp_path / "broken.yaml"


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_data_check_counts_each_bad_kind(
    broken_experiment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "problems.csv"
    code = main(["data", "check", str(broken_experiment), "--workers", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed  # 5 of 21 = 23.8% <= 25%
    assert "problems 5 (23.81%, ok)" in printed
    assert "frame_count_mismatch 1" in printed
    assert "result      passed" in printed
    rows = _csv_rows(out)
    by_name = {Path(r["path"]).stem: r["status"] for r in rows if r["split"] == "train"}
    assert by_name == {**BAD_KINDS_WRITTEN, "over_reporting": "frame_count_mismatch"}
    assert {r["split"] for r in rows} == {"train", "val"}

    strict = ["--set", "data.max_bad_fraction=0.2"]
    code = main(["data", "check", str(broken_experiment), "--json", "--out", str(out), *strict])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1 and summary["failed"]
    train = summary["splits"]["train"]
    assert (train["missing"], train["empty"], train["unreadable"], train["too_short"]) == (
        1,
        1,
        2,
        1,
    )
    assert train["videos"] == 21 and train["problems"] == 5
    assert summary["resolutions"] == {"128x96": 30, "64x48": 2}  # good + over-reporting
    assert summary["frames"]["min"] == 16 and summary["frames"]["max"] == 16


def test_data_check_and_loader_agree(broken_experiment: Path) -> None:
    from evl_platform.config import load_config

    cfg = load_config(broken_experiment)
    report = check_data(cfg, workers=1, progress=False)
    dataset = create_dataset(cfg, read_splits(cfg.data)["train"], train=True)
    loader = VideoLoader(dataset, batch_size=8, num_workers=0, shuffle=False, max_bad_fraction=1)
    assert sum(len(b.labels) for b in loader.epoch(0)) == 21
    split = report.splits["train"]
    assert {k: split[k] for k in loader.bad.by_kind()} == loader.bad.by_kind()
    assert loader.bad.count == split["problems"]


def test_data_check_quick_reads_headers_only(
    broken_experiment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "quick.csv"
    code = main(["data", "check", str(broken_experiment), "--quick", "--json", "--out", str(out)])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["mode"] == "header"
    statuses = {Path(r["path"]).stem: r["status"] for r in _csv_rows(out) if r["split"] == "val"}
    # the header of the over-reporting file claims 32 frames: only a full decode finds out
    assert statuses == BAD_KINDS_WRITTEN


def test_data_check_time_limit(
    broken_experiment: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(broken_experiment.parent)
    code = main(
        ["data", "check", str(broken_experiment), "--json", "--set", "data.decode_timeout_s=1e-4"]
    )
    summary = json.loads(capsys.readouterr().out)
    assert code == 1 and summary["splits"]["train"]["timeout"] >= 15
    rows = _csv_rows(broken_experiment.parent / "data_check_broken.csv")  # the default path
    timeouts = sum(split["timeout"] for split in summary["splits"].values())
    assert sum(r["status"] == "timeout" for r in rows) == timeouts


def test_data_check_bad_annotations_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.txt").write_text("a.mp4 0\nb.mp4 one\n")
    write_config(
        tmp_path / "exp.yaml",
        {
            "dataset": "mine",
            "format": "evl_list",
            "train_annotations": "list.txt",
            "val_annotations": "list.txt",
        },
    )
    assert main(["data", "check", str(tmp_path / "exp.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'list.txt'}:2") and "\n" not in err


def test_missing_annotations_for_real_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "exp.yaml", {"dataset": "kinetics400", "format": "kinetics_csv"})
    assert main(["data", "check", str(tmp_path / "exp.yaml")]) == 2
    assert "data.train_annotations is not set" in capsys.readouterr().err


def test_bench_data_prints_both_rates(
    broken_experiment: Path, capsys: pytest.CaptureFixture[str], appearance_small: SyntheticLayout
) -> None:
    config = broken_experiment.parent / "bench.yaml"
    write_config(
        config,
        {
            "dataset": "synthetic-appearance",
            "format": "kinetics_csv",
            "root": str(appearance_small.root),
            "train_annotations": str(appearance_small.train_annotations),
            "val_annotations": str(appearance_small.val_annotations),
            "sampling": "dense",
            "stride": 2,
        },
    )
    code = main(["bench", "data", str(config), "--clips", "24", "--workers", "1", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["clips"] == 24 and result["clip_shape"] == [3, 8, 32, 32]
    assert result["raw_clips_per_s"] > 0 and result["loader_clips_per_s"] > 0
    assert result["ratio"] == pytest.approx(
        result["loader_clips_per_s"] / result["raw_clips_per_s"]
    )
    assert result["decode_ms"] > 0 and result["transform_ms"] > 0


def test_data_synth_fills_the_cache_the_local_profile_reads(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVL_PLATFORM_CACHE", str(tmp_path / "cache"))
    sizes = ["--clips-per-class", "1", "--val-clips-per-class", "1"]
    assert main(["data", "synth", "--dataset", "synthetic-motion", *sizes, "--workers", "1"]) == 0
    directory = Path(capfd.readouterr().out.split("synthetic-motion: ")[1].strip())
    assert directory.parent == tmp_path / "cache" / "synthetic"
    cfg = write_config(
        tmp_path / "local.yaml",
        {
            "dataset": "synthetic-motion",
            "format": "ssv2_json",
            "synthetic": {"clips_per_class": 1, "val_clips_per_class": 1},
        },
    )
    splits = read_splits(cfg.data)
    assert f"using cached synthetic-motion stand-in at {directory}" in capfd.readouterr().err
    assert len(splits["train"].records) == len(splits["val"].records) == 10

    out = tmp_path / "out"
    assert main(["data", "synth", "--out", str(out), *sizes, "--seed", "4", "--workers", "1"]) == 0
    assert len(list((out / "synthetic-appearance" / "videos").glob("*.mp4"))) == 20
    assert (
        (out / "synthetic-appearance" / "train.csv")
        .read_text()
        .startswith("label,youtube_id,time_start,time_end,split")
    )
    assert len(json.loads((out / "synthetic-motion" / "labels.json").read_text())) == 10

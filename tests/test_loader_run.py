"""The loader over a whole run: several ranks, several epochs, persistent workers, decode size."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import layout_data, listing_data, write_bad_videos, write_config

from evl_platform.cli import main
from evl_platform.data.dataset import TooManyBadVideos, VideoLoader, decode_short_side
from evl_platform.data.decode import DECODER_MODULES, read_clip
from evl_platform.data.errors import DataSourceError
from evl_platform.data.source import create_dataset, read_splits
from evl_platform.data.synth import SyntheticLayout, write_video
from evl_platform.data.transforms import resize_short_side
from evl_platform.train.inputs import VideoSource, loader_workers


def _good_paths(tmp_path: Path, layout: SyntheticLayout) -> list[str]:
    cfg = write_config(tmp_path / "src.yaml", layout_data(layout, sampling="dense"))
    return [str(r.path) for r in read_splits(cfg.data)["train"].records]


def _listing(tmp_path: Path, paths: list[str]) -> Path:
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p} {i % 10}\n" for i, p in enumerate(paths)))
    return listing


def test_bad_fraction_is_checked_over_all_ranks(
    tmp_path: Path, appearance_small: SyntheticLayout
) -> None:
    """5 of 20 videos are bad (25 % > 20 %), spread over 2 ranks (3 + 2): the rank holding 3 of
    its 10 must stop; counting against the whole split, neither rank ever would."""
    good = iter(_good_paths(tmp_path, appearance_small))
    bad = iter(write_bad_videos(tmp_path / "bad").values())
    paths = [str(next(bad)) if i in (0, 4, 8, 11, 15) else next(good) for i in range(20)]
    listing = _listing(tmp_path, paths)
    cfg = write_config(
        tmp_path / "e.yaml", listing_data(listing, tmp_path) | {"max_bad_fraction": 0.2}
    )
    splits = read_splits(cfg.data)
    ranks = [
        VideoSource(cfg, splits, rank=rank, world=2, batch=2, device=torch.device("cpu"))
        for rank in (0, 1)
    ]
    with pytest.raises(TooManyBadVideos) as err:
        list(ranks[0].val_batches())
    assert f"{listing}: 3 of 10 videos this worker reads (of 20) are unusable" in str(err.value)
    assert sum(len(b.labels) for b in ranks[1].val_batches()) == 10  # 2 of 10: within 20 %


def _worker_pids() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


def test_known_bad_videos_and_workers_last_the_run(
    tmp_path: Path, appearance_small: SyntheticLayout
) -> None:
    """A video found bad in epoch 0 is skipped unopened later, even once the file is fixed,
    and every epoch is served by the same worker processes."""
    good = _good_paths(tmp_path, appearance_small)[:8]
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video\n" * 10)
    listing = _listing(tmp_path, [*good[:4], str(broken), *good[4:]])
    cfg = write_config(tmp_path / "e.yaml", listing_data(listing, tmp_path))
    dataset = create_dataset(cfg, read_splits(cfg.data)["train"], train=True)
    loader = VideoLoader(dataset, batch_size=3, num_workers=2, shuffle=True, max_bad_fraction=0.5)
    delivered, pids = [], []
    for epoch in range(3):
        indices = []
        for batch in loader.epoch(epoch):
            indices += batch.indices.tolist()
            pids.append(_worker_pids())
        delivered.append(sorted(indices))
        shutil.copy(good[0], broken)  # fixed after epoch 0: still skipped for this run
    assert 4 not in delivered[0] and 4 not in delivered[1] and 4 not in delivered[2]
    assert loader.bad.count == 1
    assert len(pids[0]) == 2 and all(p == pids[0] for p in pids)


def test_persistent_workers_keep_per_epoch_draws_reproducible(
    tmp_path: Path, appearance_small: SyntheticLayout
) -> None:
    """Epoch 1 from a loader that already ran epoch 0 is the epoch 1 a resumed run starts
    with (a fresh loader), and differs from epoch 0."""
    cfg = write_config(tmp_path / "e.yaml", layout_data(appearance_small, sampling="dense"))
    annotations = read_splits(cfg.data)["train"]

    def run(epochs: list[int]) -> list[tuple[list[int], torch.Tensor]]:
        dataset = create_dataset(cfg, annotations, train=True)
        dataset.records = dataset.records[:12]
        loader = VideoLoader(dataset, batch_size=4, num_workers=2, shuffle=True)
        out = []
        for epoch in epochs:
            batches = list(loader.epoch(epoch))
            out.append(
                (
                    sum((b.indices.tolist() for b in batches), []),
                    torch.cat([b.clips for b in batches]),
                )
            )
        return out

    (order0, clips0), (order1, clips1) = run([0, 1])
    [(resumed_order, resumed_clips)] = run([1])
    assert order1 == resumed_order and torch.equal(clips1, resumed_clips)
    assert order0 != order1 and sorted(order0) == sorted(order1) == list(range(12))


@pytest.mark.usefixtures("ray_local")
def test_loader_workers_default_to_reserved_cpus_minus_one(
    tmp_path: Path, appearance_small: SyntheticLayout
) -> None:
    import ray

    unset = layout_data(appearance_small, sampling="dense", num_workers=None)
    cfg = write_config(tmp_path / "e.yaml", unset)
    explicit = write_config(tmp_path / "x.yaml", unset | {"num_workers": 3})

    @ray.remote(num_cpus=2)
    def workers(dump: dict) -> int:
        from evl_platform.config import ExperimentConfig

        cfg = ExperimentConfig.model_validate(dump)
        source = VideoSource(
            cfg, read_splits(cfg.data), rank=0, world=1, batch=2, device=torch.device("cpu")
        )
        return source.train_loader.num_workers

    assert ray.get(workers.remote(cfg.model_dump(mode="json"))) == 1  # 2 reserved, 1 trains
    assert ray.get(workers.remote(explicit.model_dump(mode="json"))) == 3
    assert loader_workers(None) == max(1, len(__import__("os").sched_getaffinity(0)) - 1)


def test_decode_short_side_follows_the_transforms(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "e.yaml", {"dataset": "synthetic-motion"})
    data = cfg.data
    assert decode_short_side(data, image_size=224, train=False) == 224
    assert decode_short_side(data, image_size=224, train=True) == 256  # random resized crop
    assert decode_short_side(data, image_size=336, train=True) == 384
    no_crop = data.model_copy(
        update={"augment": data.augment.model_copy(update={"random_resized_crop": None})}
    )
    assert decode_short_side(no_crop, image_size=224, train=True) == 224


@pytest.mark.parametrize("decoder", ["decord", "pyav", "torchcodec"])
def test_decoders_scale_to_the_short_side(decoder: str, tmp_path: Path) -> None:
    """A 192x144 video decoded for short side 48 comes out 64x48, close to decoding it whole
    and resizing afterwards; a short side above the video's keeps the native size."""
    if decoder == "torchcodec":
        pytest.importorskip("torchcodec")
    yy, xx = np.mgrid[0:144, 0:192]
    frames = np.stack(
        [np.stack([(xx + 4 * t) % 256, (yy * 2) % 256, (xx + yy) % 256], -1) for t in range(8)]
    ).astype(np.uint8)
    video = tmp_path / "v.mp4"
    write_video(video, frames, fps=12)
    choose = lambda n: [np.array([6, 1, 3])]  # noqa: E731
    [small] = read_clip(video, choose, decoder=decoder, short_side=48)
    [full] = read_clip(video, choose, decoder=decoder)
    assert small.shape == (3, 48, 64, 3) and full.shape == (3, 144, 192, 3)
    resized = resize_short_side(torch.from_numpy(full).permute(0, 3, 1, 2), 48)
    diff = (resized.permute(0, 2, 3, 1).float() - torch.from_numpy(small).float()).abs().mean()
    assert diff < 12
    [native] = read_clip(video, choose, decoder=decoder, short_side=200)
    assert np.array_equal(native, full)


def test_a_decoder_that_cannot_be_imported_is_one_clear_error(
    tmp_path: Path, appearance_small: SyntheticLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(DECODER_MODULES, "torchcodec", "evl_platform_no_such_module")
    cfg = write_config(
        tmp_path / "e.yaml", layout_data(appearance_small, sampling="dense", decoder="torchcodec")
    )
    with pytest.raises(DataSourceError, match=r"^data.decoder: torchcodec cannot be used here"):
        create_dataset(cfg, read_splits(cfg.data)["train"], train=True)


def test_bench_data_compares_every_installed_decoder(
    tmp_path: Path, appearance_small: SyntheticLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bench.yaml"
    write_config(config, layout_data(appearance_small, sampling="dense", stride=2))
    args = ["bench", "data", str(config), "--clips", "8", "--workers", "1"]
    assert main([*args, "--decoder", "all", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    usable = {"decord", "pyav"} | (
        {"torchcodec"} if "torchcodec" not in table["unusable"] else set()
    )
    assert {r["decoder"] for r in table["results"]} == usable
    for result in table["results"]:
        assert result["decode_short_side"] == 38  # 32 px crops from random resized crop
        assert result["clips_per_s_per_core"] == pytest.approx(result["loader_clips_per_s"])
    assert main([*args, "--decoder", "pyav", "--native-size"]) == 0
    printed = capsys.readouterr().out
    assert "pyav at native size" in printed and "per core" in printed


def test_training_batches_are_the_same_wherever_augmentation_runs(
    tmp_path: Path, appearance_small: SyntheticLayout
) -> None:
    """The paper's augmentation (random resized crop, RandAugment m7-n4, flip) applied by the
    loader workers or on the training device: the training source yields the same pixels,
    batch for batch."""
    augment = {"random_resized_crop": [0.08, 1.0], "rand_augment": "m7-n4"}
    augment |= {"horizontal_flip": True}
    batches = {}
    for on in ("loader", "device"):
        data = layout_data(appearance_small, sampling="dense", augment=augment | {"on": on})
        cfg = write_config(tmp_path / f"{on}.yaml", data | {"num_workers": 1})
        source = VideoSource(
            cfg, read_splits(cfg.data), rank=0, world=1, batch=4, device=torch.device("cpu")
        )
        assert source.train_set.transform.on_device == (on == "device")
        batches[on] = [b.inputs for b in itertools.islice(source.train_batches(1, 0), 3)]
    for loader_side, device_side in zip(batches["loader"], batches["device"], strict=True):
        assert loader_side.shape == (4, 3, 8, 32, 32) and torch.equal(loader_side, device_side)

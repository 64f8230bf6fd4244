"""The frozen-feature cache on real parts: Ray extraction, keys, atomic entries, bad videos."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, listing_data, write_bad_videos, write_config

from evl_platform.config import ExperimentConfig, load_config
from evl_platform.data.dataset import TooManyBadVideos, VideoDataset
from evl_platform.data.source import read_splits, resolve_files
from evl_platform.data.synth import SyntheticLayout
from evl_platform.features import (
    FORMAT_VERSION,
    FeatureDataset,
    FeatureStats,
    FeatureStore,
    MissingFeatures,
    extraction_identity,
    prepare_features,
    split_entries,
    view_data,
)
from evl_platform.models import BlockFeatures, adjacent_attention, create_model

NO_AUGMENT = {"random_resized_crop": None, "rand_augment": None, "horizontal_flip": False}
VIEWS = 2  # cached views per video in both splits
FP16 = {"rtol": 2e-3, "atol": 2e-2}  # float16 storage of values of magnitude ~10


def _layout_data(layout: SyntheticLayout, root: Path | None = None) -> dict:
    base = root or layout.directory
    return {
        "dataset": layout.dataset,
        "format": layout.format,
        "root": str(base / "videos"),
        "train_annotations": str(base / layout.train_annotations.name),
        "val_annotations": str(base / layout.val_annotations.name),
        "label_map": str(base / layout.label_map.name) if layout.label_map else None,
        "video_extension": layout.video_extension,
    }


def _config(tmp_path: Path, data: dict, **features: object) -> Path:
    """Writes a reuse-ready experiment (fixed views, 2 cached views per split) and its path."""
    data = {
        "sampling": "uniform",
        "test_views": {"temporal": VIEWS, "spatial": 1},
        "augment": NO_AUGMENT,
        **data,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    cache = {"reuse": True, "train_views": VIEWS, "cache_dir": str(tmp_path / "features")}
    write_config(tmp_path / "exp.yaml", data, features={**cache, **features})
    return tmp_path / "exp.yaml"


def _load(path: Path, *overrides: str) -> ExperimentConfig:
    return load_config(path, overrides=list(overrides))


def _key_list(cfg: ExperimentConfig, split: str = "train") -> list[str]:
    annotations = read_splits(cfg.data, progress=False)[split]
    return [ref.key for ref in split_entries(cfg, split, annotations, resolve_files(cfg.data))]


def _keys(cfg: ExperimentConfig, split: str = "train") -> set[str]:
    return set(_key_list(cfg, split))


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def _assert_features_close(got: list, want: list, *, qk: bool) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.out.dtype == torch.float32 and g.out.shape == w.out.shape
        torch.testing.assert_close(g.out, w.out, **FP16)
        assert g.q is None and g.k is None  # the cache holds T-CA's maps, not q and k
        if qk:  # the maps T-CA computes from the backbone's q and k
            assert g.attn.dtype == torch.float32
            torch.testing.assert_close(g.attn, adjacent_attention(w.q, w.k), **FP16)
        else:
            assert g.attn is None


def test_cache_equals_backbone_and_is_reused(
    ray_local: None, tmp_path: Path, motion_small: SyntheticLayout
) -> None:
    path = _config(tmp_path, _layout_data(motion_small))
    plain, tca = _load(path), _load(path, "model.decoder.temporal_cross_attn=true")
    with pytest.raises(MissingFeatures, match=r"not cached \(key [0-9a-f]{64} under "):
        FeatureDataset(plain, "train")
    train_videos, val_videos = 10 * SMALL.clips_per_class, 10 * SMALL.val_clips_per_class
    clips = (train_videos + val_videos) * VIEWS
    first = prepare_features(plain, progress=False)
    assert (first.extracted_clips, first.written_entries, first.reused_entries) == (clips, 8, 0)
    assert first.bad_videos == {}
    second = prepare_features(tca, progress=False)  # T-CA keeps "out", adds its maps
    assert (second.extracted_clips, second.written_entries, second.reused_entries) == (
        clips,
        8,
        8,
    )
    before = _snapshot(tmp_path / "features")
    third = prepare_features(tca, progress=False)
    assert (third.extracted_clips, third.written_entries, third.reused_entries) == (0, 0, 16)
    assert _snapshot(tmp_path / "features") == before

    model = create_model(tca).eval()
    splits = read_splits(tca.data, progress=False)
    size = 32  # micro-vit

    # train: one cached view per item, drawn from (seed, epoch, index)
    train = FeatureDataset(tca, "train")
    assert len(train) == train_videos and train.layers == model.feature_layers == (1, 2)
    indices = np.array([5, 0, 11, 5, 19, 2, 8, 13])
    draws = [np.random.default_rng([tca.seed, 3, i]).integers(VIEWS) for i in indices]
    assert set(draws) == set(range(VIEWS))  # both views are exercised
    assert not np.array_equal(train.views_for(indices, epoch=4), draws)
    batch = train.batch(indices, epoch=3)
    videos = VideoDataset(
        splits["train"], data=view_data(tca, "train"), image_size=size, train=False, seed=tca.seed
    )
    clip = torch.stack([videos[int(i)].clip[v] for i, v in zip(indices, draws, strict=True)])
    with torch.inference_mode():
        reference = model.extract_features(clip)  # (N, T, L, C) per layer
        _assert_features_close(batch.features, reference, qk=True)
        torch.testing.assert_close(model.classify(batch.features), model(clip), **FP16)
    labels = [splits["train"].records[i].label for i in indices]
    assert batch.labels.tolist() == labels and batch.indices.tolist() == indices.tolist()
    assert train.video_ids[5] == splits["train"].records[5].video_id

    # val: every view, (N, V, T, L, C), temporal-major as the video loader gives them
    val = FeatureDataset(plain, "val")
    batch = val.batch(np.array([4, 1, 9]), epoch=0)
    views = torch.stack(
        [
            VideoDataset(splits["val"], data=plain.data, image_size=size, train=False)[i].clip
            for i in (4, 1, 9)
        ]
    )
    with torch.inference_mode():
        flat = model.extract_features(views.flatten(0, 1))  # (N*V, T, L, C)
    want = [BlockFeatures(f.out.unflatten(0, (3, VIEWS))) for f in flat]
    assert batch.features[0].out.shape == (3, VIEWS, 8, 17, 32)
    _assert_features_close(batch.features, want, qk=False)


def test_key_covers_everything_that_changes_features(
    tmp_path: Path, motion_small: SyntheticLayout
) -> None:
    copy = tmp_path / "dataset"
    shutil.copytree(motion_small.directory, copy)
    path = _config(tmp_path, _layout_data(motion_small, copy))
    base = _keys(_load(path))
    assert len(base) == VIEWS * 2  # views x blocks
    assert base.isdisjoint(_keys(_load(path), "val"))
    for override in (
        "data.num_frames=4",
        "model.backbone.init_seed=1",
        "features.dtype=float32",
        "data.sampling=dense",
        "features.train_views=3",
    ):
        assert base.isdisjoint(_keys(_load(path, override))), override
    # another block set shares the entries of the block both read (block 1)
    other = _keys(_load(path, "model.decoder.feature_layers=[0,1]"))
    assert len(base & other) == VIEWS
    # T-CA adds q and k entries next to the same "out" entries
    assert base < _keys(_load(path, "model.decoder.temporal_cross_attn=true"))
    # dataset files: a replaced video (a new file renamed over it, as an encoder writes it)
    # changes its split only; a missing one changes it too
    val = _keys(_load(path), "val")
    video = read_splits(_load(path).data)["train"].records[0].path
    replacement = video.with_name(f"new-{video.name}")
    replacement.write_bytes(video.read_bytes() + b"\0")
    os.replace(replacement, video)
    replaced = _keys(_load(path))
    assert base.isdisjoint(replaced) and _keys(_load(path), "val") == val
    video.unlink()
    assert replaced.isdisjoint(_keys(_load(path)))


def test_extraction_identity_tells_which_configs_read_the_same_entries(
    tmp_path: Path, motion_small: SyntheticLayout
) -> None:
    path = _config(tmp_path, _layout_data(motion_small))
    base = _load(path)
    for override in (  # the head side of a config: the same entries
        "train.lr=0.001",
        "train.num_steps=3",
        "model.decoder.temporal_conv=false",
        "model.head.dropout=0.1",
        "seed=4",
    ):
        cfg = _load(path, override)
        assert extraction_identity(cfg) == extraction_identity(base), override
        for split in ("train", "val"):
            assert _key_list(cfg, split) == _key_list(base, split), override
    for override in (  # what the backbone reads or writes: other entries
        "data.num_frames=4",
        "model.backbone.init_seed=1",
        "features.dtype=float32",
        "features.train_views=3",
        "model.decoder.feature_layers=[0,1]",
        "model.decoder.temporal_cross_attn=true",
        f"features.cache_dir={tmp_path / 'elsewhere'}",
    ):
        assert extraction_identity(_load(path, override)) != extraction_identity(base), override


def test_concurrent_runs_leave_one_complete_entry_each(
    ray_local: None, tmp_path: Path, appearance_small: SyntheticLayout
) -> None:
    cfg = _load(
        _config(tmp_path, _layout_data(appearance_small) | {"sampling": "dense", "stride": 2})
    )
    store = FeatureStore.for_config(cfg)
    keys = _keys(cfg) | _keys(cfg, "val")
    # a half-written entry (even with a meta.json) is invisible until renamed into place
    key = _key_list(cfg)[0]  # the first entry FeatureDataset opens
    stale = store.begin(key)
    np.save(stale / "shard-000000000-000000001.npy", np.zeros((1, 8, 17, 32), np.float16))
    (stale / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "key": key}))
    assert not store.has(key)
    with pytest.raises(MissingFeatures, match=key[:12]):
        FeatureDataset(cfg, "train", store=store)

    results: list[FeatureStats | BaseException] = []

    def run() -> None:
        try:
            results.append(prepare_features(cfg, progress=False))
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            results.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(isinstance(r, FeatureStats) for r in results) and len(results) == 2, results
    assert sum(r.written_entries for r in results) == len(keys) == 8
    assert all(r.written_entries + r.reused_entries == len(keys) for r in results)
    assert all(store.has(k) for k in keys)
    assert store.partial_dirs() == [stale]  # only the foreign, unfinished one
    # a writer finishing after the entry exists loses the rename and discards its copy
    meta = store.open(key).meta
    assert not store.commit(key, stale, {"shards": [[0, 1, "shard-000000000-000000001.npy"]]})
    assert store.partial_dirs() == [] and store.open(key).meta == meta
    entries = [p for p in (tmp_path / "features").glob("*/*") if not p.name.startswith(".")]
    assert sorted(p.name for p in entries) == sorted(keys)
    train = FeatureDataset(cfg, "train", store=store)
    batch = train.batch(np.arange(len(train)), epoch=0)
    assert batch.features[0].out.shape == (len(train), 8, 17, 32)
    assert torch.isfinite(batch.features[1].out).all()


def _bad_listing(tmp_path: Path, layout: SyntheticLayout) -> tuple[dict, dict[str, Path]]:
    """An EVL list: 14 good stand-in videos, then 5 unusable ones and one over-reporting."""
    records = read_splits(write_config(tmp_path / "src.yaml", _layout_data(layout)).data)
    bad = write_bad_videos(tmp_path / "bad")
    lines = [f"{r.path} {r.label}" for r in records["train"].records[:14]]
    lines += [f"{p} {label}" for label, p in enumerate(bad.values())]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing_data(listing, tmp_path), bad


def test_bad_videos_store_the_replacement_and_enforce_the_limit(
    ray_local: None, tmp_path: Path, appearance_small: SyntheticLayout
) -> None:
    data, bad = _bad_listing(tmp_path, appearance_small)
    cfg = _load(_config(tmp_path, {**data, "max_bad_fraction": 0.5}))
    stats = prepare_features(cfg, progress=False)
    assert stats.bad_videos == {"missing": 1, "empty": 1, "unreadable": 2, "too_short": 1}
    assert stats.extracted_clips == 2 * 20 * VIEWS  # both splits list the same 20 videos
    for split in ("train", "val"):
        features = FeatureDataset(cfg, split)
        # items 14..18 are unusable; each is replaced by item 19 (over-reporting, label 5)
        assert features.delivered.tolist() == [*range(14), *[19] * 5, 19]
        assert features.labels[14:].tolist() == [5] * 6
        assert features.video_ids[15] == features.video_ids[19]
        batch = features.batch(np.array([16, 19, 2]), epoch=0)
        assert batch.labels.tolist()[:2] == [5, 5] and batch.indices.tolist()[:2] == [19, 19]
    out = batch.features[0].out  # val: (N, V, T, L, C); item 16 holds item 19's video
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    assert not torch.equal(out[0], out[2])

    strict = _load(_config(tmp_path / "strict", {**data, "max_bad_fraction": 0.1}))
    with pytest.raises(TooManyBadVideos, match=r"of 20 videos are unusable") as err:
        prepare_features(strict, progress=False)
    assert str(bad["truncated"]) in str(err.value)
    store = FeatureStore.for_config(strict)
    assert store.partial_dirs() == [] and not any(store.has(k) for k in _keys(strict))

"""Extracts the missing cache entries of an experiment with Ray tasks, once.

:func:`prepare_features` runs on the driver. It computes the key of every entry both splits
need, and for the missing ones splits each split's videos into shards and runs one Ray task
per shard (:func:`evl_platform.features.shard.extract_shard`), as many at once as the cluster's
free CPUs (or GPUs) allow. Tasks write into private temporary directories; the driver then
writes each entry's ``meta.json`` and renames it into place, so concurrent trials never read a
half-written entry and a second run with the same key extracts nothing.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from tqdm import tqdm

from evl_platform.config import ExperimentConfig
from evl_platform.data.annotations import Annotations
from evl_platform.data.dataset import BadVideo, BadVideoTracker
from evl_platform.data.source import Split, read_splits, resolve_files
from evl_platform.features.key import SPLITS, EntryRef, split_entries
from evl_platform.features.shard import extract_shard
from evl_platform.features.store import DELIVERED, LABELS, FeatureStore, shard_name

MAX_SHARD_VIDEOS = 256
"""Upper bound on the videos of one shard (one task)."""


@dataclass
class FeatureStats:
    """What one :func:`prepare_features` call did.

    Attributes:
        extracted_clips: clips (one view of one video) the backbone ran on; 0 when all cached.
        reused_entries: entries already complete (here before, or written by a concurrent run).
        written_entries: entries this call created.
        bad_videos: distinct unusable videos met, per kind (``missing``, ``unreadable``, ...).
        seconds: wall-clock time of the call.
    """

    extracted_clips: int = 0
    reused_entries: int = 0
    written_entries: int = 0
    bad_videos: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class _SplitPlan:
    """The entries of one split, and what its tasks returned."""

    split: Split
    annotations: Annotations
    missing: list[EntryRef]
    delivered: np.ndarray
    labels: np.ndarray
    tracker: BadVideoTracker
    shards: list[tuple[int, int]] = field(default_factory=list)


@ray.remote(num_cpus=1)
def _extract_task(job: dict[str, Any], annotations: Annotations, device: str) -> dict[str, Any]:
    if device == "cpu":
        torch.set_num_threads(1)
    return extract_shard(job, annotations, device=device)


def prepare_features(
    cfg: ExperimentConfig,
    *,
    use_gpu: bool = False,
    progress: bool = True,
    videos_per_shard: int | None = None,
) -> FeatureStats:
    """Makes sure every cache entry the experiment reads exists, extracting the missing ones.

    Args:
        cfg: the experiment (its ``features`` section picks the cache and storage dtype).
        use_gpu: one GPU per task instead of one CPU.
        progress: show a tqdm bar over clips on stderr.
        videos_per_shard: videos per task (default: enough shards to keep every slot busy,
            at most :data:`MAX_SHARD_VIDEOS`).

    Returns:
        What was extracted, reused and written.

    Raises:
        RuntimeError: Ray is not initialised, or ``use_gpu`` on a cluster without GPUs.
        TooManyBadVideos: more unusable videos than ``data.max_bad_fraction`` allows.
    """
    if not ray.is_initialized():
        raise RuntimeError("prepare_features needs a running Ray instance: call ray.init() first")
    if use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise RuntimeError("prepare_features(use_gpu=True): the Ray cluster has no GPUs")
    began = time.perf_counter()
    store = FeatureStore.for_config(cfg)
    plans, reused = _plan(cfg, store, progress=progress)
    stats = FeatureStats(reused_entries=reused)
    staging = {ref.key: store.begin(ref.key) for plan in plans for ref in plan.missing}
    if plans and progress:
        print(f"extracting {len(staging)} feature entries into {store.root}", file=sys.stderr)
    try:
        if plans:
            images = _run_tasks(cfg, plans, staging, use_gpu, progress, videos_per_shard)
            stats.extracted_clips = images // cfg.data.num_frames
            stats.bad_videos = _bad_by_kind(plans)
        for plan in plans:
            written = _commit_split(cfg, store, plan, staging)
            stats.written_entries += written
            stats.reused_entries += len(plan.missing) - written
    finally:
        for directory in staging.values():
            store.discard(directory)  # committed ones were renamed away already
    stats.seconds = time.perf_counter() - began
    return stats


def _plan(
    cfg: ExperimentConfig, store: FeatureStore, *, progress: bool
) -> tuple[list[_SplitPlan], int]:
    """The splits with missing entries, and the number of entries already cached."""
    files = resolve_files(cfg.data, progress=progress)
    splits = read_splits(cfg.data, files=files)
    plans, reused = [], 0
    for split in SPLITS:
        annotations = splits[split]
        refs = split_entries(cfg, split, annotations, files)
        missing = [ref for ref in refs if not store.has(ref.key)]
        reused += len(refs) - len(missing)
        if missing:
            count = len(annotations.records)
            tracker = BadVideoTracker(
                source=annotations.source, total=count, max_fraction=cfg.data.max_bad_fraction
            )
            empty = np.full(count, -1, dtype=np.int64)
            plans.append(_SplitPlan(split, annotations, missing, empty, empty.copy(), tracker))
    return plans, reused


def _run_tasks(
    cfg: ExperimentConfig,
    plans: list[_SplitPlan],
    staging: dict[str, Path],
    use_gpu: bool,
    progress: bool,
    videos_per_shard: int | None,
) -> int:
    """Runs one task per shard, filling each plan's delivered indices and labels and its bad
    video tracker; returns the number of images the backbone ran on."""
    slots = max(1, int(ray.available_resources().get("GPU" if use_gpu else "CPU", 0)))
    task = _extract_task.options(num_cpus=1, num_gpus=1 if use_gpu else 0)
    device = "cuda" if use_gpu else "cpu"
    queue = deque(_make_jobs(cfg, plans, staging, slots, videos_per_shard))
    total = sum(len(plan.annotations.records) for plan in plans)
    running: dict[ray.ObjectRef, tuple[_SplitPlan, dict[str, Any]]] = {}
    images = 0
    bar = tqdm(total=total, desc="features", unit="clip", file=sys.stderr, disable=not progress)
    try:
        while queue or running:
            while queue and len(running) < slots:
                plan, job, records = queue.popleft()
                running[task.remote(job, records, device)] = (plan, job)
            [done], _ = ray.wait(list(running), num_returns=1)
            plan, job = running.pop(done)
            images += _record(plan, job, ray.get(done))
            bar.update(job["stop"] - job["start"])
    except BaseException:
        _cancel(list(running))
        raise
    finally:
        bar.close()
    return images


def _make_jobs(
    cfg: ExperimentConfig,
    plans: list[_SplitPlan],
    staging: dict[str, Path],
    slots: int,
    videos_per_shard: int | None,
) -> list[tuple[_SplitPlan, dict[str, Any], ray.ObjectRef]]:
    """One plain-dict job per shard (setting each plan's shards), with its split's records."""
    config = cfg.model_dump(mode="json")
    jobs = []
    for plan in plans:
        count = len(plan.annotations.records)
        size = videos_per_shard or min(MAX_SHARD_VIDEOS, math.ceil(count / (4 * slots)))
        plan.shards = [(start, min(start + size, count)) for start in range(0, count, size)]
        records = ray.put(plan.annotations)
        outputs = [[r.view, r.layer, r.kind, str(staging[r.key])] for r in plan.missing]
        for start, stop in plan.shards:
            job = {"cfg": config, "split": plan.split, "start": start, "stop": stop}
            jobs.append((plan, {**job, "outputs": outputs}, records))
    return jobs


def _record(plan: _SplitPlan, job: dict[str, Any], result: dict[str, Any]) -> int:
    """Stores one task's result in its plan; raises ``TooManyBadVideos`` past the threshold."""
    start, stop = job["start"], job["stop"]
    plan.delivered[start:stop] = result["delivered"]
    plan.labels[start:stop] = result["labels"]
    plan.tracker.update([BadVideo(*event) for event in result["bad"]])
    return result["images"]


def _cancel(refs: list[ray.ObjectRef]) -> None:
    """Cancels running tasks and waits for them to stop writing."""
    for ref in refs:
        ray.cancel(ref)
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=60)


def _bad_by_kind(plans: list[_SplitPlan]) -> dict[str, int]:
    """Distinct unusable videos of all splits, per kind."""
    videos: dict[str, BadVideo] = {}
    for plan in plans:
        videos.update(plan.tracker.videos)
    return dict(Counter(event.kind for event in videos.values()))


def _commit_split(
    cfg: ExperimentConfig, store: FeatureStore, plan: _SplitPlan, staging: dict[str, Path]
) -> int:
    """Writes meta.json and the item tables of a split's new entries and renames them into
    place; returns how many this call created (the rest another run created first)."""
    shards = [[start, stop, shard_name(start, stop)] for start, stop in plan.shards]
    bad = [[e.path, e.kind, e.detail] for e in plan.tracker.videos.values()]
    written = 0
    for ref in plan.missing:
        directory = staging[ref.key]
        np.save(directory / DELIVERED, plan.delivered)
        np.save(directory / LABELS, plan.labels)
        first = np.load(directory / shards[0][2], mmap_mode="r")
        meta = {
            "inputs": ref.inputs,
            "split": ref.split,
            "view": ref.view,
            "layer": ref.layer,
            "kind": ref.kind,
            "shape": [len(plan.labels), *first.shape[1:]],
            "dtype": cfg.features.dtype,
            "shards": shards,
            "bad_videos": bad,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        del first
        written += store.commit(ref.key, directory, meta)
    return written

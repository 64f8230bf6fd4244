"""Where a training worker's batches come from: decoded videos or the frozen-feature cache.

Both sources deal the same per-rank index batches (:class:`StepSampler`), so a run can resume
at any step by recomputing its epoch and position without replaying earlier batches.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Sampler

from evl_platform.config import ExperimentConfig
from evl_platform.data.annotations import Annotations
from evl_platform.data.augment_device import apply_plans
from evl_platform.data.dataset import VideoLoader
from evl_platform.data.source import DatasetFiles, create_dataset, read_splits, resolve_files
from evl_platform.train.loop import InputBatch

if TYPE_CHECKING:
    from evl_platform.features import FeatureBatch
    from evl_platform.features.key import FeatureRead


class StepSampler(Sampler[int]):
    """One rank's share of an epoch's shuffled batches, starting at a given batch.

    Every epoch is a permutation seeded by ``(seed, epoch)``; the incomplete last global batch
    is dropped; global batch ``b`` gives rank ``r`` its ``r``-th slice.

    Args:
        size: items in the split.
        rank / world: this worker and the number of workers.
        batch: items per rank per step.
        seed: shuffling seed.
    """

    def __init__(self, size: int, *, rank: int, world: int, batch: int, seed: int) -> None:
        self.size, self.rank, self.world, self.batch, self.seed = size, rank, world, batch, seed
        self.steps_per_epoch = size // (batch * world)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"train.batch_size {batch * world} is larger than the training split "
                f"({size} videos)"
            )
        self.epoch, self.first = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_at(self, batch: int) -> None:
        """The next iteration begins at this batch of the epoch."""
        self.first = batch

    def batches(self, epoch: int, first: int = 0) -> list[np.ndarray]:
        """This rank's index batches of ``epoch`` from batch ``first`` on."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        used = order[: self.steps_per_epoch * self.batch * self.world]
        per_rank = used.reshape(self.steps_per_epoch, self.world, self.batch)[:, self.rank]
        return list(per_rank[first:])

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches(self.epoch, self.first):
            yield from batch.tolist()

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.first) * self.batch


def reserved_cpus() -> int:
    """The CPUs this process may use: those its Ray worker or task reserved when it runs
    inside Ray (at least one), otherwise the process's CPU affinity."""
    ray = sys.modules.get("ray")  # only a process started by Ray has it imported and running
    if ray is not None and ray.is_initialized():
        try:
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        except AssertionError:  # the driver: only workers and tasks have reserved resources
            cpus = None
        if cpus:
            return max(1, int(cpus))
    return len(os.sched_getaffinity(0))


def loader_workers(configured: int | None) -> int:
    """Loader processes per training worker: ``data.num_workers`` when set, otherwise the
    reserved CPUs (:func:`reserved_cpus`) minus one for the training process, at least one
    (so decoding overlaps the step even on a single reserved CPU)."""
    if configured is not None:
        return configured
    return max(1, reserved_cpus() - 1)


class VideoSource:
    """Decoded, transformed clips (random training views, all test views for validation).

    Each split has one :class:`VideoLoader` for the whole run, so its worker processes (and
    the bad videos they found) last from the first batch to the end. With
    ``data.augment.on: device`` training batches arrive cropped, with their augmentation
    plans, and are augmented here on ``device`` (:func:`~evl_platform.data.augment_device.
    apply_plans`): the batches this source yields are then already on the device.

    Args:
        cfg: the experiment.
        splits: the annotations of both splits.
        rank / world: this worker and the number of workers.
        batch: items per rank per step.
        device: the training device.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        splits: dict[str, Annotations],
        *,
        rank: int,
        world: int,
        batch: int,
        device: torch.device,
    ) -> None:
        self.device = device
        self.train_set = create_dataset(cfg, splits["train"], train=True)
        self.val_set = create_dataset(cfg, splits["val"], train=False)
        self.sampler = StepSampler(
            len(self.train_set), rank=rank, world=world, batch=batch, seed=cfg.seed
        )
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.val_indices = list(range(rank, len(self.val_set), world))
        options = dict(
            num_workers=loader_workers(cfg.data.num_workers),
            max_bad_fraction=cfg.data.max_bad_fraction,
            pin_memory=device.type == "cuda",
            shards=world,
        )
        self.train_loader = VideoLoader(
            self.train_set, batch_size=batch, shuffle=False, sampler=self.sampler, **options
        )
        self.val_loader = VideoLoader(
            self.val_set, batch_size=batch, shuffle=False, sampler=self.val_indices, **options
        )

    @property
    def bad_videos(self) -> int:
        return self.train_loader.bad.count + self.val_loader.bad.count

    def train_batches(self, epoch: int, first: int) -> Iterator[InputBatch]:
        self.sampler.start_at(first)
        for batch in self.train_loader.epoch(epoch):
            clips = batch.clips
            if batch.plans is not None:
                clips = apply_plans(clips.to(self.device, non_blocking=True), batch.plans)
            yield InputBatch(clips, batch.labels, batch.indices)

    def val_batches(self) -> Iterator[InputBatch]:
        for batch in self.val_loader.epoch(0):
            yield InputBatch(batch.clips, batch.labels, batch.indices)


class FeatureSource:
    """Backbone features from the frozen-feature cache (``features.reuse``), same batching.

    Args:
        cfg: the experiment (its features must have been prepared by the driver).
        rank / world: this worker and the number of workers.
        batch: items per rank per step.
        reads: for a pack of decoders, the union of the ``(block, kind)`` pairs its members
            read; batches then hold block index -> features. ``None``: ``cfg``'s decoder
            layers, one :class:`BlockFeatures` per layer.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        splits: dict[str, Annotations],
        files: DatasetFiles,
        *,
        rank: int,
        world: int,
        batch: int,
        reads: Sequence[FeatureRead] | None = None,
    ) -> None:
        from evl_platform.features import FeatureDataset

        self.blocks = None if reads is None else tuple(sorted({b for b, _ in reads}))
        self.train_set = FeatureDataset(cfg, "train", splits=splits, files=files, reads=reads)
        self.val_set = FeatureDataset(cfg, "val", splits=splits, files=files, reads=reads)
        self.sampler = StepSampler(
            len(self.train_set), rank=rank, world=world, batch=batch, seed=cfg.seed
        )
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.batch = batch
        self.val_indices = np.arange(rank, len(self.val_set), world)
        self.bad_videos = 0  # counted once, at extraction

    def _batch(self, found: FeatureBatch) -> InputBatch:
        features = found.features
        if self.blocks is not None:
            features = dict(zip(self.blocks, features, strict=True))
        return InputBatch(features, found.labels, found.indices)

    def train_batches(self, epoch: int, first: int) -> Iterator[InputBatch]:
        for indices in self.sampler.batches(epoch, first):
            yield self._batch(self.train_set.batch(indices, epoch=epoch))

    def val_batches(self) -> Iterator[InputBatch]:
        for start in range(0, len(self.val_indices), self.batch):
            indices = self.val_indices[start : start + self.batch]
            yield self._batch(self.val_set.batch(indices, epoch=0))


def create_source(
    cfg: ExperimentConfig,
    *,
    rank: int,
    world: int,
    batch: int,
    device: torch.device,
    reads: Sequence[FeatureRead] | None = None,
) -> tuple[VideoSource | FeatureSource, Sequence[str], Sequence[str]]:
    """The worker's batch source plus the validation video ids and class names (``reads``:
    what a pack's members read together from the feature cache, see :class:`FeatureSource`)."""
    files = resolve_files(cfg.data, progress=False)
    splits = read_splits(cfg.data, files=files)
    video_ids = [record.video_id for record in splits["val"].records]
    if cfg.features.reuse:
        source = FeatureSource(cfg, splits, files, rank=rank, world=world, batch=batch, reads=reads)
    else:
        source = VideoSource(cfg, splits, rank=rank, world=world, batch=batch, device=device)
    return source, video_ids, splits["train"].class_names

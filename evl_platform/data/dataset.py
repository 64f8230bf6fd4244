"""The video dataset and loader used for training and evaluation.

:class:`VideoDataset` decodes, samples and transforms one video per item. A video that cannot
be used (missing, empty, unreadable, too short, too slow to decode) is replaced by the next
usable one in the list and reported in the batch; :class:`VideoLoader` gathers those reports in
the main process, logs each bad file once, and stops with :class:`TooManyBadVideos` as soon as
the unusable share of the split is certain to exceed ``data.max_bad_fraction``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from evl_platform.config import DataConfig
from evl_platform.data.annotations import Annotations
from evl_platform.data.decode import VideoError, read_clip
from evl_platform.data.sampling import ClipSampler
from evl_platform.data.transforms import TestTransform, TrainTransform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BadVideo:
    """One failed attempt to use a video."""

    path: str
    kind: str
    detail: str


@dataclass
class Sample:
    """One item: the clip of ``index`` (a replacement when the requested video was bad)."""

    clip: torch.Tensor  # train (C, T, H, W); test (V, C, T, H, W)
    label: int
    index: int
    bad: tuple[BadVideo, ...] = ()


@dataclass
class Batch:
    """Collated samples plus every bad-video event met while producing them."""

    clips: torch.Tensor  # (N, C, T, H, W) or (N, V, C, T, H, W)
    labels: torch.Tensor  # (N,)
    indices: torch.Tensor  # (N,) dataset positions of the clips actually delivered
    bad: tuple[BadVideo, ...] = field(default=())

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)``."""
        return Batch(self.clips.pin_memory(), self.labels.pin_memory(), self.indices, self.bad)


def collate(samples: Sequence[Sample]) -> Batch:
    """Stacks samples into a :class:`Batch` (in shared memory inside a loader worker, which
    spares a copy on the way to the main process)."""
    return Batch(
        clips=default_collate([s.clip for s in samples]),
        labels=torch.tensor([s.label for s in samples], dtype=torch.long),
        indices=torch.tensor([s.index for s in samples], dtype=torch.long),
        bad=tuple(event for s in samples for event in s.bad),
    )


class VideoDataset(Dataset):
    """Clips of the videos listed in ``annotations``.

    Args:
        annotations: the split's records and class names.
        data: data config (sampling, views, augmentation, decoder, limits).
        image_size: model input size in pixels.
        train: random clip + augmentation when true; all test views otherwise.
        seed: seed of the per-item random draws (with the epoch and the item index, so results
            do not depend on which worker produced an item).
    """

    def __init__(
        self,
        annotations: Annotations,
        *,
        data: DataConfig,
        image_size: int,
        train: bool,
        seed: int = 0,
    ) -> None:
        if not annotations.records:
            raise ValueError(f"{annotations.source}: no videos listed")
        self.annotations = annotations
        self.records = annotations.records
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.decoder = data.decoder
        self.timeout_s = data.decode_timeout_s
        self.min_frames = data.min_frames or data.num_frames
        self.sampler = ClipSampler(data, train=train)
        if train:
            self.transform = TrainTransform(data.augment, size=image_size)
        else:
            self.transform = TestTransform(size=image_size, spatial_views=data.test_views.spatial)
        self._known_bad: dict[int, BadVideo] = {}

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Changes the random draws of the next epoch (call before creating its iterator)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> Sample:
        bad: list[BadVideo] = []
        for attempt in range(len(self.records)):
            current = (index + attempt) % len(self.records)
            if current in self._known_bad:
                bad.append(self._known_bad[current])
                continue
            try:
                clip = self.load(current)
            except VideoError as err:
                event = BadVideo(err.path, err.kind, err.detail)
                self._known_bad[current] = event
                bad.append(event)
                continue
            return Sample(clip, self.records[current].label, current, tuple(bad))
        raise RuntimeError(
            f"{self.annotations.source}: none of the {len(self.records)} videos can be decoded "
            f"(first error: {bad[0].path}: {bad[0].kind}: {bad[0].detail})"
        )

    def load(self, index: int) -> torch.Tensor:
        """The transformed clip of record ``index``; raises :class:`VideoError` for bad files."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        views = read_clip(
            self.records[index].path,
            lambda length: self.sampler(length, rng),
            decoder=self.decoder,
            min_frames=self.min_frames,
            timeout_s=self.timeout_s,
        )
        if self.train:
            return self.transform(views[0], rng)
        # (V, C, T, H, W), temporal-major: all spatial crops of view 0, then of view 1, ...
        return torch.stack([crop for frames in views for crop in self.transform(frames)])


class TooManyBadVideos(RuntimeError):
    """More of a split's videos are unusable than ``data.max_bad_fraction`` allows."""


class BadVideoTracker:
    """Counts unusable videos of one split, logs each once, enforces the threshold.

    Args:
        source: the split's annotation file (named in messages).
        total: number of videos in the split.
        max_fraction: the allowed unusable share (``data.max_bad_fraction``).
    """

    def __init__(self, *, source: str | Path, total: int, max_fraction: float) -> None:
        self.source = str(source)
        self.total = total
        self.max_fraction = max_fraction
        self.videos: dict[str, BadVideo] = {}
        self.failures: Counter[str] = Counter()

    @property
    def count(self) -> int:
        """Distinct unusable videos seen so far."""
        return len(self.videos)

    def by_kind(self) -> dict[str, int]:
        """Distinct unusable videos per kind."""
        return dict(Counter(event.kind for event in self.videos.values()))

    def update(self, events: Sequence[BadVideo]) -> None:
        """Records events; raises :class:`TooManyBadVideos` past the threshold."""
        for event in events:
            self.failures[event.path] += 1
            if event.path not in self.videos:
                self.videos[event.path] = event
                log.warning("bad video replaced (%s): %s: %s", event.kind, event.path, event.detail)
        if self.count > self.max_fraction * self.total:
            raise TooManyBadVideos(self.message())

    def message(self, limit: int = 10) -> str:
        """What is wrong, with the worst files first."""
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.by_kind().items()))
        worst = sorted(self.videos, key=lambda path: (-self.failures[path], path))[:limit]
        listed = "; ".join(f"{p} ({self.videos[p].kind}: {self.videos[p].detail})" for p in worst)
        more = f"; and {self.count - limit} more" if self.count > limit else ""
        return (
            f"{self.source}: {self.count} of {self.total} videos are unusable "
            f"({self.count / self.total:.1%} > data.max_bad_fraction {self.max_fraction:.1%}): "
            f"{kinds}. Worst: {listed}{more}. Run `evl-platform data check` for the full list."
        )


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)


class VideoLoader:
    """Batches of a :class:`VideoDataset` from worker processes, with bad-video accounting.

    Args:
        dataset: the dataset.
        batch_size: clips per batch.
        num_workers: loader processes (0 decodes in the calling process).
        shuffle: reshuffle every epoch (seeded by the dataset seed and the epoch).
        drop_last: drop a final incomplete batch.
        max_bad_fraction: the allowed unusable share of the split.
        sampler: a custom index sampler (e.g. distributed); overrides ``shuffle``.
        pin_memory: pin batches for faster host-to-GPU copies.
    """

    def __init__(
        self,
        dataset: VideoDataset,
        *,
        batch_size: int,
        num_workers: int,
        shuffle: bool,
        drop_last: bool = False,
        max_bad_fraction: float = 0.01,
        sampler: Sampler[int] | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.sampler = sampler
        self.pin_memory = pin_memory
        self.bad = BadVideoTracker(
            source=dataset.annotations.source, total=len(dataset), max_fraction=max_bad_fraction
        )

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler or self.dataset), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Iterates one epoch; bad videos are counted as batches arrive."""
        self.dataset.set_epoch(epoch)
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        generator = torch.Generator().manual_seed(self.dataset.seed * 1_000_003 + epoch)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=self.shuffle and self.sampler is None,
            sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            drop_last=self.drop_last,
            pin_memory=self.pin_memory,
            worker_init_fn=_init_worker if self.num_workers else None,
            generator=generator,
        )
        for batch in loader:
            self.bad.update(batch.bad)
            yield batch

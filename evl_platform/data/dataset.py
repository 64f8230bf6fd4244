"""The video dataset and loader used for training and evaluation.

:class:`VideoDataset` decodes, samples and transforms one video per item, decoding at the size
the transforms need (:func:`decode_short_side`). A video that cannot be used (missing, empty,
unreadable, too short, too slow to decode) is replaced by the next usable one in the list and
reported in the batch; it is remembered for the rest of the run in a flag array shared by every
loader process, so later epochs skip it without opening it again. :class:`VideoLoader` keeps one
set of worker processes for the run (persistent workers; each index carries its epoch, so
per-epoch random draws need no message to the workers), gathers the bad-video reports in the
main process, logs each bad file once, and stops with :class:`TooManyBadVideos` as soon as the
unusable share of the videos this training worker reads is certain to exceed
``data.max_bad_fraction``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from evl_platform.config import DataConfig
from evl_platform.data.annotations import Annotations
from evl_platform.data.decode import VideoError, check_decoder, read_clip
from evl_platform.data.sampling import ClipSampler
from evl_platform.data.transforms import TestTransform, TrainTransform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BadVideo:
    """One failed attempt to use a video."""

    path: str
    kind: str
    detail: str
    index: int = -1  # position in the split; -1 when not known


@dataclass
class Sample:
    """One item: the clip of ``index`` (a replacement when the requested video was bad)."""

    clip: torch.Tensor  # train (C, T, H, W); test (V, C, T, H, W)
    label: int
    index: int
    bad: tuple[BadVideo, ...] = ()
    plan: np.ndarray | None = None  # augmentation still to apply on the device


@dataclass
class Batch:
    """Collated samples plus every bad-video event met while producing them.

    A loader worker sends the clips through shared memory and the small fields (labels,
    indices, plans) by value, as numpy arrays: each shared tensor costs the batch a file
    descriptor passed to the main process and mapped there, which at the paper's few clips per
    worker batch took ~20 % of the loader's throughput. :meth:`tensors` (or
    :meth:`pin_memory`) makes labels and indices tensors in the main process.
    """

    clips: torch.Tensor  # (N, C, T, H, W) or (N, V, C, T, H, W)
    labels: torch.Tensor | np.ndarray  # (N,)
    indices: torch.Tensor | np.ndarray  # (N,) dataset positions of the clips delivered
    bad: tuple[BadVideo, ...] = field(default=())
    plans: np.ndarray | None = None  # (N, slots, 2) float64, see data.augment_device

    def tensors(self) -> Batch:
        """The batch with labels and indices as int64 tensors."""
        return Batch(
            self.clips,
            torch.as_tensor(self.labels, dtype=torch.long),
            torch.as_tensor(self.indices, dtype=torch.long),
            self.bad,
            self.plans,
        )

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)``, in the main process."""
        batch = self.tensors()
        batch.clips, batch.labels = batch.clips.pin_memory(), batch.labels.pin_memory()
        return batch


def collate(samples: Sequence[Sample]) -> Batch:
    """Stacks samples into a :class:`Batch`: the clips in shared memory inside a loader worker
    (which spares a copy on the way to the main process), the rest as numpy arrays."""
    return Batch(
        clips=default_collate([s.clip for s in samples]),
        labels=np.array([s.label for s in samples], dtype=np.int64),
        indices=np.array([s.index for s in samples], dtype=np.int64),
        bad=tuple(event for s in samples for event in s.bad),
        plans=None if samples[0].plan is None else np.stack([s.plan for s in samples]),
    )


def decode_short_side(data: DataConfig, *, image_size: int, train: bool) -> int:
    """The short side (pixels) videos are decoded at; larger videos are scaled down by the
    decoder, smaller ones decoded as they are (never upsampled).

    Test views and training without random resized crop resize the short side to
    ``image_size`` before cropping, so decoding at ``image_size`` gives the crops the same
    pixels the transform would pick. Random resized crop takes a box of 8-100 % of the frame
    and resizes it to ``image_size``; it gets ``image_size`` x 8/7 (256 for 224, 384 for 336,
    rounded up to an even number), the short side of prepared Kinetics copies (mmaction2's
    256 px for 224 px crops), so the largest boxes are still downscaled.
    """
    if not train or data.augment.random_resized_crop is None:
        return image_size
    return 2 * math.ceil(image_size * 8 / 7 / 2)


def as_epoch_index(item: int | tuple[int, int], epoch: int) -> tuple[int, int]:
    """``(epoch, index)`` of a dataset item given as an index or an ``(epoch, index)`` pair."""
    if isinstance(item, tuple):
        return int(item[0]), int(item[1])
    return epoch, int(item)


class VideoDataset(Dataset):
    """Clips of the videos listed in ``annotations``.

    Items are addressed by index (drawn with :meth:`set_epoch`'s epoch) or by an
    ``(epoch, index)`` pair, which is how :class:`VideoLoader` asks persistent workers for
    another epoch's draws.

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
        check_decoder(data.decoder)
        self.decoder = data.decoder
        self.timeout_s = data.decode_timeout_s
        self.min_frames = data.min_frames or data.num_frames
        self.short_side = decode_short_side(data, image_size=image_size, train=train)
        self.sampler = ClipSampler(data, train=train)
        if train:
            self.transform = TrainTransform(data.augment, size=image_size)
        else:
            self.transform = TestTransform(size=image_size, spatial_views=data.test_views.spatial)
        # one flag per video, in shared memory: a bad video found by any loader process is
        # skipped by all of them for the rest of the run, persistent workers included
        self.known_bad = torch.zeros(len(self.records), dtype=torch.bool).share_memory_()
        self._events: dict[int, BadVideo] = {}

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of items addressed by a plain index."""
        self.epoch = epoch

    def __getitem__(self, item: int | tuple[int, int]) -> Sample:
        epoch, index = as_epoch_index(item, self.epoch)
        bad: list[BadVideo] = []
        for attempt in range(len(self.records)):
            current = (index + attempt) % len(self.records)
            if self.known_bad[current]:
                if current in self._events:  # reported again: the tracker counts failures
                    bad.append(self._events[current])
                continue
            try:
                clip, plan = self.load(current, epoch)
            except VideoError as err:
                event = BadVideo(err.path, err.kind, err.detail, current)
                self._events[current] = event
                self.known_bad[current] = True
                bad.append(event)
                continue
            return Sample(clip, self.records[current].label, current, tuple(bad), plan)
        first = f" (first error: {bad[0].path}: {bad[0].kind}: {bad[0].detail})" if bad else ""
        raise RuntimeError(
            f"{self.annotations.source}: none of the {len(self.records)} videos can be "
            f"decoded{first}"
        )

    def load(self, index: int, epoch: int | None = None) -> tuple[torch.Tensor, np.ndarray | None]:
        """The transformed clip of record ``index`` in ``epoch`` (default: :meth:`set_epoch`'s)
        and its augmentation plan when that runs on the training device (``None`` otherwise);
        raises :class:`VideoError` for bad files."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch, index])
        views = read_clip(
            self.records[index].path,
            lambda length: self.sampler(length, rng),
            decoder=self.decoder,
            min_frames=self.min_frames,
            short_side=self.short_side,
            timeout_s=self.timeout_s,
        )
        if self.train:
            return self.transform(views[0], rng)
        # (V, C, T, H, W), temporal-major: all spatial crops of view 0, then of view 1, ...
        return torch.stack([crop for frames in views for crop in self.transform(frames)]), None


class TooManyBadVideos(RuntimeError):
    """More of a split's videos are unusable than ``data.max_bad_fraction`` allows."""


class BadVideoTracker:
    """Counts unusable videos of one split, logs each once, enforces the threshold.

    With ``shards`` training workers each reading its own share of the split, every worker
    checks its own count against ``max_fraction`` of the videos it is responsible for: its
    share (``total / shards``) until it has tried more distinct videos than that (later
    epochs deal it others), then the distinct videos it has tried. Whatever the number of
    workers, a split whose unusable share exceeds ``max_fraction`` stops within the first
    epoch (some worker's share must exceed it), with no communication between workers.

    Args:
        source: the split's annotation file (named in messages).
        total: number of videos in the split.
        max_fraction: the allowed unusable share (``data.max_bad_fraction``).
        shards: training workers sharing the split (1: this process reads all of it).
    """

    def __init__(
        self, *, source: str | Path, total: int, max_fraction: float, shards: int = 1
    ) -> None:
        self.source = str(source)
        self.total = total
        self.max_fraction = max_fraction
        self.shards = shards
        self.videos: dict[str, BadVideo] = {}
        self.failures: Counter[str] = Counter()
        self._tried = np.zeros(total, dtype=bool)

    @property
    def count(self) -> int:
        """Distinct unusable videos seen so far."""
        return len(self.videos)

    @property
    def share(self) -> int:
        """The number of videos the threshold applies to (see the class docstring)."""
        return max(math.ceil(self.total / self.shards), int(self._tried.sum()))

    def by_kind(self) -> dict[str, int]:
        """Distinct unusable videos per kind."""
        return dict(Counter(event.kind for event in self.videos.values()))

    def update(self, events: Sequence[BadVideo], delivered: Iterable[int] = ()) -> None:
        """Records events and the split positions of delivered clips; raises
        :class:`TooManyBadVideos` past the threshold."""
        self._tried[np.fromiter(delivered, dtype=np.int64)] = True
        for event in events:
            if event.index >= 0:
                self._tried[event.index] = True
            self.failures[event.path] += 1
            if event.path not in self.videos:
                self.videos[event.path] = event
                log.warning("bad video replaced (%s): %s: %s", event.kind, event.path, event.detail)
        if self.count > self.max_fraction * self.share:
            raise TooManyBadVideos(self.message())

    def message(self, limit: int = 10) -> str:
        """What is wrong, with the worst files first."""
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.by_kind().items()))
        worst = sorted(self.videos, key=lambda path: (-self.failures[path], path))[:limit]
        listed = "; ".join(f"{p} ({self.videos[p].kind}: {self.videos[p].detail})" for p in worst)
        more = f"; and {self.count - limit} more" if self.count > limit else ""
        share = self.share
        scope = "" if share >= self.total else f" this worker reads (of {self.total})"
        return (
            f"{self.source}: {self.count} of {share} videos{scope} are unusable "
            f"({self.count / share:.1%} > data.max_bad_fraction {self.max_fraction:.1%}): "
            f"{kinds}. Worst: {listed}{more}. Run `evl-platform data check` for the full list."
        )


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)


class EpochSampler(Sampler[tuple[int, int]]):
    """Tags each index of ``indices`` with the epoch set last: persistent loader workers
    then draw the epoch's random clips without being told about the epoch otherwise.

    Args:
        indices: an index sampler (``set_epoch`` is forwarded) or a fixed list of indices;
            ``None`` with ``shuffle`` or the whole dataset in order.
        size: dataset length (for ``indices=None``).
        shuffle: a new permutation each epoch, seeded by ``(seed, epoch)``.
        seed: the shuffling seed.
    """

    def __init__(
        self, indices: Iterable[int] | None, *, size: int, shuffle: bool, seed: int
    ) -> None:
        self.indices, self.size, self.shuffle, self.seed = indices, size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.indices, "set_epoch"):
            self.indices.set_epoch(epoch)

    def _order(self) -> Iterable[int]:
        if self.indices is not None:
            return self.indices
        if self.shuffle:
            return np.random.default_rng([self.seed, self.epoch]).permutation(self.size).tolist()
        return range(self.size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for index in self._order():
            yield epoch, int(index)

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else self.size


class VideoLoader:
    """Batches of a :class:`VideoDataset` from worker processes, with bad-video accounting.

    One ``DataLoader`` serves every epoch: its worker processes start at the first batch and
    stay until the loader is dropped (``persistent_workers``), so neither an epoch nor a
    validation pays for starting them again, and what they learnt (known-bad videos) stays.

    Args:
        dataset: the dataset.
        batch_size: clips per batch.
        num_workers: loader processes (0 decodes in the calling process).
        shuffle: reshuffle every epoch (seeded by the dataset seed and the epoch).
        drop_last: drop a final incomplete batch.
        max_bad_fraction: the allowed unusable share of the videos this loader reads.
        sampler: a custom index sampler (e.g. distributed) or list of indices; overrides
            ``shuffle``.
        pin_memory: pin batches for faster host-to-GPU copies.
        shards: training workers that share the split, each through its own loader (the
            bad-video threshold applies to each one's share, see :class:`BadVideoTracker`).
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
        sampler: Sampler[int] | Sequence[int] | None = None,
        pin_memory: bool = False,
        shards: int = 1,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.sampler = EpochSampler(sampler, size=len(dataset), shuffle=shuffle, seed=dataset.seed)
        self.bad = BadVideoTracker(
            source=dataset.annotations.source,
            total=len(dataset),
            max_fraction=max_bad_fraction,
            shards=shards,
        )
        self._loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=collate,
            drop_last=drop_last,
            pin_memory=pin_memory,
            worker_init_fn=_init_worker if num_workers else None,
            persistent_workers=num_workers > 0,
            # its base seed comes from here, not from the process's torch RNG, whose draws
            # belong to the model (dropout): a run draws the same whatever its loader does
            generator=torch.Generator().manual_seed(dataset.seed * 1_000_003),
        )

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Iterates one epoch; bad videos are counted as batches arrive."""
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        for batch in self._loader:
            batch = batch.tensors()
            self.bad.update(batch.bad, batch.indices.tolist())
            yield batch

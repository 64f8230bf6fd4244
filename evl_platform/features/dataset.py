"""Batches of cached backbone features, read from memory-mapped shards.

:class:`FeatureDataset` stands in for the backbone: ``model.classify(batch.features)`` on a
training batch equals ``model(clips)`` on the same fixed views, up to the storage dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from evl_platform.config import ExperimentConfig
from evl_platform.data.annotations import Annotations
from evl_platform.data.source import DatasetFiles, Split, read_splits, resolve_files
from evl_platform.features.key import (
    EntryRef,
    FeatureRead,
    decoder_layers,
    feature_reads,
    split_entries,
    view_set,
)
from evl_platform.features.store import FeatureStore, StoredEntry
from evl_platform.models.backbone import BlockFeatures


class MissingFeatures(LookupError):
    """A cache entry the experiment needs has not been extracted."""


@dataclass
class FeatureBatch:
    """Features of a batch of items, in place of the backbone's output.

    Attributes:
        features: one float32 :class:`BlockFeatures` per decoder layer (``model.feature_layers``
            order, repeats allowed). Train: ``out`` (N, T, L, C), ``attn`` (N, 2, T-1, P, P);
            val: every view, ``out`` (N, V, T, L, C), ``attn`` (N, V, 2, T-1, P, P). ``attn``
            (T-CA's maps between adjacent frames) is ``None`` unless T-CA is on; ``q`` and
            ``k`` are always ``None``.
        labels: (N,) labels of the delivered videos.
        indices: (N,) dataset positions of the delivered videos (a replacement's position when
            the requested video was unusable).
    """

    features: list[BlockFeatures]
    labels: torch.Tensor
    indices: torch.Tensor


class FeatureDataset:
    """A split's cached features (run :func:`prepare_features` first).

    Training items read one of the ``features.train_views`` cached views, drawn per item and
    epoch with ``np.random.default_rng([cfg.seed, epoch, index])``; validation items read all
    test views.

    Args:
        cfg: the experiment.
        split: ``train`` or ``val``.
        store: the cache (default: the experiment's, see ``features_root``).
        splits / files: the dataset's annotations and files, when the caller already has
            them (default: read from ``cfg.data``).
        reads: the ``(block, kind)`` pairs to read (default: what ``cfg``'s decoder reads,
            :func:`~evl_platform.features.key.feature_reads`); a pack of decoders reads the
            union of its members', and each item then holds one block per distinct block.

    Attributes:
        layers: block read by each decoder layer (``model.feature_layers``).
        num_views: cached views per item (``train_views`` or ``test_views.total``).
        delivered: (N,) dataset position of the video each item holds.
        labels: (N,) label of that video (a replacement's label for an unusable video).
        video_ids: id of that video, per item.

    Raises:
        MissingFeatures: an entry is not cached; the message names its key.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        split: Literal["train", "val"],
        *,
        store: FeatureStore | None = None,
        splits: dict[Split, Annotations] | None = None,
        files: DatasetFiles | None = None,
        reads: Sequence[FeatureRead] | None = None,
    ) -> None:
        self.cfg = cfg
        self.split: Split = split
        self.store = store or FeatureStore.for_config(cfg)
        self.reads = feature_reads(cfg) if reads is None else tuple(sorted(set(reads)))
        self.layers = (
            decoder_layers(cfg) if reads is None else tuple(sorted({b for b, _ in self.reads}))
        )
        self.num_views = view_set(cfg, split).total
        files = files or resolve_files(cfg.data, progress=False)
        annotations = (splits or read_splits(cfg.data, files=files))[split]
        refs = split_entries(cfg, split, annotations, files, reads=self.reads)
        self.entries = {(r.view, r.layer, r.kind): self._open(r) for r in refs}
        self.delivered, self.labels = self._item_tables()
        ids = annotations.records.video_ids  # a compact column: no record or Path made
        self.video_ids = tuple(ids[i] for i in self.delivered)

    def __len__(self) -> int:
        return len(self.labels)

    def _open(self, ref: EntryRef) -> StoredEntry:
        entry = self.store.open(ref.key)
        if entry is None:
            raise MissingFeatures(
                f"features for {ref.split} view {ref.view} block {ref.layer} {ref.kind} are not "
                f"cached (key {ref.key} under {self.store.root}); run prepare_features first "
                "(features.reuse extracts them before training)"
            )
        return entry

    def _item_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Delivered positions and labels, the same in every entry of a consistent cache."""
        first, *rest = self.entries.values()
        delivered, labels = first.delivered(), first.labels()
        for entry in rest:
            if len(entry) != len(delivered) or not np.array_equal(entry.delivered(), delivered):
                raise RuntimeError(
                    f"cache entries {first.key} and {entry.key} hold different videos (a video "
                    f"became unusable between extractions?); delete them from {self.store.root}"
                )
        return delivered, labels

    def views_for(self, indices: np.ndarray, *, epoch: int) -> np.ndarray:
        """The cached training view each item reads in ``epoch``: (N,) int64."""
        seed = self.cfg.seed
        return np.array(
            [
                np.random.default_rng([seed, epoch, int(i)]).integers(self.num_views)
                for i in indices
            ],
            dtype=np.int64,
        )

    def batch(self, indices: np.ndarray, *, epoch: int) -> FeatureBatch:
        """Features, labels and delivered positions of items ``indices`` in ``epoch``."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.split == "train":
            views = self.views_for(indices, epoch=epoch)
            read = {key: self._read_train(indices, views, *key) for key in self._wanted()}
        else:
            read = {key: self._read_val(indices, *key) for key in self._wanted()}

        def tensor(layer: int, kind: str) -> torch.Tensor | None:
            return read.get((layer, kind))

        features = [
            BlockFeatures(tensor(layer, "out"), attn=tensor(layer, "attn")) for layer in self.layers
        ]
        return FeatureBatch(
            features=features,
            labels=torch.from_numpy(self.labels[indices]),
            indices=torch.from_numpy(self.delivered[indices]),
        )

    def _wanted(self) -> tuple[FeatureRead, ...]:
        """Distinct (block, kind) pairs to read (a block read by two layers is read once)."""
        return self.reads

    def _read_train(
        self, indices: np.ndarray, views: np.ndarray, layer: int, kind: str
    ) -> torch.Tensor:
        """One view per item: (N, T, L, C) or, for ``attn``, (N, 2, T-1, P, P)."""
        shape = self.entries[(0, layer, kind)].shape[1:]
        out = np.empty((len(indices), *shape), dtype=np.float32)
        for view in np.unique(views):
            rows = np.flatnonzero(views == view)
            self.entries[(int(view), layer, kind)].gather_into(indices[rows], out, rows)
        return torch.from_numpy(out)

    def _read_val(self, indices: np.ndarray, layer: int, kind: str) -> torch.Tensor:
        """Every view of each item: (N, V, T, L, C) or, for ``attn``, (N, V, 2, T-1, P, P)."""
        shape = self.entries[(0, layer, kind)].shape[1:]
        out = np.empty((len(indices), self.num_views, *shape), dtype=np.float32)
        rows = np.arange(len(indices))
        for view in range(self.num_views):
            self.entries[(view, layer, kind)].gather_into(indices, out[:, view], rows)
        return torch.from_numpy(out)

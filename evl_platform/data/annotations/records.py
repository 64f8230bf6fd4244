"""The records of a split, held in a few compact arrays.

A Kinetics-400 training split lists 240,000 videos. As one Python object per video (with a
``Path`` each) that is ~100 MiB per process, and a forked loader worker copies those pages as
soon as it reads them (every access writes a reference count). :class:`RecordTable` keeps the
ids and relative paths as two UTF-8 blobs with offsets, and the labels as one ``int32`` array:
a handful of objects, a few bytes per video, pickled as one copy of each buffer and shared
copy-on-write by forked workers (reading them writes nothing). Indexing returns a
:class:`VideoRecord` made on the spot.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np


@dataclass(frozen=True, slots=True)
class VideoRecord:
    """One labelled video.

    Attributes:
        video_id: stable id, the key of per-video score files.
        path: absolute path of the video file.
        label: class index into :attr:`Annotations.class_names`.
    """

    video_id: str
    path: Path
    label: int


class StringColumn:
    """Strings as one UTF-8 blob and ``int64`` offsets (string ``i`` is
    ``blob[offsets[i]:offsets[i + 1]]``)."""

    __slots__ = ("blob", "offsets")

    def __init__(self, blob: bytes, offsets: np.ndarray) -> None:
        self.blob, self.offsets = blob, offsets

    @classmethod
    def from_strings(cls, strings: Iterable[str]) -> StringColumn:
        """The column of ``strings``, in order."""
        encoded = [s.encode() for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
        return cls(b"".join(encoded), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        return self.blob[self.offsets[index] : self.offsets[index + 1]].decode()

    def __reduce__(self) -> tuple[Any, ...]:
        return StringColumn, (self.blob, self.offsets)


class RecordTable(Sequence[VideoRecord]):
    """The videos of one split: ids, paths relative to ``base``, labels.

    Args:
        base: absolute directory the relative paths are joined to (``""``: they are absolute).
        video_ids / paths: one string per video.
        labels: ``(N,)`` ``int32`` class indices.
    """

    __slots__ = ("base", "video_ids", "paths", "labels")

    def __init__(
        self, base: str, video_ids: StringColumn, paths: StringColumn, labels: np.ndarray
    ) -> None:
        if not len(video_ids) == len(paths) == len(labels):
            raise ValueError(
                f"columns differ in length: {len(video_ids)} ids, {len(paths)} paths, "
                f"{len(labels)} labels"
            )
        self.base, self.video_ids, self.paths, self.labels = base, video_ids, paths, labels

    @classmethod
    def from_columns(
        cls, base: str, video_ids: Sequence[str], paths: Sequence[str], labels: Sequence[int]
    ) -> RecordTable:
        """The table of parallel lists (``paths`` relative to ``base``)."""
        return cls(
            base,
            StringColumn.from_strings(video_ids),
            StringColumn.from_strings(paths),
            np.asarray(labels, dtype=np.int32).reshape(-1),
        )

    @classmethod
    def from_records(cls, records: Iterable[VideoRecord]) -> RecordTable:
        """The table of existing records (their paths kept as they are)."""
        records = list(records)
        return cls.from_columns(
            "",
            [r.video_id for r in records],
            [str(r.path) for r in records],
            [r.label for r in records],
        )

    def __len__(self) -> int:
        return len(self.labels)

    @overload
    def __getitem__(self, index: int) -> VideoRecord: ...

    @overload
    def __getitem__(self, index: slice) -> RecordTable: ...

    def __getitem__(self, index: int | slice) -> VideoRecord | RecordTable:
        if isinstance(index, slice):
            return self.take(range(len(self))[index])
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        index %= len(self)
        return VideoRecord(self.video_ids[index], Path(self.path(index)), int(self.labels[index]))

    def __iter__(self) -> Iterator[VideoRecord]:
        return (self[i] for i in range(len(self)))

    def path(self, index: int) -> str:
        """The absolute path of video ``index`` as a string (no ``Path`` made)."""
        return os.path.join(self.base, self.paths[index])

    def take(self, indices: Iterable[int]) -> RecordTable:
        """The table of the given positions, in their order."""
        indices = list(indices)
        return RecordTable.from_columns(
            self.base,
            [self.video_ids[i] for i in indices],
            [self.paths[i] for i in indices],
            self.labels[np.asarray(indices, dtype=np.int64)],
        )

    def digest(self) -> str:
        """sha256 of everything the table holds (milliseconds for 240k videos)."""
        digest = hashlib.sha256(self.base.encode() + b"\0")
        for array in (self.video_ids.offsets, self.paths.offsets, self.labels):
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(self.video_ids.blob)
        digest.update(self.paths.blob)
        return digest.hexdigest()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RecordTable) and other.base == self.base:
            return len(self) == len(other) and self.digest() == other.digest()
        if isinstance(other, Sequence) and not isinstance(other, str):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.digest())

    def __repr__(self) -> str:
        return f"RecordTable({len(self)} videos under {self.base!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return RecordTable, (self.base, self.video_ids, self.paths, self.labels)


@dataclass(frozen=True)
class Annotations:
    """The records of one split file and the class names their labels index.

    Attributes:
        source: absolute path of the annotation file.
        records: the videos, in file order (any sequence of :class:`VideoRecord` given here is
            stored as a :class:`RecordTable`).
        class_names: class name of each label index.
    """

    source: Path
    records: RecordTable
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.records, RecordTable):
            object.__setattr__(self, "records", RecordTable.from_records(self.records))

    @property
    def num_classes(self) -> int:
        """Number of classes (the classifier width the labels need)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)

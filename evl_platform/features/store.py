"""The on-disk feature cache: one directory per key, created atomically.

Layout: ``root/<key[:2]>/<key>/`` holds ``meta.json`` (key inputs, shape, dtype, shards),
``delivered.npy`` and ``labels.npy`` (the video each item actually holds, a replacement when the
listed one was unusable, and its label), and one ``shard-<start>-<stop>.npy`` per contiguous
range of items. An entry is written into a temporary sibling directory
(``.<key>.<random>.partial``) and renamed into place when complete; when two writers race, the
first rename wins and the other discards its copy. Readers only ever look at renamed entries,
and open shards with ``np.load(mmap_mode="r")`` so concurrent trials share the page cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from evl_platform.config import ExperimentConfig
from evl_platform.data.synth import default_cache_dir
from evl_platform.features.key import FORMAT_VERSION

META = "meta.json"
DELIVERED = "delivered.npy"
LABELS = "labels.npy"
PARTIAL_SUFFIX = ".partial"


def shard_name(start: int, stop: int) -> str:
    """File name of the shard holding items ``start`` to ``stop - 1``."""
    return f"shard-{start:09d}-{stop:09d}.npy"


def features_root(cfg: ExperimentConfig) -> Path:
    """``features.cache_dir``, else ``<cache>/features`` (see ``default_cache_dir``)."""
    if cfg.features.cache_dir:
        return Path(cfg.features.cache_dir).expanduser().resolve()
    return default_cache_dir() / "features"


class StoredEntry:
    """A complete cache entry, its shards opened lazily as read-only memory maps.

    Args:
        store: the store it belongs to (which bounds the number of open maps).
        path: the entry directory.
        meta: its parsed ``meta.json``.
    """

    def __init__(self, store: FeatureStore, path: Path, meta: dict[str, Any]) -> None:
        self.store = store
        self.path = path
        self.meta = meta
        self.key: str = meta["key"]
        self.shape: tuple[int, ...] = tuple(meta["shape"])  # (N, T, L, C) or (N, T, L, H, D)
        self.shards: list[tuple[int, int, str]] = [tuple(s) for s in meta["shards"]]
        self.starts = np.array([start for start, _, _ in self.shards], dtype=np.int64)

    def __len__(self) -> int:
        return self.shape[0]

    def delivered(self) -> np.ndarray:
        """Dataset position of the video each item holds: (N,) int64."""
        return np.load(self.path / DELIVERED)

    def labels(self) -> np.ndarray:
        """Label of the video each item holds: (N,) int64."""
        return np.load(self.path / LABELS)

    def gather_into(self, indices: np.ndarray, out: np.ndarray, rows: np.ndarray) -> None:
        """Sets ``out[rows[j]] = entry[indices[j]]``, reading each shard once, in index order.

        Args:
            indices: item positions to read, any order, repeats allowed.
            out: destination array, (M, *item_shape), any float dtype (values are cast).
            rows: destination row of each index.
        """
        order = np.argsort(indices, kind="stable")
        wanted = indices[order]
        if len(wanted) and (wanted[0] < 0 or wanted[-1] >= len(self)):
            raise IndexError(f"item index out of range for {len(self)} items in {self.path}")
        shard_of = np.searchsorted(self.starts, wanted, side="right") - 1
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        for group in np.split(np.arange(len(wanted)), bounds):
            if not len(group):
                continue
            shard = int(shard_of[group[0]])
            start, _, name = self.shards[shard]
            array = self.store.open_array(self.path / name)
            out[rows[order[group]]] = array[wanted[group] - start]


class FeatureStore:
    """Content-addressed directory of feature entries.

    Args:
        root: cache directory (created when first written).
        max_open: memory maps kept open at once (each holds a file descriptor).
    """

    def __init__(self, root: str | Path, *, max_open: int = 256) -> None:
        self.root = Path(root)
        self.max_open = max_open
        self._open: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_config(cls, cfg: ExperimentConfig) -> FeatureStore:
        """The store an experiment uses (:func:`features_root`)."""
        return cls(features_root(cfg))

    def __getstate__(self) -> dict[str, Any]:  # memory maps must not be pickled as arrays
        return {"root": self.root, "max_open": self.max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], max_open=state["max_open"])

    def path(self, key: str) -> Path:
        """Directory of the entry ``key``."""
        return self.root / key[:2] / key

    def has(self, key: str) -> bool:
        """Whether a complete entry ``key`` exists."""
        return self._read_meta(key) is not None

    def open(self, key: str) -> StoredEntry | None:
        """The complete entry ``key``, or ``None`` when there is none."""
        meta = self._read_meta(key)
        return None if meta is None else StoredEntry(self, self.path(key), meta)

    def begin(self, key: str) -> Path:
        """A new private temporary directory to write entry ``key`` into."""
        parent = self.path(key).parent
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=PARTIAL_SUFFIX, dir=parent))
        staging.chmod(parent.stat().st_mode & 0o777)  # mkdtemp's 0700 would stick
        return staging

    def commit(self, key: str, staging: Path, meta: dict[str, Any]) -> bool:
        """Writes ``meta.json`` into ``staging`` and renames it to the entry of ``key``.

        Returns:
            ``True`` when this call created the entry; ``False`` when another writer's complete
            entry was already in place (``staging`` is then discarded).
        """
        missing = [name for _, _, name in meta["shards"] if not (staging / name).is_file()]
        if missing:
            raise RuntimeError(f"{staging}: cannot commit {key}, shards missing: {missing[:3]}")
        meta = {"key": key, "format_version": FORMAT_VERSION, **meta}
        (staging / META).write_text(json.dumps(meta, indent=1, default=str) + "\n")
        try:
            os.rename(staging, self.path(key))
        except OSError as err:  # another writer renamed its copy into place first
            self.discard(staging)
            if not self.has(key):
                raise RuntimeError(f"{self.path(key)} exists but is incomplete; delete it") from err
            return False
        return True

    def discard(self, staging: Path) -> None:
        """Deletes a temporary directory."""
        shutil.rmtree(staging, ignore_errors=True)

    def partial_dirs(self) -> list[Path]:
        """Temporary directories present (being written, or left by a crashed writer)."""
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob(f"*/.*{PARTIAL_SUFFIX}"))

    def open_array(self, path: Path) -> np.ndarray:
        """A read-only memory map of a shard file, from a bounded cache of open maps."""
        with self._lock:
            array = self._open.get(path)
            if array is not None:
                self._open.move_to_end(path)
                return array
        array = np.load(path, mmap_mode="r")
        with self._lock:
            self._open[path] = array
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        return array

    def _read_meta(self, key: str) -> dict[str, Any] | None:
        try:
            meta = json.loads((self.path(key) / META).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            return None
        return meta

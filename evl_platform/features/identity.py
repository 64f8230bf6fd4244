"""The dataset part of a feature-cache key, computed once per dataset and kept in a sidecar.

A split's identity covers its annotation and label-map bytes and every listed video's path,
label, size and modification time (:func:`compute_identity`). Stat-ing 240,000 videos takes
seconds locally and minutes on a network file system, and every trial worker needs the
identity, so it is computed once and stored as JSON under ``<cache>/datasets/``
(:func:`sidecar_dir`, shared by every feature cache directory), named by what the records say
(format, files, root, the records' own digest, class order).
The stored identity is reused while its *listing* holds: the size and modification time of
the annotation file, the label map and every folder that holds a listed video. Adding,
removing, renaming or replacing a video (writing a new file and renaming it into place, as
encoders and ``data prepare`` do) changes its folder's modification time; only a video
rewritten in place, its folder untouched, goes unnoticed (delete the sidecar, or touch the
folder, after doing that).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from evl_platform.data.annotations import Annotations
from evl_platform.data.source import DatasetFiles
from evl_platform.data.synth import default_cache_dir

SIDECAR_VERSION = 1
"""Bump whenever what a sidecar holds, or how it is checked, changes."""

CLOCK_SLACK_NS = 10**9
"""A listed path modified this close to (or after) the start of a computation keeps the
result from being stored (file-system clocks may lag the system clock by a tick)."""

Listing = dict[str, list[int] | str]
"""Path -> ``[size, mtime_ns]``, or ``"missing"``."""


def sidecar_dir() -> Path:
    """Where sidecars are kept: ``datasets/`` in the platform's cache directory
    (``$EVL_PLATFORM_CACHE``, which a cluster sets on every node)."""
    return default_cache_dir() / "datasets"


def dataset_identity(
    annotations: Annotations, files: DatasetFiles, *, sidecar_dir: Path | None = None
) -> dict[str, Any]:
    """The split's identity (:func:`compute_identity`), from the sidecar under
    ``sidecar_dir`` while its listing holds, else computed and stored there.

    Args:
        annotations: the split's records (as read from ``files``).
        files: where the dataset's files are.
        sidecar_dir: the folder of sidecar files; ``None`` computes without one.
    """
    if sidecar_dir is None:
        return compute_identity(annotations, files)
    path = sidecar_dir / f"{sidecar_name(annotations, files)}.json"
    stored = _load(path)
    if stored is not None and stored.get("listing") == stat_listing(stored["listing"]):
        return stored["identity"]
    began = time.time_ns() - CLOCK_SLACK_NS
    identity, folders = _identity_and_folders(annotations, files)
    listed = [annotations.source, *([files.label_map] if files.label_map else []), *folders]
    listing = stat_listing(str(p) for p in listed)
    # a folder changed while its videos were stat-ed: keep no sidecar, the next reader computes
    if all(value == "missing" or value[1] < began for value in listing.values()):
        sidecar = {"version": SIDECAR_VERSION, "listing": listing, "identity": identity}
        _write_atomic(path, json.dumps(sidecar, separators=(",", ":")))
    return identity


def compute_identity(annotations: Annotations, files: DatasetFiles) -> dict[str, Any]:
    """The split's annotation and label-map bytes, and every listed video's path, label, size
    and modification time (a missing video contributes ``missing``): one ``stat`` per video."""
    return _identity_and_folders(annotations, files)[0]


def _identity_and_folders(
    annotations: Annotations, files: DatasetFiles
) -> tuple[dict[str, Any], set[str]]:
    """:func:`compute_identity`, and the folders that hold the videos."""
    videos = hashlib.sha256()
    folders: set[str] = set()
    table = annotations.records
    for i in range(len(table)):
        path = _path_str(table.path(i))
        folders.add(os.path.dirname(path))
        line = [table.video_ids[i], path, int(table.labels[i]), _stat_identity(path)]
        videos.update(json.dumps(line).encode() + b"\n")
    identity = {
        "format": files.format,
        "root": str(files.root) if files.root else None,
        "annotations": str(annotations.source),
        "annotations_sha256": file_sha256(annotations.source),
        "label_map_sha256": file_sha256(files.label_map) if files.label_map else None,
        "video_extension": files.video_extension,
        "num_videos": len(annotations.records),
        "videos_sha256": videos.hexdigest(),
    }
    return identity, folders


def _path_str(path: str) -> str:
    """``str(Path(path))`` (what identities have always hashed), without making a ``Path``
    when ``path`` is already in that form: no empty or ``.`` part, no trailing slash."""
    if "//" in path[1:] or "/./" in path or path.startswith("./") or path.endswith(("/", "/.")):
        return str(Path(path))
    return path


def sidecar_name(annotations: Annotations, files: DatasetFiles) -> str:
    """sha256 of what the records say: format, files, root, class order and the records'
    digest (so a changed annotation file or class order never meets an old sidecar)."""
    described = {
        "version": SIDECAR_VERSION,
        "format": files.format,
        "root": os.path.abspath(files.root) if files.root else None,
        "annotations": str(annotations.source),
        "label_map": os.path.abspath(files.label_map) if files.label_map else None,
        "video_extension": files.video_extension,
        "class_names": list(annotations.class_names),
        "records": annotations.records.digest(),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def stat_listing(paths: Iterable[str]) -> Listing:
    """``[size, mtime_ns]`` (or ``"missing"``) of each path, in sorted order."""
    return {path: _stat_identity(path) for path in sorted(paths)}


def _stat_identity(path: str | Path) -> list[int] | str:
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"
    return [stat.st_size, stat.st_mtime_ns]


def _load(path: Path) -> dict[str, Any] | None:
    """A sidecar of this version, or ``None`` (absent, unreadable or another version)."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("version") != SIDECAR_VERSION:
        return None
    return stored


def _write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a renamed temporary file; a cache folder that
    cannot be written only costs the next reader the computation."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(text)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (memoised per path, size and modification time)."""
    stat = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()

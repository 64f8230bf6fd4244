"""Annotation files of a prepared dataset, in the input's own format.

``data prepare`` writes every video to ``<out>/<name>.mp4`` (:func:`prepared_name`) and one
split file per split into ``<out>``, which :func:`evl_platform.data.annotations.read_annotations`
reads back with ``root=<out>`` to the same video ids and labels, minus the bad videos:

- ``evl_list``: ``train.txt`` / ``val.txt``, ``<id>.mp4 <label>`` per line (the id is the path
  as listed without its extension; an absolute or ``..`` path loses its leading ``/`` and
  ``..`` parts, so it stays inside the prepared root).
- ``kinetics_csv``: ``train.csv`` / ``val.csv`` with ``label,youtube_id,time_start,time_end,
  split``; the files lie flat in the root (no class folders).
- ``ssv2_json``: ``train.json`` / ``val.json``, the input's entries (every field kept).

``labels.json`` always fixes the training split's class order, so a class whose every video
was bad keeps its index.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Container
from pathlib import Path

from evl_platform.data.annotations import Annotations, save_label_map

PREPARED_EXTENSION = ".mp4"
LABEL_MAP = "labels.json"
_SUFFIX = {"evl_list": ".txt", "kinetics_csv": ".csv", "ssv2_json": ".json"}


def prepared_name(format: str, video_id: str) -> str:
    """The prepared file of a video, relative to the prepared root."""
    if format == "evl_list":
        parts = [p for p in Path(video_id).parts if p not in ("/", "..", ".") and p != os.sep]
        return os.path.join(*parts) + PREPARED_EXTENSION
    return video_id + PREPARED_EXTENSION


def split_file(format: str, split: str) -> str:
    """The name of a split's annotation file in the prepared root."""
    return split + _SUFFIX[format]


def write_split(
    format: str, split: str, annotations: Annotations, keep: Container[str], out_dir: Path
) -> Path:
    """Writes the annotation file of ``split`` listing the videos whose id is in ``keep``.

    Args:
        format: the input's ``data.format``.
        split: ``train`` or ``val`` (names the file, and the Kinetics ``split`` column).
        annotations: the split as read from the input.
        keep: ids of the videos that were prepared.
        out_dir: the prepared root.

    Returns:
        The file written (atomically: a rerun or a reader never sees half of it).
    """
    path = out_dir / split_file(format, split)
    records = [r for r in annotations.records if r.video_id in keep]
    names = annotations.class_names
    if format == "evl_list":
        text = "".join(f"{prepared_name(format, r.video_id)} {r.label}\n" for r in records)
    elif format == "kinetics_csv":
        text = _kinetics_text(split, [(r.video_id, names[r.label]) for r in records])
    else:
        entries = json.loads(annotations.source.read_text(encoding="utf-8-sig"))
        kept = [e for e in entries if str(e["id"]) in keep]
        text = json.dumps(kept, indent=1, ensure_ascii=False) + "\n"
    _write_atomically(path, text)
    return path


def write_label_map(class_names: tuple[str, ...], out_dir: Path) -> Path:
    """Writes ``labels.json`` (name -> index) with the training split's class order."""
    path = out_dir / LABEL_MAP
    save_label_map(class_names, path)
    return path


def _kinetics_text(split: str, rows: list[tuple[str, str]]) -> str:
    """A Kinetics CSV of (video id, label) rows; the id ``<youtube_id>_<start>_<end>`` is split
    back into its columns, so the reader derives the same id."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
    for video_id, label in rows:
        youtube_id, start, end = video_id.rsplit("_", 2)
        writer.writerow([label, youtube_id, int(start), int(end), split])
    return out.getvalue()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

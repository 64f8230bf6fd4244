"""Kinetics CSV files: ``label,youtube_id,time_start,time_end,split``."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from pathlib import Path

from evl_platform.data.annotations.build import RecordBuilder
from evl_platform.data.annotations.errors import AnnotationError, EntryProblem
from evl_platform.data.annotations.labels import given_classes
from evl_platform.data.annotations.records import Annotations
from evl_platform.data.annotations.text import extension_or, read_text

KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")
"""Columns a Kinetics CSV must have (the official files also carry ``split``)."""


def read_kinetics_csv(
    path: Path,
    *,
    root: Path | None = None,
    label_map: Path | None = None,
    class_names: tuple[str, ...] | None = None,
    video_extension: str | None = None,
) -> Annotations:
    """Reads a Kinetics CSV (``label,youtube_id,time_start,time_end,split``).

    Videos are ``{youtube_id}_{time_start:06d}_{time_end:06d}{ext}`` (default ``.mp4``) directly
    under the root, or under ``root/<label>/`` when only that copy exists. Classes:
    ``class_names``, else ``label_map``, else this file's labels sorted (the Kinetics
    convention). The video id is the file name without extension.
    """
    out = RecordBuilder(path, root, "line")
    rows = _kinetics_rows(out)
    labels = {label for _, label, _ in rows}
    names, source = given_classes(label_map, class_names) or (tuple(sorted(labels)), "")
    index = {name: i for i, name in enumerate(names)}
    ext = extension_or(video_extension, ".mp4")
    flat, in_subdir = class_subdir_files(out.base, labels)
    for line_no, label, video_id in rows:
        if label not in index:
            raise AnnotationError(f"{out.where(line_no)}: label {label!r} is not in {source}")
        name = video_id + ext
        if label in in_subdir and name in in_subdir[label] and name not in flat:
            name = f"{label}{os.sep}{name}"
        out.add(line_no, video_id, name, index[label])
    return out.finish(names)


def class_subdir_files(base: str, labels: Iterable[str]) -> tuple[set[str], dict[str, set[str]]]:
    """Names directly under ``base`` and under each ``base/<label>/`` directory.

    One ``stat`` per class, and one listing per class folder that exists (plus ``base``'s);
    nothing per video. Both empty, without listing anything, when no label has a folder (the
    flat layout) or a folder cannot be read (the layout is then taken as flat).
    """
    subdirs = [label for label in labels if os.path.isdir(os.path.join(base, label))]
    try:
        in_subdir = {label: set(os.listdir(os.path.join(base, label))) for label in subdirs}
        return (set(os.listdir(base)) if subdirs else set()), in_subdir
    except OSError:
        return set(), {}


def _kinetics_rows(out: RecordBuilder) -> list[tuple[int, str, str]]:
    """(line number, label, video id) of every data row of a Kinetics CSV."""
    reader = csv.reader(io.StringIO(read_text(out.path)))
    rows: list[tuple[int, str, str]] = []
    try:
        header = [name.strip() for name in next(reader)]
        missing = ", ".join(name for name in KINETICS_COLUMNS if name not in header)
        if missing:
            shown = ",".join(header)
            raise AnnotationError(f"{out.path}: missing column(s) {missing} (header: {shown})")
        columns = [header.index(name) for name in KINETICS_COLUMNS]
        for row in reader:
            if row and (len(row) > 1 or row[0].strip()):
                rows.append((reader.line_num, *_kinetics_row(row, header, columns)))
    except (csv.Error, EntryProblem) as err:
        raise AnnotationError(f"{out.where(reader.line_num)}: {err}") from None
    if not rows:
        raise AnnotationError(f"{out.path}: no rows after the header")
    return rows


def _kinetics_row(row: list[str], header: list[str], columns: list[int]) -> tuple[str, str]:
    """The (label, video id) of one row."""
    if len(row) != len(header):
        raise EntryProblem(f"expected {len(header)} fields ({','.join(header)}), got {len(row)}")
    label, youtube_id, start, end = (
        row[columns[0]].strip(),
        row[columns[1]].strip(),
        row[columns[2]].strip(),
        row[columns[3]].strip(),
    )
    if not label or not youtube_id:
        raise EntryProblem(f"empty {'label' if not label else 'youtube_id'}")
    start_s = _whole_seconds("time_start", start)
    end_s = _whole_seconds("time_end", end)
    return label, f"{youtube_id}_{start_s:06d}_{end_s:06d}"


def _whole_seconds(column: str, text: str) -> int:
    """Parses ``12`` or ``12.0`` as 12."""
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        value = float(text)
    except ValueError:
        raise EntryProblem(f"{column} {text!r} is not a number") from None
    if not value.is_integer() or value < 0:
        raise EntryProblem(f"{column} {text!r} is not a whole, non-negative number")
    return int(value)

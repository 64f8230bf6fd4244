"""Annotation readers for the official EVL list, Kinetics CSV and Something-Something-v2 JSON.

Each reader turns one split file into :class:`Annotations` (video ids, absolute paths, labels,
class names in index order), or raises a one-line :class:`AnnotationError` naming the file and
line or entry. Video files are not checked here (``evl-platform data check`` does that). A new
``data.format`` is a reader registered here in ``ANNOTATION_READERS`` plus its name in
``AnnotationFormat`` (``evl_platform/config/schema.py``); importing this module checks both agree.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evl_platform.config.schema import AnnotationFormat
from evl_platform.registry import Registry

KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")
"""Columns a Kinetics CSV must have (the official files also carry ``split``)."""


class AnnotationError(ValueError):
    """A bad annotation or label-map file; ``str(err)`` is one line: file, line/entry, problem."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*\n\s*", " ", message).strip())


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


@dataclass(frozen=True)
class Annotations:
    """The records of one split file and the class names their labels index.

    Attributes:
        source: absolute path of the annotation file.
        records: the videos, in file order.
        class_names: class name of each label index.
    """

    source: Path
    records: tuple[VideoRecord, ...]
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes (the classifier width the labels need)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)


class _Problem(Exception):
    """A problem with one line or entry; the reader prefixes where it is."""


class _Collector:
    """The records of one file (paths made absolute under ``base``, unique video ids) and how
    messages name its ``unit``s: ``"line"`` (text files) or ``"entry"`` (JSON lists, from 0)."""

    def __init__(self, path: Path, root: Path | None, unit: str) -> None:
        self.path, self.unit = path, unit
        self.base = os.path.abspath(root if root is not None else path.parent)
        self.records: list[VideoRecord] = []
        self.first: dict[str, int] = {}  # video id -> line or entry where it first occurs

    def where(self, number: int, video_id: str | None = None) -> str:
        """How messages name line (or entry) ``number``: ``train.csv:14``, ``x.json: entry 3``."""
        if self.unit == "line":
            return f"{self.path}:{number}"
        return f"{self.path}: entry {number}" + (f" (id {video_id})" if video_id else "")

    def add(self, number: int, video_id: str, rel: str, label: int) -> None:
        """Adds the record of line/entry ``number``; ``rel`` is relative to ``base``."""
        first = self.first.setdefault(video_id, number)
        if first != number:
            place = f"{'on line' if self.unit == 'line' else 'at entry'} {first}"
            raise AnnotationError(
                f"{self.where(number, video_id)}: duplicate video id {video_id!r} (first {place})"
            )
        self.records.append(VideoRecord(video_id, Path(os.path.join(self.base, rel)), label))

    def finish(self, class_names: tuple[str, ...]) -> Annotations:
        """The annotations of the file, with the given class order."""
        return Annotations(Path(os.path.abspath(self.path)), tuple(self.records), class_names)


ANNOTATION_READERS: Registry[Callable[..., Annotations]] = Registry("annotation format")


def read_annotations(
    path: str | Path,
    *,
    format: str,
    root: str | Path | None = None,
    label_map: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    video_extension: str | None = None,
) -> Annotations:
    """Reads one split file with the reader registered for ``format``.

    Args:
        path: the annotation file; error messages name it as given.
        format: a registered format (``evl_list``, ``kinetics_csv``, ``ssv2_json``).
        root: directory the video paths are relative to; default: the annotation file's.
        label_map: JSON ``{class name: index}`` fixing the class order (required for SSv2
            unless ``class_names`` is given).
        class_names: class order to use, e.g. the training split's for the validation split;
            takes precedence over ``label_map``.
        video_extension: video file extension for Kinetics (``.mp4``) and SSv2 (``.webm``);
            EVL list paths carry their own.

    Raises:
        KeyError: ``format`` is not registered.
        AnnotationError: the file is missing, malformed or names an unknown class.
    """
    return ANNOTATION_READERS.get(format)(
        Path(path),
        root=None if root is None else Path(root),
        label_map=None if label_map is None else Path(label_map),
        class_names=None if class_names is None else tuple(class_names),
        video_extension=video_extension,
    )


def read_label_map(path: str | Path) -> tuple[str, ...]:
    """Reads a JSON ``{class name: index}`` map (index an int or a decimal string, as in SSv2's
    ``labels.json``) and returns the class names in index order.

    Raises:
        AnnotationError: bad JSON, a non-integer or repeated index, a repeated name, or indices
            that are not exactly ``0..N-1``.
    """
    path = Path(path)
    data = _read_json(path, object_pairs_hook=_unique_keys(path))
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object {{class name: index}}, got {data!r}")
    if not data:
        raise AnnotationError(f"{path}: empty label map")
    by_index: dict[int, str] = {}
    for name, value in data.items():
        index = (
            int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else value
        )
        if type(index) is not int or index < 0:
            raise AnnotationError(
                f"{path}: index of {name!r} must be an int or a decimal string, got {value!r}"
            )
        if index in by_index:
            raise AnnotationError(f"{path}: {by_index[index]!r} and {name!r} share index {index}")
        by_index[index] = name
    missing = [str(index) for index in range(len(by_index)) if index not in by_index]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise AnnotationError(
            f"{path}: indices must be 0..{len(by_index) - 1}; missing {shown} (max {max(by_index)})"
        )
    return tuple(by_index[index] for index in range(len(by_index)))


def save_label_map(class_names: Sequence[str], path: str | Path) -> None:
    """Writes ``{class name: index}`` JSON in index order (ints, 2-space indent, final newline).

    Raises:
        AnnotationError: ``class_names`` is empty or repeats a name.
    """
    mapping = {name: index for index, name in enumerate(class_names)}
    if not mapping or len(mapping) != len(class_names):
        raise AnnotationError(f"{path}: class names must be non-empty and unique")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mapping, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@ANNOTATION_READERS.register("evl_list")
def read_evl_list(
    path: Path,
    *,
    root: Path | None = None,
    label_map: Path | None = None,
    class_names: tuple[str, ...] | None = None,
    video_extension: str | None = None,
) -> Annotations:
    """Reads an official EVL list file: ``<path> <label>`` per line (see :func:`read_annotations`).

    The path may contain spaces (the label is the last field); blank lines are skipped. The video
    id is the path as written without its extension. Without ``class_names`` or ``label_map``
    the classes are named ``"0"`` .. ``str(max label)``. ``video_extension`` is unused.
    """
    text = _read_text(path)
    given = _given_classes(label_map, class_names)
    out = _Collector(path, root, "line")
    for line_no, line in enumerate(text.split("\n"), 1):
        fields = line.rsplit(None, 1)
        if not fields:
            continue
        try:
            rel, label = _evl_line(fields, given)
        except _Problem as err:
            raise AnnotationError(f"{out.where(line_no)}: {err}") from None
        out.add(line_no, os.path.splitext(rel)[0], rel, label)
    max_label = max(record.label for record in out.records)
    return out.finish(given[0] if given else tuple(map(str, range(max_label + 1))))


def _evl_line(fields: list[str], given: tuple[tuple[str, ...], str] | None) -> tuple[str, int]:
    """The (path, label) of one non-blank line split at its last whitespace."""
    if len(fields) != 2:
        raise _Problem(f"expected '<path> <label>', got {fields[0].strip()!r}")
    rel, token = fields[0].strip(), fields[1]
    if not (token.isascii() and token.isdigit()):
        raise _Problem(f"label {token!r} is not a non-negative integer")
    label = int(token)
    if given is not None and label >= len(given[0]):
        raise _Problem(
            f"label {label} is out of range for the {len(given[0])} classes of {given[1]}"
        )
    return rel, label


@ANNOTATION_READERS.register("kinetics_csv")
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
    out = _Collector(path, root, "line")
    rows = _kinetics_rows(out)
    labels = {label for _, label, _ in rows}
    names, source = _given_classes(label_map, class_names) or (tuple(sorted(labels)), "")
    index = {name: i for i, name in enumerate(names)}
    ext = _extension(video_extension, ".mp4")
    flat, in_subdir = _class_subdir_files(out.base, labels)
    for line_no, label, video_id in rows:
        if label not in index:
            raise AnnotationError(f"{out.where(line_no)}: label {label!r} is not in {source}")
        name = video_id + ext
        if label in in_subdir and name in in_subdir[label] and name not in flat:
            name = os.path.join(label, name)
        out.add(line_no, video_id, name, index[label])
    return out.finish(names)


@ANNOTATION_READERS.register("ssv2_json")
def read_ssv2_json(
    path: Path,
    *,
    root: Path | None = None,
    label_map: Path | None = None,
    class_names: tuple[str, ...] | None = None,
    video_extension: str | None = None,
) -> Annotations:
    """Reads a Something-Something-v2 split (``train.json`` / ``validation.json``).

    An entry's class is its ``template`` without ``[`` and ``]``, looked up in ``labels.json``
    (``label_map``, required unless ``class_names`` is given). Videos are ``{id}{ext}`` (default
    ``.webm``); the video id is ``id``. Error messages number entries from 0.
    """
    given = _given_classes(label_map, class_names)
    if given is None:
        raise AnnotationError(f"{path}: ssv2_json needs a label map (labels.json: class -> index)")
    names, source = given
    index = {name: i for i, name in enumerate(names)}
    entries = _read_json(path)
    if not isinstance(entries, list) or not entries:
        problem = f"expected a JSON list of entries, got {type(entries).__name__}"
        raise AnnotationError(f"{path}: {problem if entries != [] else 'no entries'}")
    ext = _extension(video_extension, ".webm")
    out = _Collector(path, root, "entry")
    for number, entry in enumerate(entries):
        video_id = None
        try:
            video_id = _ssv2_id(entry)
            label = _ssv2_label(entry, index, source)
        except _Problem as err:
            raise AnnotationError(f"{out.where(number, video_id)}: {err}") from None
        out.add(number, video_id, video_id + ext, label)
    return out.finish(names)


ANNOTATION_READERS.check_names(AnnotationFormat, literal_name="AnnotationFormat", module=__name__)


def _ssv2_id(entry: Any) -> str:
    """The ``id`` of an entry (a JSON int is accepted too)."""
    if not isinstance(entry, dict):
        raise _Problem(f"expected an object with 'id' and 'template', got {entry!r}")
    video_id = entry.get("id")
    video_id = str(video_id) if type(video_id) is int else video_id
    if not isinstance(video_id, str) or not video_id.strip():
        raise _Problem(f"'id' must be a non-empty string, got {video_id!r}")
    return video_id


def _ssv2_label(entry: dict[str, Any], index: dict[str, int], source: str) -> int:
    """The class of an entry: its template without brackets, looked up in ``index``."""
    template = entry.get("template")
    if template is None:
        raise _Problem("no template (unlabelled, like the test split)")
    if not isinstance(template, str):
        raise _Problem(f"template must be a string, got {template!r}")
    plain = template.replace("[", "").replace("]", "")
    if plain not in index:
        raise _Problem(f"template {template!r} -> {plain!r} is not in {source}")
    return index[plain]


def _kinetics_rows(out: _Collector) -> list[tuple[int, str, str]]:
    """(line number, label, video id) of every data row of a Kinetics CSV."""
    reader = csv.reader(io.StringIO(_read_text(out.path)))
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
    except (csv.Error, _Problem) as err:
        raise AnnotationError(f"{out.where(reader.line_num)}: {err}") from None
    if not rows:
        raise AnnotationError(f"{out.path}: no rows after the header")
    return rows


def _kinetics_row(row: list[str], header: list[str], columns: list[int]) -> tuple[str, str]:
    """The (label, video id) of one row."""
    if len(row) != len(header):
        raise _Problem(f"expected {len(header)} fields ({','.join(header)}), got {len(row)}")
    label, youtube_id, start, end = (row[i].strip() for i in columns)
    if not label or not youtube_id:
        raise _Problem(f"empty {'label' if not label else 'youtube_id'}")
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
        raise _Problem(f"{column} {text!r} is not a number") from None
    if not value.is_integer() or value < 0:
        raise _Problem(f"{column} {text!r} is not a whole, non-negative number")
    return int(value)


def _class_subdir_files(base: str, labels: Iterable[str]) -> tuple[set[str], dict[str, set[str]]]:
    """Names directly under ``base`` and under each ``base/<label>/`` directory; both empty,
    without listing anything, when no label has a directory (the flat layout: one ``stat`` per
    class and none per video)."""
    subdirs = [label for label in labels if os.path.isdir(os.path.join(base, label))]
    try:
        in_subdir = {label: set(os.listdir(os.path.join(base, label))) for label in subdirs}
        return (set(os.listdir(base)) if subdirs else set()), in_subdir
    except OSError:  # an unreadable folder: treat the layout as flat
        return set(), {}


def _given_classes(
    label_map: Path | None, class_names: tuple[str, ...] | None
) -> tuple[tuple[str, ...], str] | None:
    """The class order fixed by the caller and how to name it in messages, or ``None``."""
    if class_names is not None:
        if len(set(class_names)) != len(class_names) or not class_names:
            raise ValueError("class_names must be non-empty and unique")
        return class_names, "the given class_names"
    if label_map is not None:
        return read_label_map(label_map), str(label_map)
    return None


def _unique_keys(path: Path) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A JSON ``object_pairs_hook`` rejecting a repeated key (``json`` keeps the last silently)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise AnnotationError(f"{path}: duplicate class name {key!r}")
            result[key] = value
        return result

    return hook


def _read_text(path: Path) -> str:
    """The file's text (UTF-8, optional BOM); missing, unreadable or blank files are errors."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise AnnotationError(f"{path}: cannot read ({err.strerror})") from None
    if not text.strip():
        raise AnnotationError(f"{path}: empty file")
    return text


def _read_json(path: Path, **kwargs: Any) -> Any:
    try:
        return json.loads(_read_text(path), **kwargs)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None


def _extension(video_extension: str | None, default: str) -> str:
    """``video_extension`` with a leading dot (``"mp4"`` -> ``".mp4"``), or ``default``."""
    if video_extension is None or video_extension.startswith("."):
        return default if video_extension is None else video_extension
    return f".{video_extension}" if video_extension else ""

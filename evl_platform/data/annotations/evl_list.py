"""The official EVL list format: ``<path> <label>`` per line."""

from __future__ import annotations

import os
from pathlib import Path

from evl_platform.data.annotations.build import RecordBuilder
from evl_platform.data.annotations.errors import AnnotationError, EntryProblem
from evl_platform.data.annotations.labels import GivenClasses, given_classes
from evl_platform.data.annotations.records import Annotations
from evl_platform.data.annotations.text import read_text


def read_evl_list(
    path: Path,
    *,
    root: Path | None = None,
    label_map: Path | None = None,
    class_names: tuple[str, ...] | None = None,
    video_extension: str | None = None,
) -> Annotations:
    """Reads an official EVL list file: ``<path> <label>`` per line (see
    :func:`~evl_platform.data.annotations.read_annotations`).

    The path may contain spaces (the label is the last field); blank lines are skipped. The video
    id is the path as written without its extension. Without ``class_names`` or ``label_map``
    the classes are named ``"0"`` .. ``str(max label)``. ``video_extension`` is unused.
    """
    text = read_text(path)
    given = given_classes(label_map, class_names)
    out = RecordBuilder(path, root, "line")
    for line_no, line in enumerate(text.split("\n"), 1):
        fields = line.rsplit(None, 1)
        if not fields:
            continue
        try:
            rel, label = _evl_line(fields, given)
        except EntryProblem as err:
            raise AnnotationError(f"{out.where(line_no)}: {err}") from None
        out.add(line_no, os.path.splitext(rel)[0], rel, label)
    return out.finish(given[0] if given else tuple(map(str, range(max(out.labels) + 1))))


def _evl_line(fields: list[str], given: GivenClasses | None) -> tuple[str, int]:
    """The (path, label) of one non-blank line split at its last whitespace."""
    if len(fields) != 2:
        raise EntryProblem(f"expected '<path> <label>', got {fields[0].strip()!r}")
    rel, token = fields[0].strip(), fields[1]
    if not (token.isascii() and token.isdigit()):
        raise EntryProblem(f"label {token!r} is not a non-negative integer")
    label = int(token)
    if given is not None and label >= len(given[0]):
        raise EntryProblem(
            f"label {label} is out of range for the {len(given[0])} classes of {given[1]}"
        )
    return rel, label

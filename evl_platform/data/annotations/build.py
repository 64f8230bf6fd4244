"""Collecting a file's records as a reader meets them."""

from __future__ import annotations

import os
from pathlib import Path

from evl_platform.data.annotations.errors import AnnotationError
from evl_platform.data.annotations.records import Annotations, RecordTable


class RecordBuilder:
    """The records of one file (paths relative to ``base``, video ids unique), and how
    messages name its ``unit`` s: ``"line"`` (text files) or ``"entry"`` (JSON lists, from 0).

    Args:
        path: the annotation file, as the user named it (messages show it so).
        root: directory the video paths are relative to; ``None``: the file's directory.
        unit: ``"line"`` or ``"entry"``.
    """

    def __init__(self, path: Path, root: Path | None, unit: str) -> None:
        self.path, self.unit = path, unit
        self.base = os.path.abspath(root if root is not None else path.parent)
        self.video_ids: list[str] = []
        self.paths: list[str] = []
        self.labels: list[int] = []
        self.first: dict[str, int] = {}  # video id -> line or entry where it first occurs

    def where(self, number: int, video_id: str | None = None) -> str:
        """How messages name line (or entry) ``number``: ``train.csv:14``, ``x.json: entry 3``."""
        if self.unit == "line":
            return f"{self.path}:{number}"
        return f"{self.path}: entry {number}" + (f" (id {video_id})" if video_id else "")

    def add(self, number: int, video_id: str, rel: str, label: int) -> None:
        """Adds the record of line/entry ``number``; ``rel`` is relative to ``base``.

        Raises:
            AnnotationError: ``video_id`` was already added (names both places).
        """
        first = self.first.setdefault(video_id, number)
        if first != number:
            place = f"{'on line' if self.unit == 'line' else 'at entry'} {first}"
            raise AnnotationError(
                f"{self.where(number, video_id)}: duplicate video id {video_id!r} (first {place})"
            )
        self.video_ids.append(video_id)
        self.paths.append(rel)
        self.labels.append(label)

    def finish(self, class_names: tuple[str, ...]) -> Annotations:
        """The annotations of the file, with the given class order."""
        table = RecordTable.from_columns(self.base, self.video_ids, self.paths, self.labels)
        return Annotations(Path(os.path.abspath(self.path)), table, class_names)

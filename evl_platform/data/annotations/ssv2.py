"""Something-Something-v2 splits: a JSON list of ``{id, template, ...}`` entries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evl_platform.data.annotations.build import RecordBuilder
from evl_platform.data.annotations.errors import AnnotationError, EntryProblem
from evl_platform.data.annotations.labels import given_classes
from evl_platform.data.annotations.records import Annotations
from evl_platform.data.annotations.text import extension_or, read_json


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
    given = given_classes(label_map, class_names)
    if given is None:
        raise AnnotationError(f"{path}: ssv2_json needs a label map (labels.json: class -> index)")
    names, source = given
    index = {name: i for i, name in enumerate(names)}
    entries = read_json(path)
    if not isinstance(entries, list) or not entries:
        problem = f"expected a JSON list of entries, got {type(entries).__name__}"
        raise AnnotationError(f"{path}: {problem if entries != [] else 'no entries'}")
    ext = extension_or(video_extension, ".webm")
    out = RecordBuilder(path, root, "entry")
    for number, entry in enumerate(entries):
        video_id = None
        try:
            video_id = _ssv2_id(entry)
            label = _ssv2_label(entry, index, source)
        except EntryProblem as err:
            raise AnnotationError(f"{out.where(number, video_id)}: {err}") from None
        out.add(number, video_id, video_id + ext, label)
    return out.finish(names)


def _ssv2_id(entry: Any) -> str:
    """The ``id`` of an entry (a JSON int is accepted too)."""
    if not isinstance(entry, dict):
        raise EntryProblem(f"expected an object with 'id' and 'template', got {entry!r}")
    video_id = entry.get("id")
    video_id = str(video_id) if type(video_id) is int else video_id
    if not isinstance(video_id, str) or not video_id.strip():
        raise EntryProblem(f"'id' must be a non-empty string, got {video_id!r}")
    return video_id


def _ssv2_label(entry: dict[str, Any], index: dict[str, int], source: str) -> int:
    """The class of an entry: its template without brackets, looked up in ``index``."""
    template = entry.get("template")
    if template is None:
        raise EntryProblem("no template (unlabelled, like the test split)")
    if not isinstance(template, str):
        raise EntryProblem(f"template must be a string, got {template!r}")
    plain = template.replace("[", "").replace("]", "")
    if plain not in index:
        raise EntryProblem(f"template {template!r} -> {plain!r} is not in {source}")
    return index[plain]

"""Label maps: JSON ``{class name: index}`` files, and the class order a caller fixes."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from evl_platform.data.annotations.errors import AnnotationError
from evl_platform.data.annotations.text import read_json


def read_label_map(path: str | Path) -> tuple[str, ...]:
    """Reads a JSON ``{class name: index}`` map (index an int or a decimal string, as in SSv2's
    ``labels.json``) and returns the class names in index order.

    Raises:
        AnnotationError: bad JSON, a non-integer or repeated index, a repeated name, or indices
            that are not exactly ``0..N-1``.
    """
    path = Path(path)
    data = read_json(path, object_pairs_hook=_unique_keys(path))
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


GivenClasses = tuple[tuple[str, ...], str]
"""A class order fixed by the caller, and how messages name where it came from."""


def given_classes(
    label_map: Path | None, class_names: tuple[str, ...] | None
) -> GivenClasses | None:
    """The class order fixed by ``class_names`` (first) or ``label_map``, or ``None``.

    Raises:
        ValueError: ``class_names`` is empty or repeats a name.
        AnnotationError: a bad label map (:func:`read_label_map`).
    """
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

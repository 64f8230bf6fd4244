"""Reading an annotation file's text or JSON, and the video extension its paths get."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evl_platform.data.annotations.errors import AnnotationError


def read_text(path: Path) -> str:
    """The file's text (UTF-8, optional BOM).

    Raises:
        AnnotationError: the file is missing, unreadable, not UTF-8 or blank.
    """
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


def read_json(path: Path, **kwargs: Any) -> Any:
    """The file's JSON (``kwargs`` go to :func:`json.loads`).

    Raises:
        AnnotationError: as :func:`read_text`, or invalid JSON (names its line and column).
    """
    try:
        return json.loads(read_text(path), **kwargs)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None


def extension_or(given: str | None, default: str) -> str:
    """``given`` with a leading dot (``"mp4"`` -> ``".mp4"``; ``""`` stays ``""``), or
    ``default`` when ``None``."""
    if given is None or given.startswith("."):
        return default if given is None else given
    return f".{given}" if given else ""

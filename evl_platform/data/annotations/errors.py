"""The errors annotation readers raise."""

from __future__ import annotations

import re


class AnnotationError(ValueError):
    """A bad annotation or label-map file; ``str(err)`` is one line: file, line/entry, problem."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*\n\s*", " ", message).strip())


class EntryProblem(Exception):
    """A problem with one line or entry; the reader turns it into an :class:`AnnotationError`
    that says where it is (:meth:`~evl_platform.data.annotations.build.RecordBuilder.where`)."""

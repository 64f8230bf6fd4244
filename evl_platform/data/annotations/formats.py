"""The registry of annotation formats and :func:`read_annotations`, which dispatches on it.

A new ``data.format`` is a reader function (the signature of :func:`read_annotations` after
``path``, in a module of its own beside ``kinetics.py``) registered here in
``ANNOTATION_READERS``, plus its name in ``AnnotationFormat``
(``evl_platform/config/schema.py``); importing this module checks both agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from evl_platform.config.schema import AnnotationFormat
from evl_platform.data.annotations.evl_list import read_evl_list
from evl_platform.data.annotations.kinetics import read_kinetics_csv
from evl_platform.data.annotations.records import Annotations
from evl_platform.data.annotations.ssv2 import read_ssv2_json
from evl_platform.registry import Registry

ANNOTATION_READERS: Registry[Callable[..., Annotations]] = Registry("annotation format")
ANNOTATION_READERS.register("evl_list")(read_evl_list)
ANNOTATION_READERS.register("kinetics_csv")(read_kinetics_csv)
ANNOTATION_READERS.register("ssv2_json")(read_ssv2_json)
ANNOTATION_READERS.check_names(AnnotationFormat, literal_name="AnnotationFormat", module=__name__)


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

    Video files are not opened or checked here (``evl-platform data check`` does that); only
    the Kinetics reader lists the class folders to find where the videos are.

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

"""Annotation readers for the official EVL list, Kinetics CSV and Something-Something-v2 JSON.

Each reader turns one split file into :class:`Annotations` (video ids, absolute paths, labels,
class names in index order, held compactly: :class:`RecordTable`), or raises a one-line
:class:`AnnotationError` naming the file and line or entry. Video files are not checked here
(``evl-platform data check`` does that). The modules, by job:

- ``records.py``: :class:`VideoRecord`, the compact :class:`RecordTable`, :class:`Annotations`;
- ``build.py``: collecting a file's records (unique ids, where each came from);
- ``formats.py``: the format registry and :func:`read_annotations`;
- ``evl_list.py``, ``kinetics.py``, ``ssv2.py``: one reader each;
- ``labels.py``: label-map files; ``text.py``: reading the files; ``errors.py``.
"""

from evl_platform.data.annotations.errors import AnnotationError
from evl_platform.data.annotations.evl_list import read_evl_list
from evl_platform.data.annotations.formats import ANNOTATION_READERS, read_annotations
from evl_platform.data.annotations.kinetics import KINETICS_COLUMNS, read_kinetics_csv
from evl_platform.data.annotations.labels import read_label_map, save_label_map
from evl_platform.data.annotations.records import Annotations, RecordTable, VideoRecord
from evl_platform.data.annotations.ssv2 import read_ssv2_json

__all__ = [
    "ANNOTATION_READERS",
    "KINETICS_COLUMNS",
    "AnnotationError",
    "Annotations",
    "RecordTable",
    "VideoRecord",
    "read_annotations",
    "read_evl_list",
    "read_kinetics_csv",
    "read_label_map",
    "read_ssv2_json",
    "save_label_map",
]

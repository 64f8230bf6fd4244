"""From an experiment config to the files of its dataset and to ready datasets.

Real datasets name their files in ``data.*``. A synthetic stand-in (``data.dataset`` is
``synthetic-motion`` or ``synthetic-appearance`` with ``data.root`` null) is generated on first
use into the cache directory and reused afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from evl_platform.config import DataConfig, ExperimentConfig, SyntheticConfig
from evl_platform.data.annotations import Annotations, read_annotations
from evl_platform.data.dataset import VideoDataset
from evl_platform.data.errors import DataSourceError
from evl_platform.data.synth import SYNTHETIC_DATASETS, SynthParams, ensure_synthetic

Split = Literal["train", "val"]


@dataclass(frozen=True)
class DatasetFiles:
    """Where a dataset's annotations and videos are."""

    dataset: str
    format: str
    root: Path | None
    train_annotations: Path
    val_annotations: Path
    label_map: Path | None
    video_extension: str | None

    def annotations(self, split: Split) -> Path:
        """The annotation file of ``split``."""
        return self.train_annotations if split == "train" else self.val_annotations


def synth_params(s: SyntheticConfig) -> SynthParams:
    """Generation settings of a stand-in from its config (``data.synthetic``)."""
    return SynthParams(
        clips_per_class=s.clips_per_class,
        val_clips_per_class=s.val_clips_per_class,
        num_frames=s.video_frames,
        width=s.width,
        height=s.height,
        fps=s.fps,
        codec=s.codec,
        keyframe_interval=s.keyframe_interval,
        seed=s.seed,
    )


def is_synthetic(data: DataConfig) -> bool:
    """Whether ``data`` asks for a generated stand-in rather than files on disk."""
    return data.dataset in SYNTHETIC_DATASETS and data.root is None


def resolve_files(data: DataConfig, *, progress: bool = True) -> DatasetFiles:
    """The dataset's files, generating a synthetic stand-in first if needed."""
    if is_synthetic(data):
        layout = ensure_synthetic(data.dataset, synth_params(data.synthetic), progress=progress)
        if layout.format != data.format:
            raise DataSourceError(
                f"data.format: {data.dataset} is written as {layout.format}, got {data.format}"
            )
        return DatasetFiles(
            dataset=data.dataset,
            format=layout.format,
            root=layout.root,
            train_annotations=layout.train_annotations,
            val_annotations=layout.val_annotations,
            label_map=layout.label_map,
            video_extension=data.video_extension or layout.video_extension,
        )
    missing = [k for k in ("train_annotations", "val_annotations") if getattr(data, k) is None]
    if missing:
        stand_ins = ", ".join(SYNTHETIC_DATASETS)
        raise DataSourceError(
            f"data.{missing[0]} is not set, and data.dataset {data.dataset!r} is not a "
            f"synthetic stand-in ({stand_ins}) that could be generated"
        )
    for key in ("train_annotations", "val_annotations", "label_map", "root"):
        value = getattr(data, key)
        if value is not None and not Path(value).exists():
            raise DataSourceError(f"data.{key}: {value} does not exist")
    return DatasetFiles(
        dataset=data.dataset,
        format=data.format,
        root=Path(data.root) if data.root else None,
        train_annotations=Path(data.train_annotations),
        val_annotations=Path(data.val_annotations),
        label_map=Path(data.label_map) if data.label_map else None,
        video_extension=data.video_extension,
    )


def read_split(
    files: DatasetFiles, split: Split, *, class_names: tuple[str, ...] | None = None
) -> Annotations:
    """Reads one split; pass the training split's ``class_names`` when reading validation."""
    return read_annotations(
        files.annotations(split),
        format=files.format,
        root=files.root,
        label_map=files.label_map,
        class_names=class_names,
        video_extension=files.video_extension,
    )


def read_splits(
    data: DataConfig, *, progress: bool = True, files: DatasetFiles | None = None
) -> dict[Split, Annotations]:
    """Both splits, validation in the training split's class order, checked against
    ``data.num_classes``; pass ``files`` when they are already resolved."""
    files = files or resolve_files(data, progress=progress)
    train = read_split(files, "train")
    if len(train.class_names) != data.num_classes:
        raise DataSourceError(
            f"data.num_classes is {data.num_classes} but {train.source} defines "
            f"{len(train.class_names)} classes"
        )
    return {"train": train, "val": read_split(files, "val", class_names=train.class_names)}


def image_size(cfg: ExperimentConfig) -> int:
    """The clip size in pixels: the backbone's input size
    (:attr:`evl_platform.models.backbone.BackboneSpec.image_size`, for every model family)."""
    from evl_platform.models.backbone import backbone_spec

    return backbone_spec(cfg.model.backbone.name).image_size


def create_dataset(cfg: ExperimentConfig, annotations: Annotations, *, train: bool) -> VideoDataset:
    """A :class:`VideoDataset` of one split with the experiment's sampling and transforms."""
    return VideoDataset(
        annotations, data=cfg.data, image_size=image_size(cfg), train=train, seed=cfg.seed
    )

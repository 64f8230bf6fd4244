"""Content-addressed keys of cached backbone features.

One cache entry holds one tensor kind (``out``, or ``attn``: T-CA's attention maps between
adjacent frames) of one backbone block for one view of every video of a split. Its key is the
sha256 of a readable dict of everything that changes those numbers: the dataset files (their
identity computed once per dataset, :mod:`evl_platform.features.identity`), the
backbone and its weights, the clip sampling and decoding, the view set and view index, the
block, the kind and the storage dtype. Variants that read other blocks or toggle T-CA
therefore share the entries they have in common. :func:`extraction_identity` names, from the
config alone, the set of entries an experiment reads (a sweep extracts once per identity).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from evl_platform.config import DataConfig, ExperimentConfig, TestViewsConfig
from evl_platform.config.schema import is_weights_path
from evl_platform.data.annotations import Annotations
from evl_platform.data.source import DatasetFiles, Split, image_size
from evl_platform.features.identity import dataset_identity, file_sha256, sidecar_dir
from evl_platform.models.backbone import backbone_spec
from evl_platform.models.evl import feature_block_indices
from evl_platform.models.temporal import enabled_temporal_modules

FORMAT_VERSION = 2
"""Bump whenever what is stored for a key, or how, changes (2: the decoder scales frames to
the size the transforms use, so features from full-size decoding are not reused)."""

TensorKind = Literal["out", "attn"]
SPLITS: tuple[Split, ...] = ("train", "val")


@dataclass(frozen=True)
class EntryRef:
    """One cache entry: a tensor kind of one block for one view of a split's videos.

    Attributes:
        split: ``train`` or ``val``.
        view: view index in the split's view set (temporal-major).
        layer: non-negative backbone block index.
        kind: ``out`` (block output) or ``attn`` (T-CA's maps between adjacent frames,
            :func:`~evl_platform.models.temporal.adjacent_attention`).
        key: sha256 hex digest of :attr:`inputs`.
        inputs: the readable key inputs (saved in the entry's ``meta.json``).
    """

    split: Split
    view: int
    layer: int
    kind: TensorKind
    key: str
    inputs: dict[str, Any]


def view_set(cfg: ExperimentConfig, split: Split) -> TestViewsConfig:
    """Views cached per video: the test views for ``val``; ``features.train_views`` temporal x
    1 spatial for ``train``."""
    if split == "val":
        return cfg.data.test_views
    return TestViewsConfig(temporal=cfg.features.train_views, spatial=1)


def view_data(cfg: ExperimentConfig, split: Split) -> DataConfig:
    """The data config whose test views are the split's cached view set."""
    return cfg.data.model_copy(update={"test_views": view_set(cfg, split)})


def decoder_layers(cfg: ExperimentConfig) -> tuple[int, ...]:
    """Non-negative block index read by each decoder layer, in decoder order (may repeat)."""
    num_blocks = backbone_spec(cfg.model.backbone.name).vision_cfg["layers"]
    return feature_block_indices(cfg.model.decoder, num_blocks)


def tensor_kinds(cfg: ExperimentConfig) -> tuple[TensorKind, ...]:
    """``out``, plus what the enabled temporal modules read (``attn`` for T-CA's maps)."""
    modules = enabled_temporal_modules(cfg.model.decoder)
    return ("out", *sorted({kind for _, module in modules for kind in module.reads}))


FeatureRead = tuple[int, TensorKind]
"""One tensor a decoder reads from the cache: ``(block, kind)``."""


def feature_reads(cfg: ExperimentConfig) -> tuple[FeatureRead, ...]:
    """The distinct ``(block, kind)`` pairs the experiment's decoder reads, sorted."""
    return tuple(sorted({(b, k) for b in decoder_layers(cfg) for k in tensor_kinds(cfg)}))


def split_entries(
    cfg: ExperimentConfig,
    split: Split,
    annotations: Annotations,
    files: DatasetFiles,
    *,
    reads: Sequence[FeatureRead] | None = None,
) -> list[EntryRef]:
    """Every entry the experiment reads for ``split``: views x its :func:`feature_reads` (or
    the given ``reads``: what a pack of decoders on this backbone reads together)."""
    base = split_inputs(cfg, split, annotations, files)
    return [
        entry_ref(base, view=view, layer=layer, kind=kind)
        for view, layer, kind in entry_coordinates(cfg, split, reads=reads)
    ]


def entry_coordinates(
    cfg: ExperimentConfig, split: Split, *, reads: Sequence[FeatureRead] | None = None
) -> list[tuple[int, int, TensorKind]]:
    """``(view, block, kind)`` of every entry the experiment (or ``reads``) reads for
    ``split``."""
    pairs = feature_reads(cfg) if reads is None else sorted(set(reads))
    return [
        (view, layer, kind) for view in range(view_set(cfg, split).total) for layer, kind in pairs
    ]


def extraction_identity(cfg: ExperimentConfig) -> str:
    """What the experiment's extraction writes (and its training reads), from the config alone.

    The sha256 of the cache directory, the whole ``data`` section (it picks the dataset's
    files, which are only read at extraction), and per split the key inputs that do not
    depend on those files (:func:`config_inputs`) with the coordinates of every entry.
    Experiments with equal identities read the same cache entries.
    """
    described = {
        "cache_dir": cfg.features.cache_dir,
        "data": cfg.data.model_dump(mode="json"),
        "splits": {
            split: {"inputs": config_inputs(cfg, split), "entries": entry_coordinates(cfg, split)}
            for split in SPLITS
        },
    }
    blob = json.dumps(described, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def entry_ref(base: dict[str, Any], *, view: int, layer: int, kind: TensorKind) -> EntryRef:
    """Adds the per-entry fields to a split's shared key inputs and hashes them."""
    inputs = {**base, "view": view, "layer": layer, "kind": kind}
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()
    return EntryRef(base["split"], view, layer, kind, key, inputs)


def split_inputs(
    cfg: ExperimentConfig, split: Split, annotations: Annotations, files: DatasetFiles
) -> dict[str, Any]:
    """Key inputs shared by all entries of a split: :func:`config_inputs` and the dataset's
    identity (:func:`~evl_platform.features.identity.dataset_identity`, kept in a sidecar
    under :func:`~evl_platform.features.identity.sidecar_dir`)."""
    identity = dataset_identity(annotations, files, sidecar_dir=sidecar_dir())
    return {**config_inputs(cfg, split), "dataset": identity}


def config_inputs(cfg: ExperimentConfig, split: Split) -> dict[str, Any]:
    """The key inputs of a split's entries that the config alone decides (all but the
    dataset's files): format version, split, backbone and weights, clips, views, dtype."""
    data, backbone = cfg.data, cfg.model.backbone
    views = view_set(cfg, split)
    return {
        "format_version": FORMAT_VERSION,
        "split": split,
        "backbone": {
            "name": backbone.name,
            "vision_cfg": backbone_spec(backbone.name).vision_cfg,
            "weights": weights_identity(cfg),
            "quick_gelu": backbone.quick_gelu,
            "dtype": backbone.dtype,
        },
        "clips": {
            "num_frames": data.num_frames,
            "sampling": data.sampling,
            "stride": data.stride,
            "min_frames": data.min_frames or data.num_frames,
            "decoder": data.decoder,
            "image_size": image_size(cfg),
        },
        "views": {"temporal": views.temporal, "spatial": views.spatial},
        "storage_dtype": cfg.features.dtype,
    }


def weights_identity(cfg: ExperimentConfig) -> str:
    """The backbone weights: ``random:<init>:<init_seed>`` (``init`` names the registered
    init scheme, e.g. ``dct-sincos-v2``), ``sha256:<digest>`` of a local weights file, or
    ``open_clip:<name>:<tag>``."""
    backbone = cfg.model.backbone
    if backbone.pretrained is None:
        return f"random:{backbone_spec(backbone.name).init}:{backbone.init_seed}"
    if is_weights_path(backbone.pretrained):
        return f"sha256:{file_sha256(backbone.pretrained)}"
    return f"open_clip:{backbone.name}:{backbone.pretrained}"

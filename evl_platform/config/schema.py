"""Typed, frozen experiment configuration.

Every YAML file is validated into :class:`ExperimentConfig` once, at the boundary; code inside a
process only ever sees these models. Unknown keys are rejected (``extra="forbid"``) so a typo can
never silently fall back to a default.

This module is the lowest layer (no torch; models and data import it, never the reverse), so
it cannot read the registries of the layers above. The ``Literal`` types below that name
registry entries list the same names, and each registry checks at import that they agree
(:meth:`evl_platform.registry.Registry.check_names`), naming the file to edit when not:

- ``FeatureShape``: ``FEATURE_SHAPES`` in ``evl_platform/models/decoder.py``;
- ``AnnotationFormat``: ``ANNOTATION_READERS`` in ``evl_platform/data/annotations/formats.py``;
- ``VideoDecoder``: ``DECODERS`` in ``evl_platform/data/decode.py``;
- ``ModelArch``: ``MODEL_BUILDERS`` in ``evl_platform/models/evl.py``;
- :data:`TemporalModuleSwitch` fields of :class:`DecoderConfig`: ``TEMPORAL_MODULES`` in
  ``evl_platform/models/temporal.py``, one module per field, under the field's name.

Backbone names have no ``Literal``: ``model.backbone.name`` is any open_clip ViT name, and the
registered backbones (``BACKBONES`` in ``evl_platform/models/backbone.py``) are the only list.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Profile = Literal["local", "rehearsal", "paper"]
BackboneMode = Literal["frozen", "finetune"]
BackboneDtype = Literal["float32", "float16", "bfloat16"]
FeatureShape = Literal["spatiotemporal", "temporal_token", "temporal_avg", "spatial_avg"]
SamplingMode = Literal["dense", "uniform"]
AnnotationFormat = Literal["evl_list", "kinetics_csv", "ssv2_json"]
VideoDecoder = Literal["decord", "pyav", "torchcodec"]
AmpDtype = Literal["none", "float16", "bfloat16"]
VideoCodec = Literal["h264", "vp9"]
ModelArch = Literal["evl", "cnn3d"]

TEMPORAL_MODULE = "temporal module"
"""The metadata that marks a :data:`TemporalModuleSwitch` field."""
TemporalModuleSwitch = Annotated[bool, TEMPORAL_MODULE]
"""A :class:`DecoderConfig` field that turns on the temporal module registered under the field's
name in ``evl_platform/models/temporal.py`` (``TEMPORAL_MODULES``)."""


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def is_weights_path(pretrained: str) -> bool:
    """Whether a ``model.backbone.pretrained`` value names a local file, not an open_clip tag.

    A path contains ``/`` or ends with a weights suffix; ``openai`` or ``laion2b_s34b_b88k`` are
    tags, and so are ``hf-hub:`` and URL values, which open_clip resolves itself.
    """
    if pretrained.startswith("hf-hub:") or "://" in pretrained:
        return False
    return "/" in pretrained or pretrained.endswith(WEIGHT_SUFFIXES)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneConfig(_Frozen):
    """The CLIP image encoder.

    Attributes:
        name: a registered backbone (``evl-platform model-info --list-backbones``) or any
            open_clip ViT model name such as ``ViT-B-16``.
        pretrained: ``None`` for seeded random init, an open_clip pretrained tag (``openai``),
            or a path to a local weights file.
        mode: ``frozen`` (eval, no gradients, no autograd graph) or ``finetune``.
        dtype: storage and compute dtype of a frozen backbone; a finetuned one is float32.
        quick_gelu: use QuickGELU activations, as OpenAI's CLIP weights were trained with.
        init_seed: seed of the random init when ``pretrained`` is ``None``.
    """

    name: str = "tiny-vit"
    pretrained: str | None = None
    mode: BackboneMode = "frozen"
    dtype: BackboneDtype = "float32"
    quick_gelu: bool = True
    init_seed: int = 0

    @model_validator(mode="after")
    def _finetune_is_fp32(self) -> BackboneConfig:
        if self.mode == "finetune" and self.dtype != "float32":
            raise ValueError(
                f"dtype {self.dtype!r} is only for a frozen backbone; a finetuned backbone is "
                "float32 (use train.amp for mixed precision)"
            )
        return self


class DecoderConfig(_Frozen):
    """The EVL Transformer decoder and its local temporal modules (paper section 3).

    Attributes:
        num_layers: decoder depth M.
        feature_layers: backbone block index read by each decoder layer (negative counts from
            the end); ``None`` means the last M blocks, ``[-M, ..., -1]``.
        num_heads: attention heads; ``None`` uses the backbone's head count.
        mlp_ratio: MLP expansion factor.
        mlp_dropout: dropout inside the decoder MLP.
        temporal_conv: T-Conv, depthwise temporal convolution.
        temporal_pos_embed: T-PE, learned temporal position embedding.
        temporal_cross_attn: T-CA, attention maps between adjacent frames.
            Each of the three is a :data:`TemporalModuleSwitch`: it turns on the module
            registered under its name in ``evl_platform/models/temporal.py``.
        feature_shape: Table 6c feature reduction fed to the decoder.
    """

    num_layers: int = Field(4, ge=1)
    feature_layers: tuple[int, ...] | None = None
    num_heads: int | None = Field(None, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    mlp_dropout: float = Field(0.5, ge=0, lt=1)
    temporal_conv: TemporalModuleSwitch = True
    temporal_pos_embed: TemporalModuleSwitch = True
    temporal_cross_attn: TemporalModuleSwitch = False
    feature_shape: FeatureShape = "spatiotemporal"

    @model_validator(mode="after")
    def _one_layer_index_per_decoder_layer(self) -> DecoderConfig:
        if self.feature_layers is not None and len(self.feature_layers) != self.num_layers:
            raise ValueError(
                f"feature_layers has {len(self.feature_layers)} entries but num_layers is "
                f"{self.num_layers}; give one backbone layer per decoder layer"
            )
        return self

    def configured_feature_layers(self) -> tuple[int, ...]:
        """The backbone layers the decoder layers read, in decoder order, as configured
        (negative counts from the end; the default is the last ``num_layers`` blocks).
        :func:`evl_platform.models.evl.feature_block_indices` checks them against a backbone
        and turns them into block indices."""
        if self.feature_layers is not None:
            return self.feature_layers
        return tuple(range(-self.num_layers, 0))

    @classmethod
    def temporal_module_switches(cls) -> tuple[str, ...]:
        """Names of the :data:`TemporalModuleSwitch` fields, in field order."""
        return tuple(
            name for name, field in cls.model_fields.items() if TEMPORAL_MODULE in field.metadata
        )


class HeadConfig(_Frozen):
    """Classification head: LayerNorm -> Dropout -> Linear."""

    dropout: float = Field(0.5, ge=0, lt=1)


class Cnn3dConfig(_Frozen):
    """A small 3D CNN trained end to end from scratch (``model.arch: cnn3d``), a model family
    unlike CLIP/EVL for ensembles (paper Tables 10-11).

    A 4x4 patchifying stem, then ``depth`` Conv3d(3x3x3)-BN-ReLU blocks that halve the space
    (and, after the first block, the time) and double the channels, global average pooling,
    dropout and a linear head.

    Attributes:
        width: channels of the stem and the first block (block ``i`` has ``width * 2**i``).
        depth: Conv3d-BN-ReLU blocks after the stem.
        dropout: dropout before the linear head.
    """

    width: int = Field(32, ge=1)
    depth: int = Field(4, ge=1)
    dropout: float = Field(0.5, ge=0, lt=1)


class ModelConfig(_Frozen):
    """The video classifier.

    Attributes:
        arch: ``evl`` (CLIP backbone + EVL decoder + head: ``backbone``, ``decoder``,
            ``head``) or ``cnn3d`` (a 3D CNN trained from scratch: ``cnn3d``; of the
            backbone only its input size is used, as the clip size of the data pipeline).
        backbone / decoder / head: the EVL parts.
        cnn3d: the 3D CNN.
    """

    arch: ModelArch = "evl"
    backbone: BackboneConfig = BackboneConfig()
    decoder: DecoderConfig = DecoderConfig()
    head: HeadConfig = HeadConfig()
    cnn3d: Cnn3dConfig = Cnn3dConfig()


class TestViewsConfig(_Frozen):
    """Views averaged at test time (paper: 3 temporal x 1 spatial)."""

    temporal: int = Field(3, ge=1)
    spatial: Literal[1, 3] = 1

    @property
    def total(self) -> int:
        return self.temporal * self.spatial


class AugmentConfig(_Frozen):
    """Training augmentation, identical for every frame of a clip.

    Attributes:
        random_resized_crop: random resized crop scale range; ``None`` disables it.
        rand_augment: RandAugment as ``m<magnitude>-n<ops>`` (paper ``m7-n4``); ``None`` disables.
        horizontal_flip: random horizontal flips; must be off for direction-sensitive data.
        on: where RandAugment and the flip run (the crop always runs in the loader worker):
            ``device``, on the training device, batched, after the host-to-device copy (the
            loader workers only decode and crop); ``loader``, in the loader workers. Both
            draw the same augmentation per clip and give the same pixels.
    """

    random_resized_crop: tuple[float, float] | None = (0.08, 1.0)
    rand_augment: str | None = Field("m7-n4", pattern=r"^m\d+-n\d+$")
    horizontal_flip: bool = True
    on: Literal["device", "loader"] = "device"


class SyntheticConfig(_Frozen):
    """How a synthetic stand-in dataset is generated (used when ``data.root`` is null).

    Attributes:
        clips_per_class / val_clips_per_class: training / validation clips per class.
        video_frames: frames per generated video.
        width / height: video size in pixels (even numbers, for yuv420p H.264).
        fps: frame rate written into the files (a video lasts ``video_frames / fps`` seconds).
        codec: ``h264`` (an mp4 file, as Kinetics is downloaded) or ``vp9`` (a webm file, as
            Something-Something-v2 is distributed).
        keyframe_interval: frames from one keyframe to the next (the encoder's GOP size);
            ``None`` keeps the encoder's default (250 for x264, 128 for libvpx-vp9). Raw
            YouTube-like Kinetics files have few keyframes, so decoding a clip from their
            middle decodes from the keyframe before it.
        seed: generation seed; the same settings give byte-identical files.
    """

    clips_per_class: int = Field(40, ge=1)
    val_clips_per_class: int = Field(10, ge=1)
    video_frames: int = Field(32, ge=2)
    width: int = Field(128, ge=16, multiple_of=2)
    height: int = Field(96, ge=16, multiple_of=2)
    fps: int = Field(12, ge=1)
    codec: VideoCodec = "h264"
    keyframe_interval: int | None = Field(None, ge=1)
    seed: int = 0


class DataConfig(_Frozen):
    """Dataset, annotations and clip sampling.

    Attributes:
        dataset: dataset name carried into every result (``kinetics400``, ``ssv2``, or a
            stand-in: ``synthetic-appearance``, ``synthetic-motion``).
        format: annotation format of the split files.
        root: directory the video paths in the annotations are relative to; ``None`` for
            synthetic stand-ins, which are generated into the cache directory.
        train_annotations / val_annotations: annotation files (relative to the YAML file).
        label_map: SSv2 labels JSON (name -> index); optional for the other formats.
        num_classes: classifier width.
        num_frames: frames per clip (T).
        sampling: ``dense`` (frames x stride) or ``uniform`` (one frame per segment).
        stride: frame stride of dense sampling.
        test_views: temporal x spatial views averaged at test time.
        augment: training augmentation.
        video_extension: video file suffix for formats that derive file names from ids
            (``None``: ``.mp4`` for Kinetics CSV, ``.webm`` for SSv2 JSON).
        min_frames: videos with fewer decodable frames are bad ("too short"); ``None`` means
            ``num_frames``. Longer videos shorter than a dense clip's span are clamped.
        synthetic: generation settings of the synthetic stand-ins.
        decoder: video decoding backend (``decord``, ``pyav`` or ``torchcodec``).
        max_bad_fraction: fraction of unreadable videos above which a run stops (each
            training worker checks the share of the split it reads).
        decode_timeout_s: per-video decoding time limit.
        num_workers: loader worker processes per training worker; ``None`` (the default):
            the CPUs the worker reserved minus one for the training process, at least one.
    """

    dataset: str = "synthetic-motion"
    format: AnnotationFormat = "ssv2_json"
    root: str | None = None
    train_annotations: str | None = None
    val_annotations: str | None = None
    label_map: str | None = None
    num_classes: int = Field(10, ge=2)
    num_frames: int = Field(8, ge=1)
    sampling: SamplingMode = "uniform"
    stride: int = Field(16, ge=1)
    test_views: TestViewsConfig = TestViewsConfig()
    augment: AugmentConfig = AugmentConfig()
    video_extension: str | None = Field(None, pattern=r"^\.\w+$")
    min_frames: int | None = Field(None, ge=1)
    synthetic: SyntheticConfig = SyntheticConfig()
    decoder: VideoDecoder = "decord"
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    decode_timeout_s: float = Field(30.0, gt=0)
    num_workers: int | None = Field(None, ge=0)


class TrainConfig(_Frozen):
    """Optimisation recipe (paper: AdamW, lr 4e-4, weight decay 0.05, cosine schedule).

    Attributes:
        batch_size: global batch size across all workers.
        batch_split: split each batch into this many sequential chunks (gradient accumulation).
        amp: autocast dtype on GPU; ignored on CPU.
        warmup_steps: linear warm-up steps before the cosine decay.
        eval_every / checkpoint_every / log_every: steps between validations, checkpoints
            and logged training metrics (the last step always evaluates and checkpoints).
        max_failures: automatic restarts from the last checkpoint after a worker failure.
    """

    optimizer: Literal["adamw"] = "adamw"
    lr: float = Field(4e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    schedule: Literal["cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    num_steps: int = Field(50_000, ge=1)
    batch_size: int = Field(256, ge=1)
    batch_split: int = Field(1, ge=1)
    amp: AmpDtype = "float16"
    eval_every: int = Field(5_000, ge=1)
    checkpoint_every: int = Field(5_000, ge=1)
    log_every: int = Field(50, ge=1)
    max_failures: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _split_divides_batch(self) -> TrainConfig:
        if self.batch_size % self.batch_split:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by batch_split {self.batch_split}"
            )
        return self


class FeaturesConfig(_Frozen):
    """Frozen-feature reuse: backbone outputs extracted once and shared by epochs and trials.

    Only valid when the backbone input never changes: a frozen backbone and deterministic
    views (no random resized crop, RandAugment or flips). Training then reads each video
    through one of ``train_views`` fixed temporal views (the test-time sampling), chosen at
    random per epoch.

    Attributes:
        reuse: read backbone features from the content-addressed cache (extracting what is
            missing first) instead of running the backbone every step.
        train_views: fixed temporal views cached per training video.
        dtype: storage dtype of the cached features.
        cache_dir: cache directory; ``None`` uses ``<cache>/features`` (``$EVL_PLATFORM_CACHE``).
    """

    reuse: bool = False
    train_views: int = Field(1, ge=1)
    dtype: Literal["float16", "float32"] = "float16"
    cache_dir: str | None = None


class ExperimentConfig(_Frozen):
    """One whole training run: model, data, recipe, and the profile it belongs to.

    Attributes:
        name: experiment name (defaults to the YAML file's stem).
        profile: ``local`` (CPU, stand-ins, tiny backbone), ``rehearsal`` (the paper's
            architectures and recipe, random init, on real-size stand-in videos) or ``paper``
            (GPUs, real data).
        seed: global seed of the run.
        profiles: per-profile overlays (nested mappings of the keys above), applied when that
            profile is selected; resolved away by the loader, so always empty after loading.
    """

    name: str = "experiment"
    profile: Profile = "local"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    features: FeaturesConfig = FeaturesConfig()
    profiles: dict[Profile, dict] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _reuse_needs_fixed_inputs(self) -> ExperimentConfig:
        if not self.features.reuse:
            return self
        if self.model.arch != "evl":
            raise ValueError(
                f"features.reuse caches frozen CLIP backbone features, but model.arch "
                f"{self.model.arch!r} has no frozen backbone (it trains end to end on decoded "
                "clips); set features.reuse: false"
            )
        augment = self.data.augment
        random_parts = [
            f"data.augment.{name}"
            for name, on in (
                ("random_resized_crop", augment.random_resized_crop is not None),
                ("rand_augment", augment.rand_augment is not None),
                ("horizontal_flip", augment.horizontal_flip),
            )
            if on
        ]
        if self.model.backbone.mode != "frozen":
            random_parts.insert(0, "model.backbone.mode (finetune changes the features)")
        if random_parts:
            raise ValueError(
                "features.reuse needs a frozen backbone and deterministic views, but "
                f"{', '.join(random_parts)} {'is' if len(random_parts) == 1 else 'are'} on; "
                "turn it off or set features.reuse: false"
            )
        return self

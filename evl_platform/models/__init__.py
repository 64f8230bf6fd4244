"""EVL model: CLIP backbone adapter, temporal modules, decoder, and model info; plus a small
3D CNN trained from scratch (``model.arch: cnn3d``), a second model family for ensembles."""

from evl_platform.models.backbone import (
    BACKBONES,
    BackboneSpec,
    BlockFeatures,
    ClipBackbone,
    backbone_spec,
    create_backbone,
    load_visual_state_dict,
)
from evl_platform.models.cnn3d import Cnn3d, create_cnn3d
from evl_platform.models.decoder import FEATURE_SHAPES, DecoderBlock, EVLDecoder, EVLDecoderLayer
from evl_platform.models.evl import (
    EVL,
    MODEL_BUILDERS,
    ClassificationHead,
    create_decoder,
    create_evl,
    create_model,
    evl_on,
    extract_blocks,
)
from evl_platform.models.info import count_gmacs, model_info
from evl_platform.models.pixels import CLIP_MEAN, CLIP_STD, normalize_pixels
from evl_platform.models.temporal import (
    TEMPORAL_MODULES,
    TemporalConv,
    TemporalCrossAttention,
    TemporalGeometry,
    TemporalModule,
    TemporalPositionalEmbedding,
    adjacent_attention,
    create_temporal_modules,
    enabled_temporal_modules,
)

__all__ = [
    "BACKBONES",
    "CLIP_MEAN",
    "CLIP_STD",
    "EVL",
    "FEATURE_SHAPES",
    "MODEL_BUILDERS",
    "TEMPORAL_MODULES",
    "BackboneSpec",
    "BlockFeatures",
    "ClassificationHead",
    "ClipBackbone",
    "Cnn3d",
    "DecoderBlock",
    "EVLDecoder",
    "EVLDecoderLayer",
    "TemporalConv",
    "TemporalCrossAttention",
    "TemporalGeometry",
    "TemporalModule",
    "TemporalPositionalEmbedding",
    "adjacent_attention",
    "backbone_spec",
    "count_gmacs",
    "create_backbone",
    "create_cnn3d",
    "create_decoder",
    "create_evl",
    "create_model",
    "create_temporal_modules",
    "enabled_temporal_modules",
    "evl_on",
    "extract_blocks",
    "load_visual_state_dict",
    "model_info",
    "normalize_pixels",
]

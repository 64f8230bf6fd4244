"""EVL model: CLIP backbone adapter, temporal modules, decoder, and model info."""

from evl_platform.models.backbone import (
    BACKBONES,
    BackboneSpec,
    BlockFeatures,
    ClipBackbone,
    backbone_spec,
    create_backbone,
    load_visual_state_dict,
)
from evl_platform.models.decoder import FEATURE_SHAPES, DecoderBlock, EVLDecoder, EVLDecoderLayer
from evl_platform.models.evl import EVL, ClassificationHead, create_decoder, create_model
from evl_platform.models.info import count_gmacs, model_info
from evl_platform.models.temporal import (
    TemporalConv,
    TemporalCrossAttention,
    TemporalPositionalEmbedding,
)

__all__ = [
    "BACKBONES",
    "EVL",
    "FEATURE_SHAPES",
    "BackboneSpec",
    "BlockFeatures",
    "ClassificationHead",
    "ClipBackbone",
    "DecoderBlock",
    "EVLDecoder",
    "EVLDecoderLayer",
    "TemporalConv",
    "TemporalCrossAttention",
    "TemporalPositionalEmbedding",
    "backbone_spec",
    "count_gmacs",
    "create_backbone",
    "create_decoder",
    "create_model",
    "load_visual_state_dict",
    "model_info",
]

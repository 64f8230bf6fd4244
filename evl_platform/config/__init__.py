"""Typed experiment configuration: schema, YAML loading, overrides and one-line errors."""

from evl_platform.config.errors import ConfigError
from evl_platform.config.loader import (
    apply_overrides,
    dump_config,
    flatten_config,
    load_config,
    parse_override,
)
from evl_platform.config.schema import (
    AugmentConfig,
    BackboneConfig,
    DataConfig,
    DecoderConfig,
    ExperimentConfig,
    FeaturesConfig,
    HeadConfig,
    ModelConfig,
    SyntheticConfig,
    TestViewsConfig,
    TrainConfig,
)

__all__ = [
    "AugmentConfig",
    "BackboneConfig",
    "ConfigError",
    "DataConfig",
    "DecoderConfig",
    "ExperimentConfig",
    "HeadConfig",
    "ModelConfig",
    "FeaturesConfig",
    "SyntheticConfig",
    "TestViewsConfig",
    "TrainConfig",
    "apply_overrides",
    "dump_config",
    "flatten_config",
    "load_config",
    "parse_override",
]

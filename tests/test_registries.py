"""Registries and the config's name lists: one set of names, checked when a registry is imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Literal, get_args

import pytest

from evl_platform.config import ConfigError, load_config
from evl_platform.config.schema import (
    AnnotationFormat,
    DecoderConfig,
    FeatureShape,
    ModelArch,
    VideoDecoder,
)
from evl_platform.data.annotations import ANNOTATION_READERS
from evl_platform.data.decode import DECODERS
from evl_platform.models import FEATURE_SHAPES, MODEL_BUILDERS, TEMPORAL_MODULES, temporal
from evl_platform.registry import Registry

ROOT = Path(__file__).resolve().parents[1]

PAIRS = {
    "FeatureShape": (FEATURE_SHAPES, FeatureShape, "evl_platform.models.decoder"),
    "AnnotationFormat": (
        ANNOTATION_READERS,
        AnnotationFormat,
        "evl_platform.data.annotations.formats",
    ),
    "VideoDecoder": (DECODERS, VideoDecoder, "evl_platform.data.decode"),
    "ModelArch": (MODEL_BUILDERS, ModelArch, "evl_platform.models.evl"),
}


@pytest.mark.parametrize("literal_name", list(PAIRS))
def test_registry_names_are_the_config_literal(literal_name: str) -> None:
    registry, literal, _ = PAIRS[literal_name]
    assert sorted(registry) == sorted(get_args(literal))


def test_temporal_modules_are_the_decoder_switches_in_the_order_they_apply() -> None:
    order = ("temporal_conv", "temporal_pos_embed", "temporal_cross_attn")
    assert tuple(name for name, _ in TEMPORAL_MODULES.items()) == order
    assert DecoderConfig.temporal_module_switches() == order


def test_check_names_names_each_difference_and_the_file_to_edit() -> None:
    registry: Registry[int] = Registry("feature shape")
    registry.add("pooled", 1)
    registry.add("spatial_avg", 2)
    with pytest.raises(RuntimeError) as info:
        registry.check_names(
            Literal["spatial_avg", "temporal_avg"],
            literal_name="FeatureShape",
            module="evl_platform.models.decoder",
        )
    assert str(info.value) == (
        "feature shape 'pooled' is registered in evl_platform/models/decoder.py but not allowed "
        "by FeatureShape: add it to FeatureShape in evl_platform/config/schema.py; "
        "FeatureShape in evl_platform/config/schema.py allows 'temporal_avg' but no feature "
        "shape is registered under it: register one in evl_platform/models/decoder.py or remove "
        "it from FeatureShape"
    )
    registry.check_names(  # the same names pass
        Literal["pooled", "spatial_avg"], literal_name="FeatureShape", module="unused"
    )


DRIFT = """
import importlib, sys, typing
from evl_platform.config import schema

FRESH = ("evl_platform.models", "evl_platform.data")  # imported afresh for each case

class Decoder(schema.DecoderConfig):
    temporal_shift: schema.TemporalModuleSwitch = False

cases = [
    (name, typing.Literal[(*typing.get_args(getattr(schema, name)), "new")], module)
    for name, module in MODULES.items()
] + [("DecoderConfig", Decoder, "evl_platform.models")]
for attr, value, module in cases:
    original = getattr(schema, attr)
    setattr(schema, attr, value)
    try:
        importlib.import_module(module)
        print(attr, "imported")
    except RuntimeError as err:
        print(attr, f"RuntimeError: {err}")
    setattr(schema, attr, original)
    for name in [m for m in sys.modules if m.startswith(FRESH)]:
        del sys.modules[name]
"""


@pytest.fixture(scope="module")
def drift_errors() -> dict[str, str]:
    """What importing each registry module says, in a fresh interpreter, after its config list
    gained a name (``"new"``) that nothing registers; ``DecoderConfig`` gained a switch
    ``temporal_shift`` that no temporal module answers."""
    modules = {name: module for name, (_, _, module) in PAIRS.items()}
    code = f"MODULES = {modules!r}\n{DRIFT}"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return dict(line.split(" ", 1) for line in done.stdout.splitlines())


@pytest.mark.parametrize("literal_name", list(PAIRS))
def test_a_name_added_to_the_config_alone_fails_the_registry_import(
    literal_name: str, drift_errors: dict[str, str]
) -> None:
    registry, _, module = PAIRS[literal_name]
    where = module.replace(".", "/") + ".py"
    assert drift_errors[literal_name] == (
        f"RuntimeError: {literal_name} in evl_platform/config/schema.py allows 'new' but no "
        f"{registry.kind} is registered under it: register one in {where} or remove it from "
        f"{literal_name}"
    )


def test_a_switch_without_a_temporal_module_fails_the_import(drift_errors: dict[str, str]) -> None:
    assert drift_errors["DecoderConfig"] == (
        "RuntimeError: DecoderConfig.temporal_shift in evl_platform/config/schema.py is a "
        "TemporalModuleSwitch but no temporal module is registered under 'temporal_shift': "
        "register one in evl_platform/models/temporal.py or make the field a plain bool"
    )


def test_a_temporal_module_without_a_switch_fails_the_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = Registry("temporal module")
    for name, module in TEMPORAL_MODULES.items():
        registry.add(name, module)
    registry.add("temporal_shift", temporal.TemporalConv)
    monkeypatch.setattr(temporal, "TEMPORAL_MODULES", registry)
    with pytest.raises(RuntimeError) as info:
        temporal.check_temporal_switches()
    assert str(info.value) == (
        "temporal module 'temporal_shift' is registered in evl_platform/models/temporal.py but "
        "DecoderConfig has no switch for it: add `temporal_shift: TemporalModuleSwitch = False` "
        "to DecoderConfig in evl_platform/config/schema.py"
    )


@pytest.mark.parametrize(
    ("key", "literal_name"),
    [
        ("model.decoder.feature_shape", "FeatureShape"),
        ("data.format", "AnnotationFormat"),
        ("data.decoder", "VideoDecoder"),
        ("model.arch", "ModelArch"),
    ],
)
def test_a_bad_yaml_value_lists_the_registered_names(key: str, literal_name: str) -> None:
    registry = PAIRS[literal_name][0]
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "experiments/local_motion_tiny.yaml", overrides=[f"{key}=nope"])
    allowed = ", ".join(repr(name) for name in get_args(PAIRS[literal_name][1]))
    assert f"{key}: expected one of {allowed}, got 'nope'" in str(info.value)
    assert all(repr(name) in allowed for name in registry)

"""The fixed DCT / sin-cos / content-attention init of the tiny backbones, and its cache key."""

from __future__ import annotations

import pytest
import torch

from evl_platform.config.schema import BackboneConfig
from evl_platform.models.backbone import BACKBONES, create_backbone
from evl_platform.models.tiny_init import (
    DCT_SINCOS,
    POSITION_ENERGY,
    POSITION_SCALE,
    QK_SCALE,
    content_projection,
    dct_patch_filters,
    sincos_position_embedding,
)


def test_dct_filters_are_orthonormal_and_start_with_the_mean_brightness() -> None:
    filters = dct_patch_filters(64, 8).flatten(1)  # (64, 192)
    assert torch.allclose(filters @ filters.T, torch.eye(64), atol=1e-5)
    dc = filters[0]
    assert torch.allclose(dc, dc.new_full(dc.shape, 1 / 192**0.5))  # uniform over all pixels


def test_dct_filters_reject_a_width_beyond_the_patch() -> None:
    with pytest.raises(ValueError, match="only 12 DCT filters"):
        dct_patch_filters(13, 2)


def test_sincos_code_tells_every_patch_apart() -> None:
    code = sincos_position_embedding((8, 8), 64)
    assert code.shape == (65, 64)
    assert torch.equal(code[0], torch.zeros(64))
    distance = torch.cdist(code[1:], code[1:]) + torch.eye(64)
    assert distance.min() > 0.1


@pytest.mark.parametrize("name", list(BACKBONES))
def test_tiny_backbones_get_the_fixed_embeddings_and_seeded_blocks(name: str) -> None:
    assert BACKBONES.get(name).init == DCT_SINCOS
    a = create_backbone(BackboneConfig(name=name, pretrained=None), load_weights=False).visual
    b = create_backbone(BackboneConfig(name=name, pretrained=None, init_seed=1)).visual
    width, _, patch, _ = a.conv1.weight.shape
    assert torch.equal(a.conv1.weight, dct_patch_filters(width, patch))
    code = sincos_position_embedding(tuple(a.grid_size), width) * POSITION_SCALE
    assert torch.equal(a.positional_embedding, code)
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    block_a, block_b = a.transformer.resblocks[0], b.transformer.resblocks[0]
    assert not torch.equal(block_a.mlp.c_fc.weight, block_b.mlp.c_fc.weight)


def test_content_projection_removes_most_of_the_position_code() -> None:
    code = sincos_position_embedding((8, 8), 64) * POSITION_SCALE
    proj = content_projection(code)
    assert torch.allclose(proj, proj.T, atol=1e-6)
    assert torch.allclose(proj @ proj, proj, atol=1e-5)
    centred = code[1:] - code[1:].mean(dim=0)
    left = (centred @ proj).pow(2).sum() / centred.pow(2).sum()
    assert left <= 1 - POSITION_ENERGY
    assert 32 < torch.linalg.matrix_rank(proj) < 64  # patch content keeps most directions


@pytest.mark.parametrize("name", list(BACKBONES))
def test_tiny_backbones_attend_by_content(name: str) -> None:
    a = create_backbone(BackboneConfig(name=name, pretrained=None)).visual
    b = create_backbone(BackboneConfig(name=name, pretrained=None, init_seed=1)).visual
    width = a.conv1.weight.shape[0]
    code = sincos_position_embedding(tuple(a.grid_size), width) * POSITION_SCALE
    qk = QK_SCALE * content_projection(code)
    for block_a, block_b in zip(a.transformer.resblocks, b.transformer.resblocks, strict=True):
        weight, bias = block_a.attn.in_proj_weight, block_a.attn.in_proj_bias
        assert torch.equal(weight[:width], qk) and torch.equal(weight[width : 2 * width], qk)
        assert not bias[: 2 * width].any()
        values_a, values_b = weight[2 * width :], block_b.attn.in_proj_weight[2 * width :]
        assert not torch.equal(values_a, values_b)  # the values stay seeded random


def test_feature_cache_key_names_the_init_scheme() -> None:
    from pathlib import Path

    from evl_platform.config import load_config
    from evl_platform.features import weights_identity

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "experiments" / "local_motion_tiny.yaml", overrides=[])
    assert weights_identity(cfg) == f"random:{DCT_SINCOS}:0"

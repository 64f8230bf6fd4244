"""Counting a live model's MACs leaves it as it was: its train mode, the form its decoder's
attention runs in (a ``query_side`` set on an instance), its image counter and its weights;
and the count is that of a model built on the meta device."""

from __future__ import annotations

import pytest
import torch

from evl_platform.config.schema import (
    BackboneConfig,
    DataConfig,
    DecoderConfig,
    ExperimentConfig,
    ModelConfig,
)
from evl_platform.models import count_gmacs, create_model
from evl_platform.models.decoder import DecoderAttention


def _cfg() -> ExperimentConfig:
    return ExperimentConfig(
        model=ModelConfig(
            backbone=BackboneConfig(name="micro-vit"),
            decoder=DecoderConfig(num_layers=2, temporal_cross_attn=True, temporal_conv=True),
        ),
        data=DataConfig(num_classes=5, num_frames=4),
    )


@pytest.mark.parametrize("plain", [True, False])
def test_counting_macs_does_not_touch_the_live_model(plain: bool) -> None:
    model = create_model(_cfg(), load_weights=False).train()
    attention = [m for m in model.modules() if isinstance(m, DecoderAttention)]
    attention[0].query_side = False  # a user's choice on one instance
    before = {k: v.clone() for k, v in model.state_dict().items()}
    macs = count_gmacs(model, num_frames=4, plain_attention=plain)
    assert model.training and model.decoder.training
    assert attention[0].query_side is False and "query_side" not in vars(attention[1])
    assert model.forward_images == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.device("meta"):
        reference = create_model(_cfg(), load_weights=False)
    assert macs == count_gmacs(reference, num_frames=4, plain_attention=plain)
    assert macs > 0

"""Evaluation runs a batch's N videos x V views through the backbone in chunks of at most
``ceil(N / batch_split)`` clip-views (never all N x V at once), alone and in a pack, with the
same scores as one pass over the whole batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evl_platform.config.schema import (
    BackboneConfig,
    DataConfig,
    DecoderConfig,
    ExperimentConfig,
    ModelConfig,
)
from evl_platform.models import create_model
from evl_platform.train.batch import InputBatch
from evl_platform.train.evaluation import evaluate, evaluate_members
from evl_platform.train.pack import SharedBackbone
from evl_platform.train.step import EVLForward

CPU = torch.device("cpu")
FRAMES, CLIPS, VIEWS = 4, 3, 3


def _model(tca: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ExperimentConfig(
        model=ModelConfig(
            backbone=BackboneConfig(name="micro-vit"),
            decoder=DecoderConfig(num_layers=2, temporal_cross_attn=tca, temporal_conv=True),
        ),
        data=DataConfig(num_classes=5, num_frames=FRAMES),
    )
    return create_model(cfg, load_weights=False)


def _batch() -> InputBatch:
    generator = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (CLIPS, VIEWS, 3, FRAMES, 32, 32), generator=generator)
    return InputBatch(clips.to(torch.uint8), torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7]))


def _record_backbone(model: torch.nn.Module, seen: list[int]) -> None:
    run = model.backbone.forward_features

    def recording(images, layers, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.append(images.shape[0] // FRAMES)  # clip-views in this pass
        return run(images, layers, **kwargs)

    model.backbone.forward_features = recording


@pytest.mark.parametrize("split", [1, 3])
def test_evaluation_chunks_clip_views_with_the_same_scores(split: int) -> None:
    model = _model(tca=False)
    seen: list[int] = []
    _record_backbone(model, seen)
    whole = evaluate(EVLForward(model), [_batch()], device=CPU, amp=None, batch_split=1)
    seen.clear()
    chunked = evaluate(EVLForward(model), [_batch()], device=CPU, amp=None, batch_split=split)
    chunk = -(-CLIPS // split)
    assert max(seen) <= chunk and sum(seen) == CLIPS * VIEWS
    np.testing.assert_allclose(chunked.probs, whole.probs, rtol=1e-6, atol=1e-7)
    model.eval()
    with torch.no_grad():  # the reference: every view of every video in one forward
        clips = _batch().inputs.flatten(0, 1)
        ref = model(clips).softmax(-1).unflatten(0, (CLIPS, VIEWS)).mean(1)
    np.testing.assert_allclose(chunked.probs, ref.numpy(), rtol=1e-5, atol=1e-6)


def test_pack_evaluation_chunks_the_shared_backbone_pass() -> None:
    model = _model(tca=True)
    seen: list[int] = []
    _record_backbone(model, seen)
    shared = SharedBackbone(
        model.backbone, model.feature_layers, maps=model.feature_layers, device=CPU, amp=None
    )
    nets = {"a": EVLForward(model)}
    found = evaluate_members(
        nets,
        [_batch()],
        device=CPU,
        amp=None,
        shared=shared,
        select={"a": model.select_features},
        batch_split=CLIPS,
    )
    assert seen == [1] * (CLIPS * VIEWS)
    alone = evaluate(EVLForward(model), [_batch()], device=CPU, amp=None)
    np.testing.assert_allclose(found["a"].probs, alone.probs, rtol=1e-5, atol=1e-6)

"""Packs without Ray: several decoders trained on one frozen backbone pass learn exactly what
each learns alone (per-step loss, final validation metrics), on the online video path with
the training augmentation and on the feature cache; a member whose loss goes non-finite
stops while its pack-mates go on; and the sweep's grouping of variants into packs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import layout_data, write_config

from evl_platform.config import ExperimentConfig, apply_overrides
from evl_platform.data.synth import SyntheticLayout
from evl_platform.train.inputs import create_source
from evl_platform.train.loop import (
    Callback,
    Member,
    Optimization,
    Report,
    StepResult,
    create_forward,
    fit,
    fit_members,
)
from evl_platform.train.pack import build_pack, check_packable, pack_differences

CPU = torch.device("cpu")
VARIANTS = {
    "t_conv": {"model.decoder.temporal_conv": True, "model.decoder.temporal_cross_attn": False},
    "t_ca": {
        "model.decoder.temporal_conv": False,
        "model.decoder.temporal_cross_attn": True,
        "model.decoder.feature_layers": [-1, -3],
        "train.lr": 2e-3,
    },
}


class Recorder(Callback):
    """Every step's loss and the last report's metrics."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.last: dict[str, float] = {}

    def on_step(self, step: int, result: StepResult) -> None:
        self.losses.append(float(result.loss))

    def on_report(self, report: Report) -> None:
        if report.last:
            self.last = report.metrics


def _base(tmp_path: Path, layout: SyntheticLayout, *, reuse: bool) -> ExperimentConfig:
    return write_config(
        tmp_path / "base.yaml",
        layout_data(layout, num_frames=4)
        | (
            {
                "augment": {
                    "random_resized_crop": None,
                    "rand_augment": None,
                    "horizontal_flip": False,
                }
            }
            if reuse
            else {}
        ),
        model={
            "backbone": {"name": "micro-vit"},
            "decoder": {"num_layers": 2, "mlp_dropout": 0.5},
            "head": {"dropout": 0.5},
        },
        train={"num_steps": 6, "batch_size": 4, "log_every": 2, "eval_every": 3, "lr": 1e-3},
        features={"reuse": reuse, "cache_dir": str(tmp_path / "features")},
    )


def _variants(base: ExperimentConfig) -> dict[str, ExperimentConfig]:
    return {
        key: apply_overrides(base, {**values, "name": key}, source=key)
        for key, values in VARIANTS.items()
    }


def _alone(cfg: ExperimentConfig) -> Recorder:
    built = build_pack({"": cfg}, device=CPU, rank=0)
    model = built.models[""]
    source, _, _ = create_source(cfg, rank=0, world=1, batch=4, device=CPU)
    recorder = Recorder()
    fit(
        create_forward(model, device=CPU),
        source,
        cfg.train,
        optimization=Optimization.create(model, cfg.train, CPU),
        callbacks=[recorder],
    )
    return recorder


def _packed(cfgs: dict[str, ExperimentConfig], poison: str | None = None) -> dict[str, Recorder]:
    built = build_pack(cfgs, device=CPU, rank=0)
    lead = next(iter(cfgs.values()))
    reuse = lead.features.reuse
    source, _, _ = create_source(
        lead,
        rank=0,
        world=1,
        batch=4,
        device=CPU,
        reads=built.reads if reuse else None,
    )
    recorders = {key: Recorder() for key in cfgs}
    members = []
    for key, model in built.models.items():
        if key == poison:  # its loss is NaN from the first step on
            with torch.no_grad():
                model.head.fc.weight.fill_(math.nan)
        optimization = Optimization.create(model, cfgs[key].train, CPU)
        members.append(
            Member(
                key,
                create_forward(model, device=CPU),
                optimization,
                [recorders[key]],
                rng=built.rngs[key],
            )
        )
    fit_members(members, source, lead.train, shared=built.shared, select=built.select)
    for member in members:
        recorders[member.key].failure = member.failure  # type: ignore[attr-defined]
        trainable = [p for p in member.net.parameters() if p.requires_grad]
        recorders[member.key].holds_grads = any(p.grad is not None for p in trainable)  # type: ignore[attr-defined]
    return recorders


def _assert_same(alone: Recorder, packed: Recorder) -> None:
    assert len(packed.losses) == len(alone.losses) == 6
    for a, p in zip(alone.losses, packed.losses, strict=True):
        assert p == pytest.approx(a, rel=1e-4)
    assert packed.last.keys() == alone.last.keys()
    for name in ("val/acc1", "val/acc5", "val/loss", "train/loss", "train/acc1"):
        assert packed.last[name] == pytest.approx(alone.last[name], rel=1e-4, abs=1e-6), name


def test_a_pack_trains_each_member_as_it_trains_alone_online_with_augmentation(
    tmp_path: Path, motion_small: SyntheticLayout
) -> None:
    base = _base(tmp_path, motion_small, reuse=False)
    assert base.data.augment.rand_augment is not None  # the paper's augmentation is on
    cfgs = _variants(base)
    packed = _packed(cfgs)
    for key, cfg in cfgs.items():
        _assert_same(_alone(cfg), packed[key])
    assert packed["t_conv"].losses != packed["t_ca"].losses
    # a pack holds one member's gradients at a time: each member's are freed after its update
    assert not any(r.holds_grads for r in packed.values())  # type: ignore[attr-defined]


def test_a_pack_trains_each_member_as_it_trains_alone_on_the_feature_cache(
    tmp_path: Path, appearance_small: SyntheticLayout, ray_local: None
) -> None:
    from evl_platform.features import prepare_features

    cfgs = _variants(_base(tmp_path, appearance_small, reuse=True))
    for cfg in cfgs.values():  # as the sweep's driver does, once per extraction identity
        prepare_features(cfg, use_gpu=False)
    packed = _packed(cfgs)
    for key, cfg in cfgs.items():
        _assert_same(_alone(cfg), packed[key])


def test_a_member_with_a_non_finite_loss_stops_and_its_pack_mates_go_on(
    tmp_path: Path, motion_small: SyntheticLayout
) -> None:
    cfgs = _variants(_base(tmp_path, motion_small, reuse=False))
    packed = _packed(cfgs, poison="t_ca")
    # its losses are checked on the device and read at the first logging step (2): it takes
    # steps 1 and 2, reports nothing, and its failure names step 1
    poisoned = packed["t_ca"]
    assert len(poisoned.losses) == 2 and all(math.isnan(x) for x in poisoned.losses)
    assert poisoned.last == {}
    assert str(poisoned.failure).startswith("step 1:")
    assert packed["t_conv"].failure is None
    assert len(packed["t_conv"].losses) == 6 and "val/acc1" in packed["t_conv"].last


def test_members_that_differ_outside_the_decoder_do_not_pack(
    tmp_path: Path, motion_small: SyntheticLayout
) -> None:
    cfgs = _variants(_base(tmp_path, motion_small, reuse=False))
    assert pack_differences(cfgs["t_conv"], cfgs["t_ca"]) == []
    other = apply_overrides(cfgs["t_ca"], {"data.num_frames": 8}, source="test")
    assert pack_differences(cfgs["t_conv"], other) == ["data.num_frames"]
    with pytest.raises(ValueError, match="differ in data.num_frames"):
        check_packable({"a": cfgs["t_conv"], "b": other})
    tuned = apply_overrides(cfgs["t_ca"], {"model.backbone.mode": "finetune"}, source="test")
    with pytest.raises(ValueError, match="model.backbone.mode is finetune"):
        check_packable({"a": cfgs["t_conv"], "b": tuned})

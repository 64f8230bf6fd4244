"""The motion stand-in shows what each temporal module adds (Table 8a), trained from its init.

Each module alone, starting from the paper's initialisation (T-PE and T-CA at zero), must learn
the frame order that the order-blind decoder cannot see, in the local schedule: 300 steps on
the frozen features of ``experiments/local_motion_tiny.yaml``. The pack trains the four
decoders on one cached-feature pass, as the sweep does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from evl_platform.config import load_config
from evl_platform.features import prepare_features
from evl_platform.features.key import tensor_kinds
from evl_platform.tracking import names
from evl_platform.train.inputs import create_source
from evl_platform.train.loop import Callback, Report, fit_members
from evl_platform.train.member import Member
from evl_platform.train.pack import build_pack
from evl_platform.train.step import EVLForward, Optimization

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("temporal_conv", "temporal_pos_embed", "temporal_cross_attn")


class LastAccuracy(Callback):
    def __init__(self) -> None:
        self.acc1: float | None = None

    def on_report(self, report: Report) -> None:
        if names.VAL_ACC1 in report.metrics:
            self.acc1 = report.metrics[names.VAL_ACC1]


def test_each_temporal_module_alone_learns_the_order_of_the_motion_stand_in(
    ray_local: None,
) -> None:
    variants = {"none": None, **{module: module for module in MODULES}}
    cfgs = {
        key: load_config(
            ROOT / "experiments" / "local_motion_tiny.yaml",
            overrides=[f"model.decoder.{m}={'true' if m == on else 'false'}" for m in MODULES],
        )
        for key, on in variants.items()
    }
    for cfg in sorted(cfgs.values(), key=lambda c: "attn" not in tensor_kinds(c)):
        prepare_features(cfg, progress=False)
    device = torch.device("cpu")
    built = build_pack(cfgs, device=device, rank=0)
    results = {key: LastAccuracy() for key in cfgs}
    members = [
        Member(
            key,
            EVLForward(model),
            Optimization.create(model, cfgs[key].train, device),
            [results[key]],
            rng=built.rngs[key],
        )
        for key, model in built.models.items()
    ]
    lead = cfgs["none"]
    source, _, _ = create_source(
        lead, rank=0, world=1, batch=lead.train.batch_size, device=device, reads=built.reads
    )
    fit_members(members, source, lead.train, shared=built.shared, select=built.select)
    acc = {key: result.acc1 for key, result in results.items()}  # percent
    assert abs(acc["none"] - 50) <= 5, acc  # order-blind: half of each reversal pair
    for module in MODULES:
        assert acc[module] >= acc["none"] + 10, (module, acc)

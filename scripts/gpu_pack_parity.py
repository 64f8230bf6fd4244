"""A pack's members learn exactly what each learns alone, checked on one device (CUDA by default).

``tests/test_pack.py`` checks it on a CPU. On a GPU more can break it: per-member CUDA RNG
state (dropout), autocast and float16 loss scaling, the device the backbone features live on.
This trains two decoder variants of a small stand-in alone and as one pack, with the training
augmentation and automatic mixed precision, and compares every step's loss and the final
validation metrics. Prints one line and exits 0 when they match, 1 when not.

Usage: ``python scripts/gpu_pack_parity.py [--device cuda|cpu] [--amp float16|bfloat16|none]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from evl_platform.config import ExperimentConfig, apply_overrides, load_config
from evl_platform.data.synth import SynthParams, generate
from evl_platform.train.inputs import create_source
from evl_platform.train.loop import (
    Callback,
    EVLForward,
    Member,
    Optimization,
    Report,
    StepResult,
    fit_members,
)
from evl_platform.train.pack import build_pack

BATCH = 4
STEPS = 6
VARIANTS = {
    "t_conv": {"model.decoder.temporal_conv": True, "model.decoder.temporal_cross_attn": False},
    "t_ca": {"model.decoder.temporal_conv": False, "model.decoder.temporal_cross_attn": True},
}
METRICS = ("val/acc1", "val/acc5", "val/loss", "train/loss")


class Recorder(Callback):
    """Every step's loss and the last report's metrics."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.last: dict[str, float] = {}

    def on_step(self, step: int, result: StepResult) -> None:
        self.losses.append(float(result.loss))

    def on_report(self, report: Report) -> None:
        if report.last:
            self.last = dict(report.metrics)


def base_config(directory: Path, amp: str) -> ExperimentConfig:
    """A micro-backbone experiment on a small motion stand-in, paper augmentation on."""
    layout = generate(
        "synthetic-motion",
        directory / "motion",
        SynthParams(clips_per_class=2, val_clips_per_class=1, num_frames=16, seed=3),
        workers=1,
        progress=False,
    )
    text = f"""
profile: local
model:
  backbone: {{name: micro-vit}}
  decoder: {{num_layers: 2, mlp_dropout: 0.5}}
  head: {{dropout: 0.5}}
data:
  dataset: {layout.dataset}
  format: {layout.format}
  root: {layout.root}
  train_annotations: {layout.train_annotations}
  val_annotations: {layout.val_annotations}
  label_map: {layout.label_map}
  video_extension: {layout.video_extension}
  num_classes: 10
  num_frames: 4
  num_workers: 0
train: {{num_steps: {STEPS}, batch_size: {BATCH}, log_every: 2, eval_every: 3, lr: 1.0e-3,
        amp: {amp}}}
features: {{reuse: false}}
"""
    path = directory / "base.yaml"
    path.write_text(text)
    return load_config(path)


def train(cfgs: dict[str, ExperimentConfig], device: torch.device) -> dict[str, Recorder]:
    """Trains ``cfgs`` together (one member: alone) and records each member."""
    built = build_pack(cfgs, device=device, rank=0)
    lead = next(iter(cfgs.values()))
    source, _, _ = create_source(lead, rank=0, world=1, batch=BATCH, device=device)
    recorders = {key: Recorder() for key in cfgs}
    members = []
    for key, model in built.models.items():
        rng = None if len(cfgs) == 1 else built.rngs[key]  # alone: the run's own RNG
        optimization = Optimization.create(model, cfgs[key].train, device)
        members.append(Member(key, EVLForward(model), optimization, [recorders[key]], rng=rng))
    fit_members(members, source, lead.train, shared=built.shared, select=built.select)
    return recorders


def differences(alone: Recorder, packed: Recorder, tolerance: float) -> list[str]:
    """What differs between a lone run and its packed twin beyond ``tolerance`` (relative)."""
    problems = []
    if len(alone.losses) != len(packed.losses):
        return [f"{len(alone.losses)} steps alone, {len(packed.losses)} packed"]
    steps = zip(alone.losses, packed.losses, strict=True)
    pairs = [(f"loss@{i + 1}", a, p) for i, (a, p) in enumerate(steps)]
    pairs += [(name, alone.last.get(name), packed.last.get(name)) for name in METRICS]
    for name, a, p in pairs:
        if a is None or p is None or abs(a - p) > tolerance * max(abs(a), 1e-6):
            problems.append(f"{name}: alone {a}, packed {p}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--amp", default="float16", choices=("float16", "bfloat16", "none"))
    parser.add_argument("--tolerance", type=float, default=1e-4, help="relative (default 1e-4)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIP pack parity: no CUDA device")
        return 0
    # cuBLAS picks its reduction order per workspace: fixed (before its first use) so that two
    # runs of one shape agree
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.use_deterministic_algorithms(True, warn_only=True)
    with tempfile.TemporaryDirectory() as directory:
        os.environ.setdefault("EVL_PLATFORM_CACHE", str(Path(directory) / "cache"))
        base = base_config(Path(directory), args.amp)
        cfgs = {
            key: apply_overrides(base, {**values, "name": key}, source=key)
            for key, values in VARIANTS.items()
        }
        packed = train(cfgs, device)
        problems = []
        for key, cfg in cfgs.items():
            alone = train({key: cfg}, device)[key]
            problems += [f"{key} {p}" for p in differences(alone, packed[key], args.tolerance)]
    where = f"{args.device}, amp {args.amp}, {len(cfgs)} members x {STEPS} steps"
    if problems:
        print(f"FAIL pack parity ({where}):", *problems, sep="\n  ")
        return 1
    print(f"PASS pack parity ({where}): every loss and validation metric as alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())

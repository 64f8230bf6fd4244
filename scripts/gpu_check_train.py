"""GPU checks of the training loop (issue 30), for scripts/gpu-check.sh: run from the repo root
on one CUDA GPU (``PYTHONPATH=. python scripts/gpu_check_train.py``; on a CPU it runs the same
loop without the sync check).

1. Steps between logging steps never synchronise with the device (sync debug mode "error"),
   uint8 clips augmented on the device (RandAugment plans, data/augment_device.py) included.
2. A worker's CUDA RNG state is captured and restored on its own device (the last GPU here,
   made current first as the Ray worker does).
"""

import numpy as np
import torch

from evl_platform.config import ExperimentConfig
from evl_platform.data.augment_device import apply_plans
from evl_platform.data.rand_augment import draw_plan
from evl_platform.models import create_model
from evl_platform.train.loop import Callback, InputBatch, Optimization, create_forward, fit
from evl_platform.train.member import RngState

cuda = torch.cuda.is_available()
dev = torch.device("cuda", torch.cuda.device_count() - 1) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(dev)
cfg = ExperimentConfig.model_validate(
    {
        "model": {
            "backbone": {"name": "micro-vit", "mode": "frozen"},
            "decoder": {"num_layers": 2, "temporal_cross_attn": True},
        },
        "data": {"num_classes": 6, "num_frames": 4},
        "train": {
            "num_steps": 8,
            "batch_size": 4,
            "log_every": 8,
            "eval_every": 8,
            "checkpoint_every": 8,
            "amp": "bfloat16",
        },
    }
)


class Source:
    steps_per_epoch, bad_videos = 3, 0

    def train_batches(self, epoch, first):
        for b in range(first, self.steps_per_epoch):
            g = torch.Generator().manual_seed(epoch * 100 + b)
            clips = torch.randint(0, 256, (4, 3, 4, 32, 32), generator=g, dtype=torch.uint8)
            labels = torch.randint(0, 6, (4,), generator=g)
            if cuda:
                clips, labels = clips.pin_memory(), labels.pin_memory()
            # uint8 clips augmented on the device, as VideoSource does with data.augment.on:
            # device (every op and the flip, over the steps), normalised by the model
            rng = np.random.default_rng([epoch, b])
            plans = np.stack([draw_plan((9, 4), flip=True, rng=rng) for _ in range(4)])
            clips = apply_plans(clips.to(dev, non_blocking=True), plans)
            yield InputBatch(clips, labels, torch.arange(4))

    def val_batches(self):
        g = torch.Generator().manual_seed(999)
        clips = torch.randn((3, 2, 3, 4, 32, 32), generator=g)
        return [InputBatch(clips, torch.randint(0, 6, (3,), generator=g), torch.arange(3))]


class Strict(Callback):
    """Steps 2..7 (no logging, validation or checkpoint) run under sync debug mode "error"."""

    def on_step(self, step, result):
        if cuda:
            torch.cuda.set_sync_debug_mode("error" if step < 7 else "default")


torch.manual_seed(0)
model = create_model(cfg).to(dev)
last = fit(
    create_forward(model, device=dev),
    Source(),
    cfg.train,
    optimization=Optimization.create(model, cfg.train, dev),
    callbacks=[Strict()],
)
print(f"train loop: no host sync in steps 2-7 on {dev}: OK (loss {last.metrics['train/loss']:.3f})")

state = RngState.capture(dev)
first = torch.rand(4, device=dev)
torch.rand(100, device=dev)
state.restore()
assert torch.equal(first, torch.rand(4, device=dev)), "RngState did not restore the draws"
print(f"train loop: RngState captures and restores {dev}'s generator: OK")

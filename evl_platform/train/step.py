"""One optimisation step in plain PyTorch and the parts it updates the weights with.

:func:`train_step` is the forward, backward and update of one batch; ``create_*`` build the
optimizer, schedule and loss scaler from ``train`` (bundled as :class:`Optimization`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from evl_platform.config import TrainConfig
from evl_platform.train.batch import InputBatch, Inputs, autocast, map_inputs, to_device

_AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_LOSS_SCALE = 2.0**16


class EVLForward(nn.Module):
    """Lets one ``forward`` (and so DDP's gradient hooks) take clips or cached features.

    Args:
        model: the EVL model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Inputs) -> torch.Tensor:
        """(N, classes) logits: full model on clips, decoder + head on cached features."""
        if isinstance(inputs, torch.Tensor):
            return self.model(inputs)
        return self.model.classify(inputs)


def create_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only (a frozen backbone has none)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def create_schedule(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for ``warmup_steps``, then cosine decay to zero at ``num_steps``
    (with no warm-up this is the official code's ``CosineAnnealingLR(T_max=num_steps)``)."""
    warmup, total = cfg.warmup_steps, cfg.num_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: ``train.amp`` on CUDA, none on CPU."""
    return _AMP_DTYPES.get(cfg.amp) if device.type == "cuda" else None


def create_scaler(
    device: torch.device, dtype: torch.dtype | None, *, init_scale: float = DEFAULT_LOSS_SCALE
) -> torch.amp.GradScaler:
    """Loss scaling, enabled for float16 autocast only, starting at ``init_scale``."""
    return torch.amp.GradScaler(device.type, init_scale=init_scale, enabled=dtype == torch.float16)


@dataclass
class StepResult:
    """Loss and top-1 hits of one optimisation step on this worker."""

    loss: float
    hits: int
    clips: int


def train_step(
    model: EVLForward | nn.parallel.DistributedDataParallel,
    batch: InputBatch,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp: torch.dtype | None,
    batch_split: int = 1,
) -> StepResult:
    """Forward, backward and update on one batch, split into ``batch_split`` sequential chunks
    whose gradients accumulate (the official ``--batch_split``); DDP syncs only the last."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    inputs, labels = to_device(batch.inputs, device), batch.labels.to(device)
    size = len(labels)
    chunk = math.ceil(size / batch_split)
    loss_sum, hits = 0.0, 0
    starts = range(0, size, chunk)
    for i, start in enumerate(starts):
        part = slice(start, start + chunk)
        sync = i == len(starts) - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast(device, amp):
                logits = model(map_inputs(inputs, lambda x, p=part: x[p]))
                loss = F.cross_entropy(logits.float(), labels[part])
            scaler.scale(loss * (len(labels[part]) / size)).backward()
        loss_sum += loss.item() * len(labels[part])
        hits += int((logits.argmax(-1) == labels[part]).sum())
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return StepResult(loss=loss_sum / size, hits=hits, clips=size)


@dataclass
class Optimization:
    """What a run updates its weights with (saved in and restored from its checkpoints).

    Attributes:
        optimizer: AdamW over the trainable parameters.
        scheduler: the learning-rate schedule, stepped once per step.
        scaler: float16 loss scaling (disabled otherwise).
        device: where the model is and the batches go.
        amp: the autocast dtype; ``None`` runs in full precision.
    """

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: torch.dtype | None

    @classmethod
    def create(cls, model: nn.Module, cfg: TrainConfig, device: torch.device) -> Optimization:
        """:func:`create_optimizer`, :func:`create_schedule` and :func:`create_scaler` for
        ``model`` on ``device``, with :func:`amp_dtype`."""
        optimizer = create_optimizer(model, cfg)
        amp = amp_dtype(cfg, device)
        scheduler = create_schedule(optimizer, cfg)
        return cls(optimizer, scheduler, create_scaler(device, amp), device, amp)

"""One optimisation step in plain PyTorch and the parts it updates the weights with.

:func:`train_step` is the forward, backward and update of one batch; ``create_*`` build the
optimizer, schedule and loss scaler from ``train`` (bundled as :class:`Optimization`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from evl_platform.config import TrainConfig
from evl_platform.models import BlockFeatures
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


class DecoderForward(nn.Module):
    """The trainable part of an EVL model on a frozen backbone: decoder + head on features.

    Its parameters and buffers are the decoder's and the head's only (the backbone is not a
    submodule), so DDP around it neither broadcasts nor watches the shared frozen backbone.

    Args:
        model: the EVL model (its ``classify`` runs decoder + head).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.decoder, self.head = model.decoder, model.head
        self._classify = model.classify  # a bound method: the backbone stays unregistered

    def forward(self, features: Sequence[BlockFeatures]) -> torch.Tensor:
        """(N, classes) logits of one :class:`BlockFeatures` per decoder layer."""
        return self._classify(features)


class FrozenBackboneForward(nn.Module):
    """Clips or features -> logits, the frozen backbone outside the trained module.

    On clips the backbone runs here, without gradients and outside DDP; ``trainable`` (a
    :class:`DecoderForward`, DDP-wrapped with several workers) classifies its features.

    Args:
        model: the EVL model on a frozen backbone.
        trainable: its decoder + head, possibly DDP-wrapped.
    """

    def __init__(self, model: nn.Module, trainable: nn.Module) -> None:
        super().__init__()
        self.model, self.trainable = model, trainable

    def forward(self, inputs: Inputs) -> torch.Tensor:
        """(N, classes) logits of clips (N, 3, T, H, W) or of per-layer features."""
        if isinstance(inputs, torch.Tensor):
            with torch.no_grad():
                inputs = self.model.extract_features(inputs)
        return self.trainable(inputs)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync`` of the trained module (a no-op without DDP)."""
        if isinstance(self.trainable, nn.parallel.DistributedDataParallel):
            return self.trainable.no_sync()
        return contextlib.nullcontext()


def create_forward(
    model: nn.Module, *, device: torch.device, distributed: bool = False
) -> nn.Module:
    """The module :func:`train_step` calls, with DDP around only what trains.

    On a frozen backbone (an EVL model whose ``model.backbone.mode`` is ``frozen``) DDP wraps
    :class:`DecoderForward` with ``forward_sync_buffers=False`` (torch's successor of
    ``broadcast_buffers=False``: its buffers, such as T-CA's index tables, are constants, synced
    once at construction and never per forward) and the backbone runs outside it
    (:class:`FrozenBackboneForward`), as DINOv2's linear evaluation does. A finetuned backbone,
    or a model without one (``cnn3d``), trains whole: DDP wraps :class:`EVLForward`.

    Args:
        model: the model, on ``device``.
        device: where it trains (a CUDA device is DDP's one device id).
        distributed: wrap in DDP (several workers in the default process group).
    """
    ids = [device] if device.type == "cuda" else None
    if not is_frozen_evl(model):
        net: nn.Module = EVLForward(model)
        return nn.parallel.DistributedDataParallel(net, device_ids=ids) if distributed else net
    trainable: nn.Module = DecoderForward(model)
    if distributed:
        trainable = nn.parallel.DistributedDataParallel(
            trainable, device_ids=ids, forward_sync_buffers=False
        )
    return FrozenBackboneForward(model, trainable)


def is_frozen_evl(model: nn.Module) -> bool:
    """Whether ``model`` is an EVL model whose backbone does not train."""
    backbone = getattr(model, "backbone", None)
    return hasattr(model, "classify") and backbone is not None and not backbone.trainable


def unwrap(net: nn.Module) -> nn.Module:
    """The model under its :func:`create_forward` (and DDP) wrappers."""
    if isinstance(net, nn.parallel.DistributedDataParallel):
        net = net.module
    return getattr(net, "model", net)


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
    """Loss and top-1 hits of one optimisation step on this worker, kept on the device.

    Reading them (``float``, ``.item()``) waits for the device: the loop reads them only at
    logging steps (:class:`~evl_platform.train.member.Window`).

    Attributes:
        loss: 0-dim float32 tensor, the mean loss over the batch (NaN or inf if not finite).
        hits: 0-dim int64 tensor, top-1 hits.
        clips: clips in the batch (known on the host).
    """

    loss: torch.Tensor
    hits: torch.Tensor
    clips: int


def train_step(
    model: nn.Module,
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
    whose gradients accumulate (the official ``--batch_split``); DDP syncs only the last.

    Nothing here waits for the device: loss and hits stay device tensors, and the update
    happens whatever the loss (a non-finite one is found at the next logging step, see
    :meth:`~evl_platform.train.member.Window.add`).

    Args:
        model: a :func:`create_forward` module (or :class:`EVLForward`), DDP-wrapped or not.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    inputs = to_device(batch.inputs, device)
    labels = batch.labels.to(device, non_blocking=True)
    size = len(labels)
    chunk = math.ceil(size / batch_split)
    loss_sum = torch.zeros((), device=device)
    hits = torch.zeros((), dtype=torch.int64, device=device)
    starts = range(0, size, chunk)
    for i, start in enumerate(starts):
        part = slice(start, start + chunk)
        sync = i == len(starts) - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast(device, amp):
                logits = model(map_inputs(inputs, lambda x, p=part: x[p]))
                loss = F.cross_entropy(logits.float(), labels[part])
            scaler.scale(loss * (len(labels[part]) / size)).backward()
        loss_sum += loss.detach() * len(labels[part])
        hits += (logits.detach().argmax(-1) == labels[part]).sum()
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

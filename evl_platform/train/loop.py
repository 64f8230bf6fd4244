"""The training and evaluation loop in plain PyTorch (no Ray: the Ray worker wraps it).

A batch's inputs are either decoded clips, (N, C, T, H, W), or backbone features read from
the frozen-feature cache, one :class:`BlockFeatures` per decoder layer with (N, T, L, C)
tensors. Evaluation batches carry a view axis after N; softmax scores are averaged over views.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evl_platform.config import TrainConfig
from evl_platform.models import BlockFeatures

Inputs = torch.Tensor | list[BlockFeatures]
_AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class InputBatch:
    """One batch for the loop, whatever produced it.

    Attributes:
        inputs: clips (N, C, T, H, W) / (N, V, C, T, H, W), or per-layer features with
            (N, T, ...) / (N, V, T, ...) tensors.
        labels: (N,) class indices.
        indices: (N,) dataset positions of the items.
    """

    inputs: Inputs
    labels: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def map_inputs(inputs: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """Applies ``fn`` to the clip tensor or to every feature tensor."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)

    def apply(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else fn(x)

    return [BlockFeatures(fn(f.out), apply(f.q), apply(f.k), apply(f.attn)) for f in inputs]


def to_device(inputs: Inputs, device: torch.device) -> Inputs:
    """Moves inputs to ``device`` (non-blocking from pinned memory)."""
    return map_inputs(inputs, lambda x: x.to(device, non_blocking=True))


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


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision when ``dtype`` is set, a no-op otherwise."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def create_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling, enabled for float16 autocast only."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


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
class EvalResult:
    """View-averaged validation scores of the videos one worker (or all) evaluated.

    Attributes:
        indices: (N,) dataset positions of the videos.
        labels: (N,) true classes.
        probs: (N, classes) softmax probabilities averaged over views.
        seconds: wall time spent.
    """

    indices: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    seconds: float = 0.0

    @staticmethod
    def merge(parts: Sequence[EvalResult]) -> EvalResult:
        """Joins per-worker results, one row per video (first occurrence), sorted by index."""
        indices = np.concatenate([p.indices for p in parts])
        _, first = np.unique(indices, return_index=True)
        return EvalResult(
            indices=indices[first],
            labels=np.concatenate([p.labels for p in parts])[first],
            probs=np.concatenate([p.probs for p in parts])[first],
            seconds=max((p.seconds for p in parts), default=0.0),
        )

    @property
    def loss(self) -> float:
        """Cross-entropy of the view-averaged probabilities."""
        picked = self.probs[np.arange(len(self.labels)), self.labels]
        return float(-np.log(np.clip(picked, 1e-12, None)).mean())

    def topk(self, k: int) -> float:
        """Top-k accuracy in percent."""
        k = min(k, self.probs.shape[1])
        top = np.argsort(-self.probs, axis=1)[:, :k]
        return float((top == self.labels[:, None]).any(axis=1).mean() * 100)

    def confusion(self, num_classes: int) -> np.ndarray:
        """(classes, classes) counts, rows = true class, columns = predicted class."""
        matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(matrix, (self.labels, self.probs.argmax(1)), 1)
        return matrix

    def per_class_accuracy(self, num_classes: int) -> np.ndarray:
        """Top-1 accuracy (percent) of each class; NaN for classes with no video."""
        matrix = self.confusion(num_classes)
        totals = matrix.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(totals > 0, np.diag(matrix) / totals * 100, np.nan)


def evaluate(
    model: nn.Module,
    batches: Iterable[InputBatch],
    *,
    device: torch.device,
    amp: torch.dtype | None,
) -> EvalResult:
    """Multi-view evaluation: every view of a video is classified and the softmax
    probabilities are averaged over views (paper: 3 temporal x 1 spatial)."""
    model.eval()
    start = time.perf_counter()
    indices, labels, probs = [], [], []
    with torch.inference_mode():
        for batch in batches:
            inputs = to_device(batch.inputs, device)
            n, views = len(batch), _num_views(inputs)
            flat = map_inputs(inputs, lambda x: x.flatten(0, 1))  # (N * V, ...)
            with autocast(device, amp):
                logits = model(flat).float()
            probs.append(logits.softmax(-1).unflatten(0, (n, views)).mean(1).cpu().numpy())
            labels.append(batch.labels.numpy())
            indices.append(batch.indices.numpy())
    return EvalResult(
        indices=np.concatenate(indices).astype(np.int64),
        labels=np.concatenate(labels).astype(np.int64),
        probs=np.concatenate(probs).astype(np.float32),
        seconds=time.perf_counter() - start,
    )


def _num_views(inputs: Inputs) -> int:
    tensor = inputs if isinstance(inputs, torch.Tensor) else inputs[0].out
    return tensor.shape[1]


class StepTimer:
    """Wall time of the steps run since the last :meth:`lap`."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def lap(self) -> float:
        """Seconds since the previous lap (or creation)."""
        now = time.perf_counter()
        elapsed, self._start = now - self._start, now
        return elapsed


def batches_from(step: int, steps_per_epoch: int, epoch_batches: Callable) -> Iterator:
    """Yields ``(step, batch)`` forever from ``step`` on, epoch after epoch.

    Args:
        step: the next step to run (0, or the restored step after a resume).
        steps_per_epoch: batches per epoch.
        epoch_batches: ``(epoch, first_batch) -> iterable of batches`` of one epoch.
    """
    epoch, first = divmod(step, steps_per_epoch)
    while True:
        for batch in epoch_batches(epoch, first):
            yield step, batch
            step += 1
        epoch, first = epoch + 1, 0

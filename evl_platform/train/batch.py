"""One batch of the loop, whatever produced it, and the helpers that move or cast it.

A batch's inputs are either decoded clips, (N, C, T, H, W) uint8, or backbone features read
from the frozen-feature cache: one :class:`BlockFeatures` per decoder layer with (N, T, L, C)
tensors, or (for a pack of decoders) block index -> :class:`BlockFeatures` of every block any
member reads. Evaluation batches carry a view axis after N. :func:`batches_from` deals a
run's batches step by step, epoch after epoch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from evl_platform.models import BlockFeatures

Inputs = torch.Tensor | list[BlockFeatures] | dict[int, BlockFeatures]


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

    def block(f: BlockFeatures) -> BlockFeatures:
        return BlockFeatures(fn(f.out), apply(f.q), apply(f.k), apply(f.attn))

    if isinstance(inputs, dict):
        return {index: block(f) for index, f in inputs.items()}
    return [block(f) for f in inputs]


def to_device(inputs: Inputs, device: torch.device) -> Inputs:
    """Moves inputs to ``device`` (non-blocking from pinned memory)."""
    return map_inputs(inputs, lambda x: x.to(device, non_blocking=True))


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision when ``dtype`` is set, a no-op otherwise."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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

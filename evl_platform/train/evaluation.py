"""Multi-view evaluation and its scores (softmax probabilities averaged over views)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from evl_platform.train.batch import InputBatch, Inputs, autocast, map_inputs, to_device


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
    batch_split: int = 1,
) -> EvalResult:
    """Multi-view evaluation: every view of a video is classified and the softmax
    probabilities are averaged over views (paper: 3 temporal x 1 spatial); see
    :func:`evaluate_members` for ``batch_split``."""
    found = evaluate_members({"": model}, batches, device=device, amp=amp, batch_split=batch_split)
    return found[""]


def evaluate_members(
    models: Mapping[str, nn.Module],
    batches: Iterable[InputBatch],
    *,
    device: torch.device,
    amp: torch.dtype | None,
    shared: Callable[[Inputs], Any] | None = None,
    select: Mapping[str, Callable[[Any], Inputs]] | None = None,
    batch_split: int = 1,
) -> dict[str, EvalResult]:
    """:func:`evaluate` of several models on one pass over the batches: each batch is read
    (and, with ``shared``, run through the shared frozen backbone) once, and each model
    classifies ``select[key]`` of it.

    A batch of N videos with V views each is N x V clips; they go through the backbone and
    the models in chunks of at most ``ceil(N / batch_split)`` clips (:func:`eval_chunk`), as
    many as a training step's chunk, never all N x V at once. Scores do not depend on it.
    """
    for model in models.values():
        model.eval()
    start = time.perf_counter()
    indices, labels = [], []
    probs: dict[str, list[np.ndarray]] = {key: [] for key in models}
    with torch.inference_mode():
        for batch in batches:
            inputs = to_device(batch.inputs, device)
            n, views = len(batch), _num_views(inputs)
            flat = map_inputs(inputs, lambda x: x.flatten(0, 1))  # (N * V, ...)
            chunk = eval_chunk(n, batch_split)
            parts: dict[str, list[torch.Tensor]] = {key: [] for key in models}
            for begin in range(0, n * views, chunk):
                piece = map_inputs(
                    flat, lambda x, b=begin, e=begin + chunk: x[b:e]
                )  # (<= chunk, ...)
                with autocast(device, amp):
                    common = piece if shared is None else shared(piece)
                    for key, model in models.items():
                        own = common if select is None else select[key](common)
                        parts[key].append(model(own).float().softmax(-1))  # (<= chunk, classes)
                del common, piece
            for key, chunks in parts.items():
                scores = torch.cat(chunks).unflatten(0, (n, views)).mean(1)  # (N, classes)
                probs[key].append(scores.cpu().numpy())
            labels.append(batch.labels.numpy())
            indices.append(batch.indices.numpy())
    seconds = time.perf_counter() - start
    return {
        key: EvalResult(
            indices=np.concatenate(indices).astype(np.int64),
            labels=np.concatenate(labels).astype(np.int64),
            probs=np.concatenate(parts).astype(np.float32),
            seconds=seconds,
        )
        for key, parts in probs.items()
    }


def eval_chunk(clips: int, batch_split: int) -> int:
    """Clip-views per backbone (and model) pass when evaluating a batch of ``clips`` videos:
    a training step's chunk, ``ceil(clips / batch_split)``."""
    return max(1, math.ceil(clips / batch_split))


def _num_views(inputs: Inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[1]
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs[0]
    return first.out.shape[1]

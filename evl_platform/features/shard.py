"""Extraction of one shard (a contiguous range of a split's videos); plain PyTorch, no Ray.

The Ray task in :mod:`evl_platform.features.extract` calls :func:`extract_shard`, which decodes
the shard's videos with every cached view, runs the frozen backbone over them in small batches
and writes one ``.npy`` shard per requested entry into that entry's temporary directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from evl_platform.config import ExperimentConfig
from evl_platform.data.annotations import Annotations
from evl_platform.data.dataset import VideoDataset
from evl_platform.data.source import image_size
from evl_platform.features.key import view_data
from evl_platform.features.store import shard_name
from evl_platform.models.backbone import BlockFeatures, create_backbone
from evl_platform.models.temporal import adjacent_attention

BATCH_IMAGES = 128
"""Frames per backbone call (several videos x views x frames)."""

_STORAGE = {"float16": (np.float16, torch.float16), "float32": (np.float32, torch.float32)}


def extract_shard(job: dict[str, Any], annotations: Annotations, *, device: str) -> dict[str, Any]:
    """Extracts the features of items ``job["start"]`` to ``job["stop"] - 1`` of a split.

    Args:
        job: plain dict with ``cfg`` (an ``ExperimentConfig`` dump), ``split``, ``start``,
            ``stop``, and ``outputs``: ``[view, layer, kind, staging_dir]`` per entry to write.
        annotations: the split's records.
        device: torch device of the backbone (``cpu`` or ``cuda``).

    Returns:
        Plain dict: ``delivered`` and ``labels`` per item, ``bad`` events as
        ``[path, kind, detail]``, and ``images`` the backbone ran on.
    """
    cfg = ExperimentConfig.model_validate(job["cfg"])
    start, stop = job["start"], job["stop"]
    dataset = VideoDataset(
        annotations,
        data=view_data(cfg, job["split"]),
        image_size=image_size(cfg),
        train=False,
        seed=cfg.seed,
    )
    backbone = create_backbone(cfg.model.backbone).to(device)
    writer = _ShardWriter(job["outputs"], start=start, stop=stop, dtype=cfg.features.dtype)
    per_batch = max(1, BATCH_IMAGES // (len(writer.views) * cfg.data.num_frames))
    delivered: list[int] = []
    labels: list[int] = []
    bad: list[list[str]] = []
    pending: list[torch.Tensor] = []
    with torch.inference_mode():
        for index in range(start, stop):
            sample = dataset[index]
            delivered.append(sample.index)
            labels.append(sample.label)
            bad.extend([event.path, event.kind, event.detail] for event in sample.bad)
            pending.append(sample.clip[writer.views])  # (v, C, T, H, W)
            if len(pending) == per_batch or index == stop - 1:
                clips = torch.stack(pending).to(device)  # (k, v, C, T, H, W)
                writer.write(_run_backbone(backbone, clips, writer.layers, writer.with_qk))
                pending = []
    writer.close()
    return {"delivered": delivered, "labels": labels, "bad": bad, "images": backbone.forward_images}


def _run_backbone(
    backbone: torch.nn.Module, clips: torch.Tensor, layers: list[int], with_qk: bool
) -> dict[int, BlockFeatures]:
    """Backbone features of (k, v, C, T, H, W) clips: ``out`` (k, v, T, L, C) and, with
    ``with_qk``, T-CA's maps ``attn`` (k, v, 2, T-1, P, P) in place of the queries and keys."""
    k, v, _, t = clips.shape[:4]
    frames = clips.transpose(2, 3).flatten(0, 2)  # (k*v*T, C, H, W)
    found = backbone.forward_features(frames, layers, with_qk=with_qk)

    def maps(f: BlockFeatures) -> torch.Tensor | None:
        if f.q is None or f.k is None:
            return None
        clip = (k * v, t)  # (k*v, T, L, H, D) per clip and view
        return adjacent_attention(f.q.unflatten(0, clip), f.k.unflatten(0, clip)).unflatten(
            0, (k, v)
        )

    return {i: BlockFeatures(f.out.unflatten(0, (k, v, t)), attn=maps(f)) for i, f in found.items()}


class _ShardWriter:
    """The shard files of one job, created on the first batch (when item shapes are known)."""

    def __init__(self, outputs: list[list[Any]], *, start: int, stop: int, dtype: str) -> None:
        self.outputs = [
            (int(view), int(layer), str(kind), Path(d)) for view, layer, kind, d in outputs
        ]
        self.views = sorted({view for view, _, _, _ in self.outputs})
        self.layers = sorted({layer for _, layer, _, _ in self.outputs})
        self.with_qk = any(kind != "out" for _, _, kind, _ in self.outputs)
        self.name = shard_name(start, stop)
        self.count = stop - start
        self.np_dtype, self.torch_dtype = _STORAGE[dtype]
        self.arrays: list[np.ndarray] = []
        self.position = 0

    def write(self, found: dict[int, BlockFeatures]) -> None:
        """Appends one batch: block index -> features of (k, v, T, ...) items."""
        for number, (view, layer, kind, directory) in enumerate(self.outputs):
            tensor = getattr(found[layer], kind)[:, self.views.index(view)]  # (k, T, L, ...)
            if number == len(self.arrays):
                self.arrays.append(
                    np.lib.format.open_memmap(
                        directory / self.name,
                        mode="w+",
                        dtype=self.np_dtype,
                        shape=(self.count, *tensor.shape[1:]),
                    )
                )
            batch = tensor.to(self.torch_dtype).cpu().numpy()
            self.arrays[number][self.position : self.position + len(batch)] = batch
        self.position += next(iter(found.values())).out.shape[0]

    def close(self) -> None:
        """Flushes and closes every shard file."""
        if self.position != self.count:
            raise RuntimeError(f"{self.name}: wrote {self.position} of {self.count} items")
        for array in self.arrays:
            array.flush()
        self.arrays.clear()

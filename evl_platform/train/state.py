"""Checkpoint contents: trainable weights, optimizer, schedule, scaler, step, RNG and config.

A checkpoint directory holds ``state.pt`` (written by rank 0), one ``rng_rank<r>.pt`` per
worker, ``config.yaml`` (the resolved config) and ``meta.json`` (step, MLflow run id). A
pack's checkpoint holds one such directory per member, named by its key, and ``pack.json``
(which members stopped, and why). Every ``torch.load`` uses ``weights_only=True``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from evl_platform.config import ExperimentConfig, dump_config, flatten_config
from evl_platform.train.errors import NonFiniteLossError
from evl_platform.train.member import RngState

if TYPE_CHECKING:
    from evl_platform.train.member import Member

STATE_FILE = "state.pt"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
PACK_FILE = "pack.json"
CPU = torch.device("cpu")
FINAL_FILES = "final"  # the run files the last checkpoint carries to the driver
# Fields that change the model's architecture or its weights' meaning: a resume must match.
ARCHITECTURE_PREFIXES = ("model.",)
ARCHITECTURE_KEYS = ("data.num_classes", "data.num_frames")


def rng_file(rank: int) -> str:
    """The name of worker ``rank``'s RNG file in a checkpoint directory."""
    return f"rng_rank{rank}.pt"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state minus a frozen backbone (which the config recreates exactly)."""
    frozen = {
        name for name, p in model.named_parameters() if not p.requires_grad
    } | _frozen_buffers(model)
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in frozen}


def _frozen_buffers(model: nn.Module) -> set[str]:
    backbone = getattr(model, "backbone", None)
    if backbone is None or getattr(backbone, "trainable", True):
        return set()
    return {f"backbone.{name}" for name, _ in backbone.named_buffers()}


@dataclass
class TrainingState:
    """What a resumed worker gets back from a checkpoint."""

    step: int
    device_seconds: float
    run_id: str | None
    metrics: dict[str, float] | None = None


def save_checkpoint(
    directory: Path,
    *,
    rank: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    step: int,
    device_seconds: float,
    cfg: ExperimentConfig,
    run_id: str | None,
    metrics: dict[str, float] | None = None,
    device: torch.device = CPU,
) -> None:
    """Writes this worker's part of a checkpoint into ``directory``; ``metrics`` are the
    values reported with it (re-reported on restore, in case the driver died before they
    were logged). The RNG file holds the CPU's and ``device``'s generator states
    (:class:`~evl_platform.train.member.RngState`)."""
    directory.mkdir(parents=True, exist_ok=True)
    RngState.capture(device).save(directory / rng_file(rank))
    if rank != 0:
        return
    torch.save(
        {
            "model": trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
        },
        directory / STATE_FILE,
    )
    (directory / CONFIG_FILE).write_text(dump_config(cfg))
    meta = {
        "step": step,
        "device_seconds": device_seconds,
        "run_id": run_id,
        "name": cfg.name,
        "metrics": metrics or {},
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))


def load_checkpoint(
    directory: Path,
    *,
    rank: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device = CPU,
) -> TrainingState:
    """Restores a checkpoint written by :func:`save_checkpoint` into live objects, and this
    worker's RNG state (``device``'s CUDA generator on a GPU)."""
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    expected_missing = set(trainable_state(model)) ^ set(model.state_dict())
    if unexpected or set(missing) - expected_missing:
        raise RuntimeError(
            f"{directory}: checkpoint does not fit the model "
            f"(missing {sorted(set(missing) - expected_missing)[:5]}, unexpected {unexpected[:5]})"
        )
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    rng = directory / rng_file(rank)
    if rng.exists():  # absent when resuming on more workers than before
        RngState.load(rng, device).restore()
    meta = json.loads((directory / META_FILE).read_text())
    return TrainingState(meta["step"], meta["device_seconds"], meta["run_id"], meta["metrics"])


def is_architecture_key(key: str) -> bool:
    """Whether a flattened config key belongs to the model's architecture."""
    return key.startswith(ARCHITECTURE_PREFIXES) or key in ARCHITECTURE_KEYS


def architecture_changes(saved: ExperimentConfig, current: ExperimentConfig) -> list[str]:
    """``key: saved -> current`` for every architecture field that differs."""
    old, new = flatten_config(saved), flatten_config(current)
    keys = sorted(k for k in old.keys() | new.keys() if is_architecture_key(k))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def write_pack_state(directory: Path, members: Sequence[Member]) -> None:
    """Writes ``pack.json``: the members that stopped (non-finite loss), with step and loss."""
    failed = {
        m.key: {"step": m.failure.step, "loss": str(m.failure.loss)}
        for m in members
        if m.failure is not None
    }
    (directory / PACK_FILE).write_text(json.dumps({"failed": failed}, indent=2))


def read_pack_state(directory: Path) -> dict[str, NonFiniteLossError]:
    """The stopped members of a checkpoint's ``pack.json`` (none for a run of its own)."""
    path = directory / PACK_FILE
    if not path.is_file():
        return {}
    failed = json.loads(path.read_text())["failed"]
    return {k: NonFiniteLossError(v["step"], float(v["loss"])) for k, v in failed.items()}

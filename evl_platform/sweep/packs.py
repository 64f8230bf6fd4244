"""Packs: the trials of a grid sweep that one backbone pass can train together.

Variants whose backbone-side inputs are identical (backbone and its weights, dtype, dataset
and splits, frames, sampling, views, augmentation, batch size, steps, seed, feature cache:
every config field except the decoder's, the head's, their optimisation and the name, see
:func:`~evl_platform.train.pack.pack_differences`) form a pack: one Tune trial, one
``TorchTrainer``, the frozen backbone run once per batch for all of them
(:func:`~evl_platform.train.launcher.train_pack`). A pack holds at most ``sweep.pack_size``
members (default: what one worker's memory is estimated to fit). A finetuned backbone or a
3D CNN trains alone, and so does every trial with ``--no-pack``. A search sweep (Optuna/ASHA)
keeps one trial per sample: its samples are drawn one after another from the results of the
ones before, and ASHA stops them at different steps, so they do not share a schedule.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

from evl_platform.config import ExperimentConfig
from evl_platform.sweep.plan import Trial
from evl_platform.sweep.runs import TrialTodo
from evl_platform.train.pack import pack_blocker, pack_differences

MEMORY_SHARE = 0.5
"""Share of one worker's memory the members' training state may fill (the rest: the backbone,
the loader, the batch)."""

ACTIVATIONS_PER_LAYER = 8
"""Feature-map-sized tensors one decoder layer keeps for its backward pass (estimate)."""

CPU_WORKER_MEMORY = 4 * 1024**3
"""A CPU worker's memory when the system cannot tell the driver's free memory (bytes);
otherwise the free memory, up to four times this."""

GPU_WORKER_MEMORY = 32 * 1024**3
"""A GPU worker's memory when the driver has no GPU to ask, as on a cluster's CPU head node
(bytes; set ``sweep.pack_size`` for smaller GPUs)."""


@dataclass(frozen=True)
class PackTodo:
    """One Tune trial of a grid sweep: one trial on its own, or a pack of several.

    Attributes:
        trials: its trials in table order.
        packed: it runs through ``train_pack`` (members keyed by their trial's slug).
        resume_run: the Ray Train run (a pack, or a trial's run) to continue.
        run_name: the Ray Train run name (default: from the sweep and the trial or pack).
    """

    trials: tuple[Trial, ...]
    packed: bool
    resume_run: str | None = None
    run_name: str | None = None

    @property
    def label(self) -> str:
        """How progress lines name it."""
        if not self.packed:
            return self.trials[0].key
        return f"pack of {len(self.trials)} ({self.trials[0].key} ...)"


def member_bytes(cfg: ExperimentConfig, *, num_workers: int) -> int:
    """Estimated memory of one member's training state on one worker: its new parameters with
    their gradients and two Adam moments (float32), and the decoder's activations kept for
    the backward pass (about :data:`ACTIVATIONS_PER_LAYER` float32 tensors of the feature
    map's size per decoder layer, for the worker's share of a batch chunk)."""
    from evl_platform.models.info import model_info

    info = model_info(cfg)
    params = int(info["new_params"])  # type: ignore[call-overload]
    clips = max(1, cfg.train.batch_size // num_workers // cfg.train.batch_split)
    feature_map = cfg.data.num_frames * int(info["tokens_per_frame"]) * int(info["backbone_width"])  # type: ignore[call-overload]
    layers = max(1, cfg.model.decoder.num_layers)
    return params * 4 * 4 + clips * feature_map * 4 * ACTIVATIONS_PER_LAYER * layers


def auto_pack_size(cfg: ExperimentConfig, *, use_gpu: bool, num_workers: int) -> int:
    """How many members fit :data:`MEMORY_SHARE` of one worker's memory, at least 1."""
    per_member = member_bytes(cfg, num_workers=num_workers)
    return max(1, int(_worker_memory(use_gpu) * MEMORY_SHARE // per_member))


def _worker_memory(use_gpu: bool) -> int:
    if use_gpu:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory
        return GPU_WORKER_MEMORY
    try:  # Linux; elsewhere the fixed estimate
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return CPU_WORKER_MEMORY
    return min(free, 4 * CPU_WORKER_MEMORY)


@dataclass(frozen=True)
class Packing:
    """How a sweep's trials are packed, and why some are not packed together."""

    packs: tuple[PackTodo, ...]
    reasons: tuple[str, ...]


def pack_todo(
    todo: Sequence[TrialTodo],
    *,
    enabled: bool,
    pack_size: int | None,
    use_gpu: bool,
    num_workers: int,
    stamp: str | None = None,
) -> Packing:
    """Groups the trials still to run into Tune trials.

    Trials continuing a pack stay in it (whatever ``enabled`` says: their checkpoint holds the
    pack); a trial continuing a run of its own stays alone; new trials are packed greedily in
    table order with the first open pack whose members they match, up to ``pack_size``
    (default :func:`auto_pack_size`). ``stamp`` makes new packs' names unique (default: now).
    """
    stamp = stamp or datetime.datetime.now().strftime("%H%M%S")
    resumed: dict[str, list[TrialTodo]] = {}
    packs: list[PackTodo] = []
    groups: list[list[Trial]] = []
    reasons: list[str] = []
    for item in todo:
        if item.packed and item.resume_run:
            resumed.setdefault(item.resume_run, []).append(item)
        elif item.resume_run or not enabled:
            packs.append(PackTodo((item.trial,), False, item.resume_run, item.run_name))
        elif (blocker := pack_blocker(item.trial.cfg)) is not None:
            reasons.append(f"{item.trial.key} trains alone: {blocker}")
            packs.append(PackTodo((item.trial,), False))
        else:
            _place(item.trial, groups, reasons, pack_size, use_gpu, num_workers)
    for name, items in resumed.items():
        packs.append(PackTodo(tuple(i.trial for i in items), True, name, name))
    for index, group in enumerate(groups):
        packed = len(group) > 1
        packs.append(
            PackTodo(tuple(group), packed, None, f"pack{index}-{stamp}" if packed else None)
        )
    return Packing(tuple(packs), tuple(reasons))


def _place(
    trial: Trial,
    groups: list[list[Trial]],
    reasons: list[str],
    pack_size: int | None,
    use_gpu: bool,
    num_workers: int,
) -> None:
    """Puts ``trial`` into the first group it matches that has room, else a new group."""
    full = None
    for group in groups:
        if pack_differences(group[0].cfg, trial.cfg):
            continue
        size = pack_size or auto_pack_size(group[0].cfg, use_gpu=use_gpu, num_workers=num_workers)
        if len(group) < size:
            group.append(trial)
            return
        full = group
    if full is not None:
        reasons.append(f"{trial.key} starts a new pack: the others of its kind are full")
    elif groups:  # name the closest pack and what keeps the trial out of it
        fields = min((pack_differences(g[0].cfg, trial.cfg) for g in groups), key=len)
        closest = next(g for g in groups if pack_differences(g[0].cfg, trial.cfg) == fields)
        shown = ", ".join(fields[:3]) + (" ..." if len(fields) > 3 else "")
        reasons.append(f"{trial.key} cannot join {closest[0].key}: {shown} differs")
    groups.append([trial])


def packing_table(packing: Packing) -> str:
    """What ``--dry-run`` prints about packing: each Tune trial's members, and the reasons."""
    lines = [f"{len(packing.packs)} Tune trials:"]
    for index, pack in enumerate(packing.packs):
        kind = f"pack of {len(pack.trials)}" if pack.packed else "alone"
        lines.append(f"  [{index}] {kind}: {', '.join(t.key for t in pack.trials)}")
    lines.extend(f"  note: {reason}" for reason in packing.reasons)
    return "\n".join(lines)

"""Packs: the trials of a grid sweep that one backbone pass can train together.

Variants whose backbone-side inputs are identical (backbone and its weights, dtype, dataset
and splits, frames, sampling, views, augmentation, batch size, steps, seed, feature cache:
every config field except the decoder's, the head's, their optimisation and the name, see
:func:`~evl_platform.train.pack.pack_differences`) form a pack: one Tune trial, one
``TorchTrainer``, the frozen backbone run once per batch for all of them
(:func:`~evl_platform.train.launcher.train_pack`). A pack holds at most ``sweep.pack_size``
members (default: as many as one worker's memory fits by the pack's memory plan,
:func:`~evl_platform.sweep.memory.pack_memory_bytes`). A finetuned backbone or a
3D CNN trains alone, and so does every trial with ``--no-pack``. A search sweep (Optuna/ASHA)
keeps one trial per sample: its samples are drawn one after another from the results of the
ones before, and ASHA stops them at different steps, so they do not share a schedule.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

from evl_platform.sweep.memory import PackMemory, pack_memory_bytes
from evl_platform.sweep.plan import Trial
from evl_platform.sweep.runs import TrialTodo
from evl_platform.train.pack import pack_blocker, pack_differences

MEMORY_SHARE = 0.9
"""Share of one worker's memory a pack's estimate (:func:`pack_memory_bytes`) may fill; the
rest is headroom for the allocator's fragmentation and the loader's pinned batches."""

UNKNOWN_GPU_MEMORY = 16 * 1024**3
"""A GPU worker's memory when neither a worker, nor the cluster's node types, nor this
machine can tell (bytes): the smallest GPU of :data:`~evl_platform.runtime.capacity.
ACCELERATOR_MEMORY`, so packs stay small rather than run out of memory (set
``sweep.pack_size`` to choose)."""


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


def planned_worker_memory(*, use_gpu: bool, cpus_per_worker: float) -> tuple[int, str]:
    """The memory (bytes) one trial worker will have, and where the figure comes from.

    Attached to Ray: measured on a worker when one is free, else the cluster's node types
    (:func:`~evl_platform.runtime.capacity.worker_memory`). Otherwise (or when those cannot
    tell) this machine's: its GPU's memory, :data:`UNKNOWN_GPU_MEMORY` without one, or its
    available memory for CPU trials.
    """
    import ray

    from evl_platform.runtime.capacity import device_memory, host_memory, worker_memory

    if ray.is_initialized():
        found, source = worker_memory(use_gpu=use_gpu, cpus_per_worker=cpus_per_worker)
        if found:
            return found, source
    if not use_gpu:
        return host_memory(), "this machine's available memory"
    import torch

    if torch.cuda.is_available():
        return device_memory(True), "this machine's GPU"
    return UNKNOWN_GPU_MEMORY, "assumed, no GPU to measure: set sweep.pack_size"


@dataclass(frozen=True)
class Packing:
    """How a sweep's trials are packed, and why some are not packed together."""

    packs: tuple[PackTodo, ...]
    reasons: tuple[str, ...]
    memory: str = ""
    """The memory plan: each pack's estimate against a worker's memory (automatic sizing)."""
    qualified: bool = False
    """Trials are named ``ablation:key`` (a batch over several ablation files)."""


def trial_name(trial: Trial, qualified: bool) -> str:
    """How packing notes name a trial: its key, or ``ablation:key`` in a batch."""
    return f"{trial.ablation}:{trial.key}" if qualified else trial.key


def pack_todo(
    todo: Sequence[TrialTodo],
    *,
    enabled: bool,
    pack_size: int | None,
    use_gpu: bool,
    num_workers: int,
    cpus_per_worker: float = 1.0,
    memory: int | None = None,
    stamp: str | None = None,
    qualified: bool = False,
) -> Packing:
    """Groups the trials still to run into Tune trials.

    Trials continuing a pack stay in it (whatever ``enabled`` says: their checkpoint holds the
    pack); a trial continuing a run of its own stays alone; new trials are packed greedily in
    table order with the first open pack whose members they match, up to ``pack_size``
    members, or (no ``pack_size``) while the pack's :func:`pack_memory_bytes` with the trial
    added fits :data:`MEMORY_SHARE` of a worker's ``memory`` (bytes; default
    :func:`planned_worker_memory`). ``stamp`` makes new packs' names unique (default: now).
    ``qualified``: the notes name trials as ``ablation:key`` (a batch over several files).
    """
    stamp = stamp or datetime.datetime.now().strftime("%H%M%S")
    resumed: dict[str, list[TrialTodo]] = {}
    packs: list[PackTodo] = []
    groups: list[list[Trial]] = []
    reasons: list[str] = []
    device_type = "cuda" if use_gpu else "cpu"
    budget = _Budget(pack_size, memory, use_gpu, cpus_per_worker, num_workers, device_type)
    for item in todo:
        if item.packed and item.resume_run:
            resumed.setdefault(item.resume_run, []).append(item)
        elif item.resume_run or not enabled:
            packs.append(PackTodo((item.trial,), False, item.resume_run, item.run_name))
        elif (blocker := pack_blocker(item.trial.cfg)) is not None:
            reasons.append(f"{trial_name(item.trial, qualified)} trains alone: {blocker}")
            packs.append(PackTodo((item.trial,), False))
        else:
            _place(item.trial, groups, reasons, budget, qualified)
    for name, items in resumed.items():
        packs.append(PackTodo(tuple(i.trial for i in items), True, name, name))
    for index, group in enumerate(groups):
        packed = len(group) > 1
        packs.append(
            PackTodo(tuple(group), packed, None, f"pack{index}-{stamp}" if packed else None)
        )
    return Packing(tuple(packs), tuple(reasons), budget.plan(groups), qualified)


@dataclass
class _Budget:
    """Whether a group of trials may grow: by count (``sweep.pack_size``) or by memory."""

    pack_size: int | None
    memory: int | None
    use_gpu: bool
    cpus_per_worker: float
    num_workers: int
    device_type: str
    source: str = "given"

    def worker_memory(self) -> int:
        if self.memory is None:
            self.memory, self.source = planned_worker_memory(
                use_gpu=self.use_gpu, cpus_per_worker=self.cpus_per_worker
            )
        return self.memory

    def estimate(self, trials: Sequence[Trial]) -> PackMemory:
        return pack_memory_bytes(
            [t.cfg for t in trials], num_workers=self.num_workers, device_type=self.device_type
        )

    def fits(self, group: Sequence[Trial], trial: Trial) -> bool:
        if self.pack_size is not None:
            return len(group) < self.pack_size
        return self.estimate([*group, trial]).total <= self.worker_memory() * MEMORY_SHARE

    def plan(self, groups: Sequence[Sequence[Trial]]) -> str:
        """What the packing printed about memory: each pack's estimate and the budget."""
        if not any(len(g) > 1 for g in groups):
            return ""
        gib = 1024**3
        budget = self.worker_memory() * MEMORY_SHARE
        sizing = "sweep.pack_size" if self.pack_size is not None else "the estimate"
        lines = [
            f"memory plan: {self.worker_memory() / gib:.1f} GiB per worker ({self.source}), "
            f"a pack's estimate may fill {MEMORY_SHARE:.0%}; packs sized by {sizing}"
        ]
        for group in groups:
            if len(group) > 1:
                estimate = self.estimate(group)
                over = " (over the budget)" if estimate.total > budget else ""
                lines.append(
                    f"  pack of {len(group)} ({group[0].key} ...): {estimate.render()}{over}"
                )
        return "\n".join(lines)


def _place(
    trial: Trial,
    groups: list[list[Trial]],
    reasons: list[str],
    budget: _Budget,
    qualified: bool = False,
) -> None:
    """Puts ``trial`` into the first group it matches that has room, else a new group."""
    full = None
    for group in groups:
        if pack_differences(group[0].cfg, trial.cfg):
            continue
        if budget.fits(group, trial):
            group.append(trial)
            return
        full = group
    if full is not None:
        name = trial_name(trial, qualified)
        reasons.append(f"{name} starts a new pack: the others of its kind are full")
    elif groups:  # name the closest pack and what keeps the trial out of it
        fields = min((pack_differences(g[0].cfg, trial.cfg) for g in groups), key=len)
        closest = next(g for g in groups if pack_differences(g[0].cfg, trial.cfg) == fields)
        shown = ", ".join(fields[:3]) + (" ..." if len(fields) > 3 else "")
        reasons.append(
            f"{trial_name(trial, qualified)} cannot join {trial_name(closest[0], qualified)}: "
            f"{shown} differs"
        )
    groups.append([trial])


def packing_table(packing: Packing) -> str:
    """What ``--dry-run`` prints about packing: each Tune trial's members, the reasons, and
    the memory plan."""
    lines = [f"{len(packing.packs)} Tune trials:"]
    for index, pack in enumerate(packing.packs):
        kind = f"pack of {len(pack.trials)}" if pack.packed else "alone"
        shown = ", ".join(trial_name(t, packing.qualified) for t in pack.trials)
        lines.append(f"  [{index}] {kind}: {shown}")
    lines.extend(f"  note: {reason}" for reason in packing.reasons)
    if packing.memory:
        lines.append(packing.memory)
    return "\n".join(lines)

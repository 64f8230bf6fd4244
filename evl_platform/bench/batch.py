"""``bench sweep A.yaml B.yaml ...``: several ablation files packed across tables.

The compute ratio (:func:`paper_compute`) needs no data and trains nothing: the paper
profile's trials of every file are planned as one batch (:func:`~evl_platform.sweep.batch.
plan_batch`: identical trials train once) and packed as a batch packs them, and the compute
per training clip is counted from :func:`~evl_platform.models.info.model_info` (MACs as the
code runs them, ``gflops_per_view_run``). One run per table cell pays, per clip, its
backbone pass and its decoder's forward and backward (taken as three forwards); a pack pays
one backbone pass (to the deepest block a member reads) and each unique member's decoder. A
finetuned backbone trains alone (its backbone's backward counted too), as does a 3D CNN:
they cost the same both ways. Cells are grouped by what their packs share (dataset column,
frames, backbone), so the Kinetics-400 8-frame group's ratio is read on its own line.

The wall ratio (:func:`bench_batch`) runs the local profile's batch packed across tables,
then every file's sweep one after another with one Tune trial per cell, both with the
feature cache off, into temporary MLflow stores.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from evl_platform.bench.data import machine_description
from evl_platform.bench.sweep import BACKWARD_FORWARDS
from evl_platform.config import ExperimentConfig
from evl_platform.runtime.session import ray_session
from evl_platform.sweep.batch import BatchPlan, batch_todo, pack_batch, plan_batch
from evl_platform.sweep.plan import Trial
from evl_platform.sweep.runner import SweepOptions, run_sweep

GIB = 1024**3


@dataclass
class GroupCompute:
    """One group of cells that share a backbone pass when packed.

    Attributes:
        label: what they share (dataset column, frames, backbone and its mode).
        cells: table cells (trials of every file, identical ones counted each time).
        runs: unique trials (what trains when packed).
        packs: Tune trials the packing gives.
        unpacked / packed: GMACs per training clip, one run per cell vs packed.
    """

    label: str
    cells: int = 0
    runs: int = 0
    packs: int = 0
    unpacked: float = 0.0
    packed: float = 0.0

    @property
    def ratio(self) -> float:
        return self.unpacked / self.packed if self.packed else 1.0

    def line(self) -> str:
        return (
            f"  {self.label}: {self.cells} cells, {self.runs} runs in {self.packs} Tune "
            f"trials; {self.unpacked:,.0f} vs {self.packed:,.0f} GMACs per clip: "
            f"{self.ratio:.1f}x"
        )


@dataclass
class BatchCompute:
    """The paper profile's compute, one run per cell vs packed across tables, by group."""

    files: list[str]
    memory: str
    groups: list[GroupCompute] = field(default_factory=list)

    @property
    def unpacked(self) -> float:
        return sum(g.unpacked for g in self.groups)

    @property
    def packed(self) -> float:
        return sum(g.packed for g in self.groups)

    @property
    def ratio(self) -> float:
        return self.unpacked / self.packed if self.packed else 1.0

    @property
    def best(self) -> GroupCompute:
        """The group with the most cells (on the paper's tables: K400, 8 frames, ViT-B/16)."""
        return max(self.groups, key=lambda g: g.cells)

    def render(self) -> str:
        cells = sum(g.cells for g in self.groups)
        lines = [
            f"paper profile, packed across {len(self.files)} tables vs one run per table cell "
            f"({cells} cells), compute per training clip (model-info's MACs as run; a "
            f"decoder's backward = {BACKWARD_FORWARDS:g} forwards); {self.memory}",
            *(g.line() for g in self.groups),
            f"  all cells: {self.ratio:.1f}x less compute; the largest group "
            f"({self.best.label}): {self.best.ratio:.1f}x",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "paper_compute_ratio": round(self.ratio, 2),
            "groups": {g.label: round(g.ratio, 2) for g in self.groups},
            "largest_group_ratio": round(self.best.ratio, 2),
        }


def paper_compute(
    paths: Sequence[str | Path],
    *,
    datasets: Sequence[str] = (),
    worker_gib: float | None = None,
    pack_size: int | None = None,
) -> BatchCompute:
    """The paper profile's compute ratio of the files packed across tables (nothing trains).

    Args:
        paths: ablation files or directories.
        datasets: count only these dataset columns (e.g. ``k400``); default all.
        worker_gib: a worker's memory the packs are sized for (default: as a sweep would
            plan it here, see :func:`~evl_platform.sweep.packs.planned_worker_memory`).
        pack_size: members per pack instead (``bench sweep`` passes the local packs' size).
    """
    from evl_platform.models.info import model_info

    batch = _only(plan_batch(paths, profile="paper", check_scores=False), datasets)
    memory = None if worker_gib is None else int(worker_gib * GIB)
    if pack_size is not None:
        batch = _pack_size(batch, pack_size)
    packing = pack_batch(batch_todo(batch), batch, enabled=True, memory=memory)
    plan_line = packing.memory.splitlines()[0] if packing.memory else "no pack over 1"
    sized = f"packs of at most {pack_size}" if pack_size else plan_line
    result = BatchCompute([str(p) for p in paths], sized)
    groups: dict[str, GroupCompute] = {}
    infos: dict[tuple[str, str], dict] = {}
    counted: dict[str, dict] = {}  # identical configs are counted once
    for plan in batch.grid_plans:
        for trial in plan.trials:
            if trial.scores is None:
                text = trial.cfg.model_dump_json(exclude={"name"})
                if text not in counted:
                    counted[text] = model_info(trial.cfg)
                infos[(plan.ablation.name, trial.key)] = counted[text]
    for plan in batch.grid_plans:
        for trial in plan.trials:
            if trial.scores is None:
                info = infos[(plan.ablation.name, trial.key)]
                group = groups.setdefault(_label(trial), GroupCompute(_label(trial)))
                group.cells += 1
                group.unpacked += _alone(trial, info)
    for pack in packing.packs:
        members = [infos[(t.ablation, t.key)] for t in pack.trials]
        group = groups[_label(pack.trials[0])]
        group.runs += len(members)
        group.packs += 1
        if not pack.packed:
            group.packed += _alone(pack.trials[0], members[0])
            continue
        backbone = max(float(i["backbone_gflops_per_view"]) for i in members)
        decoders = [_decoder(i) for i in members]
        group.packed += backbone + (1.0 + BACKWARD_FORWARDS) * sum(decoders)
    result.groups = sorted(groups.values(), key=lambda g: -g.cells)
    return result


def _label(trial: Trial) -> str:
    cfg = trial.cfg
    model = cfg.model.arch if cfg.model.arch != "evl" else cfg.model.backbone.name
    mode = f" {cfg.model.backbone.mode}" if cfg.model.arch == "evl" else ""
    return f"{trial.dataset} {cfg.data.num_frames}f {model}{mode}"


def _decoder(info: dict) -> float:
    """A model's decoder MACs per view as run (its whole model minus its backbone part)."""
    return float(info["gflops_per_view_run"]) - float(info.get("backbone_gflops_per_view", 0.0))


def _alone(trial: Trial, info: dict) -> float:
    """GMACs per training clip of a trial trained on its own."""
    backward = 1.0 + BACKWARD_FORWARDS
    if trial.cfg.model.arch != "evl":
        return backward * float(info["gflops_per_view_run"])
    backbone = float(info["backbone_gflops_per_view"])
    if trial.cfg.model.backbone.mode == "finetune":
        backbone *= backward
    return backbone + backward * _decoder(info)


def _only(batch: BatchPlan, datasets: Sequence[str]) -> BatchPlan:
    """The batch with only the trials of ``datasets`` (all when empty)."""
    if not datasets:
        return batch
    plans = tuple(
        dataclasses.replace(p, trials=tuple(t for t in p.trials if t.dataset in datasets))
        for p in batch.plans
    )
    kept = {(p.ablation.name, t.key) for p in plans for t in p.trials}
    copies = {k: v for k, v in batch.copies.items() if k in kept}
    return BatchPlan(tuple(p for p in plans if p.trials), copies)


def _pack_size(batch: BatchPlan, size: int) -> BatchPlan:
    """The batch with every file's ``sweep.pack_size`` set to ``size``."""
    plans = []
    for plan in batch.plans:
        spec = plan.ablation.spec
        sweep = spec.sweep.model_copy(update={"pack_size": size})
        ablation = dataclasses.replace(plan.ablation, spec=spec.model_copy(update={"sweep": sweep}))
        plans.append(dataclasses.replace(plan, ablation=ablation))
    return BatchPlan(tuple(plans), batch.copies)


@dataclass
class BatchBench:
    """The batch packed across tables vs every file one after another, one trial per cell."""

    cfg: ExperimentConfig
    files: list[str]
    profile: str
    device_name: str
    compute: BatchCompute
    packed_s: float = 0.0
    unpacked_s: float = 0.0
    tune_trials: tuple[int, int] = (0, 0)
    run_id: str | None = None

    @property
    def ratio(self) -> float:
        return self.unpacked_s / self.packed_s if self.packed_s else 0.0

    def params(self) -> dict[str, object]:
        return {"bench.ablations": " ".join(self.files), "bench.profile": self.profile}

    def metrics(self) -> dict[str, float]:
        return {
            "bench/sweep_seconds_packed": self.packed_s,
            "bench/sweep_seconds_unpacked": self.unpacked_s,
            "bench/sweep_pack_ratio": self.ratio,
            "bench/paper_compute_ratio": self.compute.ratio,
        }

    def to_dict(self) -> dict:
        return {
            "packed_s": round(self.packed_s, 1),
            "unpacked_s": round(self.unpacked_s, 1),
            "ratio": round(self.ratio, 2),
            **self.compute.to_dict(),
        }

    def render(self) -> str:
        return "\n".join(
            [
                f"bench sweep over {len(self.files)} ablation files (profile {self.profile}, "
                f"feature cache off) on {self.device_name}",
                f"  packed across tables:            {self.packed_s:8.0f} s "
                f"({self.tune_trials[0]} Tune trials)",
                f"  one trial per cell, file by file: {self.unpacked_s:8.0f} s "
                f"({self.tune_trials[1]} Tune trials)",
                f"  packed across tables is {self.ratio:.2f}x faster",
                self.compute.render(),
            ]
        )


def bench_batch(
    paths: Sequence[str | Path],
    *,
    profile: str | None = None,
    max_concurrent: int | None = None,
    overrides: Sequence[str] = (),
    address: str | None = None,
) -> BatchBench:
    """Runs the files' batch packed across tables, then each file one trial per cell."""
    from evl_platform.sweep.batch_runner import run_batch

    options = SweepOptions(profile=profile, max_concurrent=max_concurrent, overrides=overrides)
    off = [*overrides, "features.reuse=false"]
    batch = plan_batch(paths, profile=profile, overrides=off)
    local = pack_batch(batch_todo(batch), batch, enabled=True)
    size = max(len(p.trials) for p in local.packs)
    first = next(t for p in batch.grid_plans for t in batch.trained(p))
    result = BatchBench(
        cfg=first.cfg,
        files=[str(p) for p in paths],
        profile=batch.plans[0].ablation.profile,
        device_name=machine_description(),
        compute=paper_compute(paths, pack_size=size),
    )
    with tempfile.TemporaryDirectory() as directory, ray_session(address, log_to_driver=False):
        root = Path(directory)

        def store(name: str, pack: bool) -> SweepOptions:
            uri = f"sqlite:///{root / name}.db"
            return dataclasses.replace(
                options, tracking_uri=uri, storage_path=str(root / name), pack=pack
            )

        began = time.monotonic()
        packed = run_batch(batch, store("packed", True))
        result.packed_s = time.monotonic() - began
        began, trials = time.monotonic(), 0
        for plan in batch.plans:
            trials += run_sweep(plan, store("unpacked", False)).tune_trials
        result.unpacked_s = time.monotonic() - began
        result.tune_trials = (packed.tune_trials, trials)
        if packed.failed:
            raise RuntimeError(f"bench sweep: trials failed: {packed.failed}")
    return result

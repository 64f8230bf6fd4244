"""A batch: several ablation files (paper tables) planned and packed together.

:func:`plan_batch` plans every file as :func:`~evl_platform.sweep.plan.plan_sweep` does (each
trial resolved once), then finds the identical trials: the same resolved config apart from
its ``name`` (:func:`trial_identity`), with the same per-trial resources. The first of them
in file order (then table order) is the trial that trains; its
:attr:`~evl_platform.sweep.plan.Trial.also` lists the other cells its run fills, and the
others are *copies* that train nothing. The trials that
train are packed across files by the same rule as within one
(:func:`~evl_platform.sweep.packs.pack_todo`). A search file (``search`` block) keeps its
samples to itself and runs beside the packs; an external score file trains nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from evl_platform.sweep.packs import Packing, PackTodo, pack_todo, packing_table
from evl_platform.sweep.plan import SweepPlan, TableCell, Trial, dry_run_table, plan_sweep
from evl_platform.sweep.runs import TrialTodo
from evl_platform.sweep.spec import AblationError


def ablation_files(paths: Sequence[str | Path]) -> list[Path]:
    """The ablation files named: a file as given, a directory as every ``*.yaml`` in it (in
    name order); each file once.

    Raises:
        AblationError: a path that does not exist, or a directory without YAML files.
    """
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml"))
            if not found:
                raise AblationError(f"{path}: a directory without ablation files (*.yaml)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise AblationError(f"{path}: no such ablation file or directory")
    unique = {p.resolve(): p for p in files}
    return list(unique.values())


@dataclass(frozen=True)
class BatchPlan:
    """Several ablation files planned together.

    Attributes:
        plans: each file's plan, in the order given; a trial that trains holds in ``also``
            the other cells its run fills.
        copies: (ablation, trial key) of a trial that trains nothing -> the (ablation, key)
            of the identical trial whose run fills its cell.
    """

    plans: tuple[SweepPlan, ...]
    copies: Mapping[tuple[str, str], tuple[str, str]]

    @property
    def grid_plans(self) -> list[SweepPlan]:
        """The plans of files without a search block (their trials may be packed)."""
        return [p for p in self.plans if p.ablation.spec.search is None]

    def trained(self, plan: SweepPlan) -> list[Trial]:
        """The trials of ``plan`` that train (not copies, not external score files)."""
        name = plan.ablation.name
        return [t for t in plan.trials if t.scores is None and (name, t.key) not in self.copies]

    @property
    def cells(self) -> int:
        """Table cells to fill with a trained run: every trial of every grid file."""
        return sum(1 for p in self.grid_plans for t in p.trials if t.scores is None)

    @property
    def unique(self) -> int:
        """Training runs that fill them (identical trials counted once)."""
        return sum(len(self.trained(p)) for p in self.grid_plans)


def plan_batch(
    paths: Sequence[str | Path],
    *,
    profile: str | None = None,
    seeds: int | None = None,
    overrides: Sequence[str] = (),
    check_scores: bool = True,
) -> BatchPlan:
    """Plans every ablation file of ``paths`` (files or directories, :func:`ablation_files`)
    and finds the identical trials across them (``check_scores``: as :func:`plan_sweep`).

    Raises:
        AblationError: a bad file (as :func:`plan_sweep`), or two files with the same ``name``.
    """
    plans: list[SweepPlan] = []
    seen: dict[str, Path] = {}
    for path in ablation_files(paths):
        plan = plan_sweep(
            path, profile=profile, seeds=seeds, overrides=overrides, check_scores=check_scores
        )
        name = plan.ablation.name
        if name in seen:
            raise AblationError(f"{path}: name {name!r} is also the name of {seen[name]}")
        seen[name] = path
        plans.append(plan)
    return _deduplicated(plans)


def trial_identity(plan: SweepPlan, trial: Trial) -> str:
    """What makes two trials the same training run: the resolved config apart from its name
    (the decoder's default feature layers written out: unset reads the last ``num_layers``
    blocks, the same as naming them), and the resources it trains on."""
    cfg = trial.cfg
    config = cfg.model_dump(mode="json", exclude={"name"})
    decoder = cfg.model.decoder
    config["model"]["decoder"]["feature_layers"] = list(decoder.configured_feature_layers())
    resources = plan.ablation.spec.resources.model_dump(mode="json")
    return json.dumps([config, resources], sort_keys=True)


def _deduplicated(plans: Sequence[SweepPlan]) -> BatchPlan:
    """The plans with each trial that trains holding the cells of its identical trials."""
    home: dict[str, tuple[str, str]] = {}
    also: dict[tuple[str, str], list[TableCell]] = {}
    copies: dict[tuple[str, str], tuple[str, str]] = {}
    for plan in plans:
        if plan.ablation.spec.search is not None:
            continue  # a search's samples are drawn at run time: nothing to share
        for trial in plan.trials:
            if trial.scores is not None:
                continue
            identity = trial_identity(plan, trial)
            here = (plan.ablation.name, trial.key)
            if identity in home:
                copies[here] = home[identity]
                also[home[identity]].append(trial.cell)
            else:
                home[identity] = here
                also[here] = []
    updated = []
    for plan in plans:
        name = plan.ablation.name
        trials = tuple(
            replace(t, also=tuple(also[(name, t.key)])) if also.get((name, t.key)) else t
            for t in plan.trials
        )
        updated.append(replace(plan, trials=trials))
    return BatchPlan(tuple(updated), copies)


def batch_todo(batch: BatchPlan) -> list[TrialTodo]:
    """A fresh run's trials to train: every grid file's trials that train, in file order."""
    return [TrialTodo(t) for plan in batch.grid_plans for t in batch.trained(plan)]


def pack_batch(
    todo: Sequence[TrialTodo],
    batch: BatchPlan,
    *,
    enabled: bool,
    memory: int | None = None,
) -> Packing:
    """Packs the trials of every grid file together (:func:`pack_todo`): trials whose files
    give different ``resources`` or ``sweep.pack_size`` are packed apart (the first file's
    size applies within a group)."""
    specs = {p.ablation.name: p.ablation.spec for p in batch.plans}
    groups: dict[str, list[TrialTodo]] = {}
    for item in todo:
        spec = specs[item.trial.ablation]
        key = json.dumps([spec.resources.model_dump(), spec.sweep.pack_size])
        groups.setdefault(key, []).append(item)
    packs: list[PackTodo] = []
    reasons: list[str] = []
    memory_lines: list[str] = []
    for index, items in enumerate(groups.values()):
        spec = specs[items[0].trial.ablation]
        packing = pack_todo(
            items,
            enabled=enabled,
            pack_size=spec.sweep.pack_size,
            use_gpu=spec.resources.use_gpu,
            num_workers=spec.resources.num_workers,
            cpus_per_worker=spec.resources.cpus_per_worker,
            memory=memory,
            stamp=f"{_stamp()}g{index}" if len(groups) > 1 else None,
            qualified=True,
        )
        packs += packing.packs
        reasons += packing.reasons
        memory_lines += [packing.memory] if packing.memory else []
    if len(groups) > 1:
        reasons.append(
            f"{len(groups)} groups of files with different resources or sweep.pack_size: "
            "packed apart"
        )
    return Packing(tuple(packs), tuple(reasons), "\n".join(memory_lines), qualified=True)


def _stamp() -> str:
    import datetime

    return datetime.datetime.now().strftime("%H%M%S")


def batch_dry_run(batch: BatchPlan, packing: Packing | None) -> str:
    """What ``sweep A.yaml B.yaml --dry-run`` prints: each file's trial table, the identical
    trials (trained once), and the packs across files with why others stay apart."""
    lines = []
    for plan in batch.plans:
        lines += [dry_run_table(plan), ""]
    lines.append(
        f"batch: {len(batch.plans)} ablation files, {batch.cells} table cells trained by "
        f"{batch.unique} runs (identical trials train once and fill every cell they are)"
    )
    for plan in batch.grid_plans:
        for trial in plan.trials:
            if trial.also:
                cells = ", ".join(f"{c.ablation}:{c.key} (row {c.row})" for c in trial.also)
                lines.append(f"  {plan.ablation.name}:{trial.key} also fills {cells}")
    beside = [p.ablation.name for p in batch.plans if p.ablation.spec.search is not None]
    if beside:
        lines.append(f"searches, run beside the packs: {', '.join(beside)}")
    if packing is not None:
        lines.append(packing_table(packing))
    return "\n".join(lines)

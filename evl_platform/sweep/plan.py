"""Planning a sweep on the driver: an ablation file's trials, each with its config resolved once.

:func:`plan_sweep` loads the ablation file, expands it into :class:`Trial` s in table order and
resolves every trial's config (bases, profile overlay, the trial's overrides and ``--set``,
paths made absolute) into an :class:`~evl_platform.config.ExperimentConfig`, checking a
search's space against each of them. A bad override is one message naming the ablation file
and the variant before anything runs, and the :class:`SweepPlan` holds everything a sweep
needs: no experiment or ablation file is read after planning, on the driver or in a trial.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from evl_platform.config import ConfigError, ExperimentConfig, apply_overrides, load_config
from evl_platform.sweep.spec import Ablation, AblationError, load_ablation


@dataclass(frozen=True)
class TableCell:
    """One table cell a training run fills: the trial of ``ablation`` keyed ``key``, in row
    ``row`` (the paper's row id) and dataset column ``dataset``."""

    ablation: str
    key: str
    row: str
    dataset: str


@dataclass(frozen=True)
class Trial:
    """One training run of a sweep (or one external ensemble member).

    Attributes:
        key: unique, stable id within the sweep, e.g. ``none/ssv2/seed0``.
        variant / dataset / seed: its table coordinates.
        experiment: the base experiment file (as planned; never read again).
        overrides: dotted ``key=value`` strings applied to it (values as JSON).
        grid: the grid point, dotted key -> value.
        row: the paper's row id.
        scores: an external score file (no training) or ``None``.
        config: the resolved config (``None`` for an external ensemble member).
        ablation: the name of the ablation file it comes from.
        also: the cells of other tables (or other rows of its own) that the same training
            run fills: identical trials of a batch over several files train once
            (:mod:`evl_platform.sweep.batch`).
    """

    key: str
    variant: str
    dataset: str
    seed: int
    experiment: str
    overrides: tuple[str, ...]
    grid: dict[str, Any] = field(default_factory=dict)
    row: str = ""
    scores: str | None = None
    config: ExperimentConfig | None = None
    ablation: str = ""
    also: tuple[TableCell, ...] = ()

    @property
    def slug(self) -> str:
        """The key as a file-name-safe run name part."""
        return slug(self.key)

    @property
    def qualified_slug(self) -> str:
        """``ablation/key`` as a file-name-safe name: its member key in a pack of a batch over
        several ablation files, where keys of different files may coincide."""
        return slug(f"{self.ablation}/{self.key}")

    @property
    def cell(self) -> TableCell:
        """The table cell this trial is in its own ablation file."""
        return TableCell(self.ablation, self.key, self.row, self.dataset)

    @property
    def cfg(self) -> ExperimentConfig:
        """The resolved config of a trial that trains.

        Raises:
            ValueError: an external ensemble member, which has none.
        """
        if self.config is None:
            raise ValueError(f"trial {self.key}: an external score file, no config")
        return self.config

    def to_dict(self) -> dict[str, Any]:
        """Plain data (dicts, lists and scalars), the config as its JSON dump: what crosses
        into a Tune trial. Nothing else may: Tune stands a placeholder in for any other object
        of a grid value and then looks for it at the same place in every other grid value,
        which fails where that place holds an empty tuple."""
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        data["overrides"] = list(self.overrides)
        data["also"] = [asdict(cell) for cell in self.also]
        data["config"] = None if self.config is None else self.config.model_dump(mode="json")
        return data

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Trial:
        """The trial of :meth:`to_dict`, its config validated again."""
        config = data.get("config")
        return Trial(
            **{
                **data,
                "overrides": tuple(data["overrides"]),
                "also": tuple(TableCell(**cell) for cell in data.get("also", ())),
                "config": None if config is None else ExperimentConfig.model_validate(config),
            }
        )


def slug(key: str) -> str:
    """A trial key as a file-name-safe run name part (and a pack member's key)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", key).strip("-")


def override_strings(values: Mapping[str, Any]) -> list[str]:
    """``{"a.b": 1}`` -> ``["a.b=1"]``; values written as JSON, which YAML parses back."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def expand(
    ablation: Ablation,
    *,
    seeds: int | None = None,
    overrides: Sequence[str] = (),
    check_scores: bool = True,
) -> list[Trial]:
    """Every trial of the sweep, in table order (variant, dataset, grid point, seed), each with
    its resolved config (``overrides``: ``--set`` values applied to every trial;
    ``check_scores=False``: an external score file need not exist yet, for counting only).

    Raises:
        AblationError: a trial's config does not load, or an external score file is missing
            (names the ablation file, the variant and the dataset).
    """
    spec = ablation.spec
    grid_keys = list(spec.grid)
    points = [dict(zip(grid_keys, combo, strict=True)) for combo in _product(spec.grid)]
    trials = []
    for name, variant in spec.variants.items():
        for dataset in variant.datasets or tuple(spec.experiments):
            for point in points:
                for seed in spec.seed_list(seeds):
                    suffix = "".join(f"/{k.split('.')[-1]}={v}" for k, v in point.items())
                    seeded = dict.fromkeys(spec.seed_keys, seed)
                    values = override_strings(spec.set | variant.set | point | seeded)
                    trial = Trial(
                        key=f"{name}/{dataset}{suffix}/seed{seed}",
                        variant=name,
                        dataset=dataset,
                        seed=seed,
                        experiment=variant.base.get(dataset, spec.experiments[dataset]),
                        overrides=(*values, f"name={json.dumps(f'{spec.name}-{name}-{dataset}')}"),
                        grid=point,
                        row=variant.row or name,
                        scores=variant.scores.get(dataset),
                        ablation=spec.name,
                    )
                    trials.append(_resolved(ablation, trial, overrides, check_scores))
    return trials


def _product(grid: Mapping[str, Sequence[Any]]) -> list[tuple[Any, ...]]:
    return list(itertools.product(*grid.values())) if grid else [()]


def _resolved(
    ablation: Ablation, trial: Trial, overrides: Sequence[str], check_scores: bool = True
) -> Trial:
    """The trial with its config loaded once (an ensemble member: its score file checked)."""
    if trial.scores is not None:
        if check_scores and not Path(trial.scores).is_file():
            raise AblationError(
                f"{ablation.path}: variants.{trial.variant}.scores.{trial.dataset}: "
                f"no such file {trial.scores} (export that model's validation scores "
                "there: a video_id column, optionally label, then one column per class)"
            )
        return trial
    try:
        config = load_config(
            trial.experiment, overrides=[*trial.overrides, *overrides], profile=ablation.profile
        )
    except ConfigError as err:
        raise AblationError(
            f"{ablation.path}: variant {trial.variant!r} on {trial.dataset}: {err}"
        ) from None
    return replace(trial, config=config)


@dataclass(frozen=True)
class SweepPlan:
    """Everything a sweep runs, resolved on the driver.

    Attributes:
        ablation: the loaded ablation file (its text is the parent run's artifact).
        trials: every trial in table order, each with its resolved config.
        overrides: the ``--set`` values every trial's config holds.
    """

    ablation: Ablation
    trials: tuple[Trial, ...]
    overrides: tuple[str, ...] = ()


def plan_sweep(
    path: str | Path,
    *,
    profile: str | None = None,
    seeds: int | None = None,
    overrides: Sequence[str] = (),
    check_scores: bool = True,
) -> SweepPlan:
    """Loads the ablation, expands its trials and resolves and checks every trial's config.

    Args:
        path: the ablation file.
        profile: experiment profile (default ``local``).
        seeds: run seeds ``0..seeds-1`` instead of the file's ``seeds``.
        overrides: dotted ``--set`` overrides applied to every trial.
        check_scores: refuse an external score file that does not exist (``False``: a plan
            for counting only, e.g. ``bench sweep --compute-only``).

    Raises:
        AblationError: a bad ablation file, trial config, score file or search space.
    """
    ablation = load_ablation(path, profile=profile)
    trials = expand(ablation, seeds=seeds, overrides=overrides, check_scores=check_scores)
    _check_search(ablation, trials)
    return SweepPlan(ablation, tuple(trials), tuple(overrides))


def _check_search(ablation: Ablation, trials: Sequence[Trial]) -> None:
    """Applies both bounds (or every choice) of each searched key to every trial's config, so
    that a search space naming no config key, or a bad value, fails before anything runs."""
    search = ablation.spec.search
    if search is None:
        return
    for trial in trials:
        for key, dimension in search.space.items():
            for value in dimension.extremes() if trial.scores is None else ():
                try:
                    apply_overrides(trial.cfg, {key: value}, source=f"search.space.{key}")
                except ConfigError as err:
                    raise AblationError(
                        f"{ablation.path}: variant {trial.variant!r} on {trial.dataset}: {err}"
                    ) from None


def dry_run_table(plan: SweepPlan) -> str:
    """The trial table ``--dry-run`` prints: variant, dataset, seed, what stands in, overrides."""
    ablation, trials = plan.ablation, plan.trials
    spec = ablation.spec
    lines = [
        f"{ablation.path}: {spec.name} (paper Table {spec.table.paper}), profile "
        f"{ablation.profile}, {len(trials)} trials"
    ]
    header = ("variant", "dataset", "seed", "runs on", "overrides")
    hidden = (*(f"{key}=" for key in spec.seed_keys), "name=")  # the seed column says them
    rows = []
    for trial in trials:
        if trial.scores is not None:
            runs_on, shown = f"scores file {Path(trial.scores).name}", "-"
        else:
            cfg = trial.cfg
            model = cfg.model.backbone.name if cfg.model.arch == "evl" else cfg.model.arch
            runs_on = f"{cfg.data.dataset}, {cfg.data.num_frames}f, {model}"
            shown = " ".join(o for o in trial.overrides if not o.startswith(hidden))
        rows.append((trial.variant, trial.dataset, str(trial.seed), runs_on, shown or "-"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        lines.append("  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[4]]))
    if spec.search is not None:
        space = ", ".join(
            f"{k} {next(f'{kind}{list(v)}' for kind, v in dim if v is not None)}"
            for k, dim in spec.search.space.items()
        )
        asha = f", ASHA grace {spec.search.asha.grace_period}" if spec.search.asha else ""
        lines.append(
            f"search: {spec.search.algorithm}, {spec.search.num_samples} samples per trial "
            f"row maximising {spec.search.metric}{asha}; space: {space}"
        )
    if spec.ensemble is not None:
        pairs = ", ".join(f"{a} + {b}" for a, b in spec.ensemble.pairs)
        lines.append(f"ensembles: {pairs}; alphas {list(spec.ensemble.alphas)}")
    return "\n".join(lines)

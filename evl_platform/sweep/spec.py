"""Ablation files: one paper table as named variants over base experiments, and its trials.

An ablation file (``ablations/*.yaml``) names base ``experiments`` per dataset column, the
``variants`` (dotted overrides, the table's rows), optional ``grid``, ``seeds`` and
``seed_keys`` (the config keys each seed is written to, ``[seed]`` by default), the
per-trial ``resources``, a ``table`` block telling the report which paper table it fills,
and optionally a ``search`` (Optuna TPE + ASHA) or an ``ensemble`` block. ``profiles:``
overlays the file itself per profile (e.g. smaller depths for the tiny local backbone).
:mod:`evl_platform.sweep.plan` expands a loaded file into its trials.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evl_platform.config.loader import DEFAULT_PROFILE

DEFAULT_ALPHAS = tuple(round(i / 10, 1) for i in range(11))
_VARIANT_KEYS = {"set", "datasets", "row", "base", "scores"}


class AblationError(ValueError):
    """A bad ablation file; the message names the file and the key."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TableSpec(_Frozen):
    """Which paper table the sweep fills.

    Attributes:
        paper: the paper's table id (``8a``, ``6b``, ``10``...).
        title: a short caption.
        metric: the measured value of each cell.
        columns: dataset key -> the paper's column id (e.g. ``ssv2: SSv2``).
    """

    paper: str
    title: str = ""
    metric: str = "val/acc1"
    columns: dict[str, str] = {}


class VariantSpec(_Frozen):
    """One row of the table.

    Attributes:
        set: dotted overrides applied to the base experiment.
        datasets: the dataset keys this variant runs on (default: all).
        row: the paper's row id (default: the variant name).
        base: dataset key -> experiment file replacing the ablation's base (another model).
        scores: dataset key -> external score file (CSV/parquet) used instead of training:
            an ensemble member trained elsewhere.
    """

    set: dict[str, Any] = {}
    datasets: tuple[str, ...] | None = None
    row: str | None = None
    base: dict[str, str] = {}
    scores: dict[str, str] = {}


class ResourcesSpec(_Frozen):
    """Resources of one trial's training run."""

    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False


class SweepSpec(_Frozen):
    """How the grid's trials share Tune trials (``sweep:`` block; see
    :mod:`evl_platform.sweep.packs`).

    Attributes:
        pack_size: most variants trained on one backbone pass; ``None`` (default): as many as
            one worker's memory is estimated to fit. ``1`` trains every variant alone.
    """

    pack_size: int | None = Field(None, ge=1)


class SearchDimension(_Frozen):
    """One searched key: exactly one of ``loguniform``, ``uniform`` ([low, high]) or
    ``choice`` (values)."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    choice: tuple[Any, ...] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SearchDimension:
        given = [k for k in ("loguniform", "uniform", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform, uniform, choice")
        bounds = self.loguniform or self.uniform
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"low must be below high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform bounds must be positive")
        return self

    def extremes(self) -> tuple[Any, ...]:
        """The values at the edges of the dimension: both bounds, or every choice."""
        return self.loguniform or self.uniform or self.choice or ()


class AshaSpec(_Frozen):
    """ASHA early stopping over training steps (``max_t`` defaults to ``train.num_steps``)."""

    grace_period: int = Field(ge=1)
    reduction_factor: int = Field(2, ge=2)
    max_t: int | None = Field(None, ge=1)


class SearchSpec(_Frozen):
    """A model-based search (Optuna TPE) instead of a fixed grid."""

    algorithm: Literal["optuna_tpe"] = "optuna_tpe"
    metric: str = "val/acc1"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(ge=1)
    space: dict[str, SearchDimension]
    asha: AshaSpec | None = None

    @field_validator("space")
    @classmethod
    def _not_empty(cls, space: dict[str, SearchDimension]) -> dict[str, SearchDimension]:
        if not space:
            raise ValueError("the search space is empty")
        return space


class EnsembleSpec(_Frozen):
    """Ensembles of pairs of variants (Tables 10-11).

    Attributes:
        pairs: (model 1, model 2) variant names; the gain is measured over model 1.
        alphas: weights of model 1 tried on the validation set.
    """

    pairs: tuple[tuple[str, str], ...] = Field(min_length=1)
    alphas: tuple[float, ...] = DEFAULT_ALPHAS

    @field_validator("alphas")
    @classmethod
    def _unit_interval(cls, alphas: tuple[float, ...]) -> tuple[float, ...]:
        bad = [a for a in alphas if not 0.0 <= a <= 1.0]
        if bad or not alphas:
            raise ValueError(f"alphas must be non-empty and within [0, 1], got {list(alphas)}")
        return alphas


class AblationSpec(_Frozen):
    """A validated ablation file (after its profile overlay)."""

    name: str
    description: str = ""
    table: TableSpec
    experiments: dict[str, str] = Field(min_length=1)
    variants: dict[str, VariantSpec] = Field(min_length=1)
    seeds: int | tuple[int, ...] = 1
    seed_keys: tuple[str, ...] = Field(("seed",), min_length=1)
    grid: dict[str, tuple[Any, ...]] = {}
    set: dict[str, Any] = {}
    resources: ResourcesSpec = ResourcesSpec()
    sweep: SweepSpec = SweepSpec()
    search: SearchSpec | None = None
    ensemble: EnsembleSpec | None = None

    @field_validator("variants", mode="before")
    @classmethod
    def _shorthand(cls, variants: Any) -> Any:
        """A variant may be written as its overrides alone: ``none: {a.b: false}``."""
        if not isinstance(variants, Mapping):
            return variants
        return {
            name: v
            if isinstance(v, Mapping) and v and set(v) <= _VARIANT_KEYS
            else {"set": v or {}}
            for name, v in variants.items()
        }

    @model_validator(mode="after")
    def _consistent(self) -> AblationSpec:
        for name, variant in self.variants.items():
            for key in (*(variant.datasets or ()), *variant.base, *variant.scores):
                if key not in self.experiments:
                    raise ValueError(
                        f"variants.{name}: unknown dataset {key!r} "
                        f"(experiments: {', '.join(self.experiments)})"
                    )
        if isinstance(self.seeds, int) and self.seeds < 1:
            raise ValueError("seeds must be >= 1 (a count) or a list of seeds")
        if len(set(self.seed_keys)) != len(self.seed_keys):
            raise ValueError(f"seed_keys: a key is named twice in {list(self.seed_keys)}")
        for index, pair in enumerate(self.ensemble.pairs if self.ensemble else ()):
            for member in pair:
                if member not in self.variants:
                    raise ValueError(f"ensemble.pairs[{index}]: unknown variant {member!r}")
        if self.search is not None and self.grid:
            raise ValueError("give either a search or a grid, not both")
        return self

    def seed_list(self, count: int | None = None) -> tuple[int, ...]:
        """The seeds to run: ``count`` (``--seeds``) overrides the file."""
        if count is not None:
            return tuple(range(count))
        return tuple(range(self.seeds)) if isinstance(self.seeds, int) else self.seeds


@dataclass(frozen=True)
class Ablation:
    """A loaded ablation file and the profile it was loaded for."""

    path: Path
    profile: str
    spec: AblationSpec
    text: str

    @property
    def name(self) -> str:
        return self.spec.name


def load_ablation(path: str | Path, *, profile: str | None = None) -> Ablation:
    """Reads, overlays (``profiles.<profile>``) and validates an ablation file.

    Raises:
        AblationError: one line naming the file and the offending key.
    """
    path = Path(path)
    shown = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise AblationError(f"{shown}: cannot read: {err.strerror or err}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise AblationError(f"{shown}: not valid YAML: {err}".splitlines()[0]) from None
    if not isinstance(raw, dict):
        raise AblationError(f"{shown}: expected a mapping at the top level")
    selected = profile or DEFAULT_PROFILE
    profiles = raw.pop("profiles", None) or {}
    if not isinstance(profiles, dict):
        raise AblationError(f"{shown}: profiles: expected a mapping of profile -> overlay")
    if selected in profiles:
        raw = _overlay(raw, profiles[selected] or {})
    raw.setdefault("name", path.stem)
    try:
        spec = AblationSpec.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p not in ("function-after",))
        message = first["msg"].removeprefix("Value error, ")
        raise AblationError(f"{shown}: {where + ': ' if where else ''}{message}") from None
    base = path.parent
    experiments = {k: str(_resolve(base, v)) for k, v in spec.experiments.items()}
    variants = {
        name: v.model_copy(
            update={
                "base": {k: str(_resolve(base, p)) for k, p in v.base.items()},
                "scores": {k: str(_resolve(base, p)) for k, p in v.scores.items()},
            }
        )
        for name, v in spec.variants.items()
    }
    spec = spec.model_copy(update={"experiments": experiments, "variants": variants})
    for key, file in experiments.items():
        if not Path(file).is_file():
            raise AblationError(f"{shown}: experiments.{key}: no such file {file}")
    return Ablation(path=path, profile=selected, spec=spec, text=text)


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _overlay(raw: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merges ``overlay`` into a copy of ``raw``; ``variants`` and ``grid`` given in an
    overlay replace the file's (a profile's table rows are its own)."""
    merged = copy.deepcopy(raw)
    for key, value in overlay.items():
        if key in ("variants", "grid", "experiments") or not isinstance(value, Mapping):
            merged[key] = copy.deepcopy(value)
        elif isinstance(merged.get(key), Mapping):
            merged[key] = _overlay(dict(merged[key]), value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged

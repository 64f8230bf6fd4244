"""Collect: MLflow runs -> DataFrames (the only part of the report that talks to a store).

:func:`collect` reads every run of the chosen experiments through the MLflow client, read
only: one row per run with its tags, the last value of each metric and the few params the
tables need, plus the ensembles' α curves, the per-class accuracy of runs on the motion
stand-in and the ``table`` block of each sweep's ablation file (from the sweep's artifact).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from evl_platform.tracking import names
from evl_platform.tracking.client import Tracker

# The params a table or figure reads, under short column names.
PARAMS = {
    "name": "config_name",
    "model.arch": "arch",
    "model.backbone.mode": "backbone_mode",
    "data.num_frames": "num_frames",
    "data.test_views.temporal": "views_temporal",
    "data.test_views.spatial": "views_spatial",
    "data.num_classes": "num_classes",
}
# Tags copied into columns of the same name.
TAGS = (
    names.TAG_KIND,
    names.TAG_PROFILE,
    names.TAG_DATASET,
    names.TAG_BACKBONE,
    names.TAG_VARIANT,
    names.TAG_ABLATION,
    names.TAG_PAPER_TABLE,
    names.TAG_PAPER_ROW,
    names.TAG_DATASET_KEY,
    names.TAG_SEED,
    names.TAG_TRIAL,
    names.TAG_CELLS,
    names.TAG_BATCH,
    names.TAG_EARLY_STOPPED,
    names.TAG_MEMBER_A,
    names.TAG_MEMBER_B,
    names.TAG_MEMBER_A_NAME,
    names.TAG_MEMBER_B_NAME,
    "bench",
    "device",
    names.TAG_GIT_COMMIT,
)
RUN_COLUMNS = (
    "run_id",
    "run_name",
    "experiment",
    "parent_run_id",
    "status",
    "start_time",
    "end_time",
    *TAGS,
    *PARAMS.values(),
)
_PROGRESS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
# Standing in for the paper's datasets: per-class accuracy is collected for runs on this one.
MOTION_STAND_IN = "synthetic-motion"


@dataclass
class Collection:
    """What the report is made from.

    Attributes:
        uri: the tracking URI read.
        experiments: the experiments read, in name order.
        runs: one row per run (:data:`RUN_COLUMNS` plus one column per metric: its last value).
        curves: ensemble α curves: ``run_id``, ``alpha``, ``acc1``.
        per_class: run id -> that run's ``val_per_class.csv`` (motion stand-in runs only).
        ablation_tables: sweep parent run id -> the ``table`` block of its ablation file.
        missing: what was asked for or expected but not found, one sentence each.
    """

    uri: str
    experiments: list[str]
    runs: pd.DataFrame
    curves: pd.DataFrame
    per_class: dict[str, pd.DataFrame] = field(default_factory=dict)
    ablation_tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def collect(
    tracking_uri: str | None = None, experiments: Sequence[str] | None = None
) -> Collection:
    """Reads the runs of ``experiments`` (default: every experiment in the store).

    An experiment name that does not exist is reported in ``missing``, not raised.
    """
    tracker = Tracker(tracking_uri)
    known = {e.name: e.experiment_id for e in tracker.client.search_experiments()}
    missing: list[str] = []
    if experiments:
        chosen = []
        for name in experiments:
            if name in known:
                chosen.append(name)
            else:
                listed = ", ".join(sorted(known)) or "none"
                missing.append(f"experiment {name!r} is not in {tracker.uri} (it has: {listed})")
    else:
        chosen = sorted(known)
    runs = [(name, run) for name in sorted(chosen) for run in tracker.search(name)]
    if experiments:
        runs += _copies(tracker, chosen, sorted(set(known) - set(chosen)))
    frame = _runs_frame(runs)
    return Collection(
        uri=tracker.uri,
        experiments=sorted(chosen),
        runs=frame,
        curves=_curves(tracker, frame),
        per_class=_per_class(tracker, frame, missing),
        ablation_tables=_ablation_tables(tracker, frame, missing),
        missing=missing,
    )


def _copies(
    tracker: Tracker, chosen: Sequence[str], others: Sequence[str]
) -> list[tuple[str, Run]]:
    """The runs of ``others`` that also fill a cell of a chosen ablation: a batch over several
    ablation files trains an identical trial once, under one table's experiment, and lists
    every table it fills in its ``evl.cells`` tag (a sweep's experiment is named after its
    ablation)."""
    found = []
    for ablation in chosen:
        entry = json.dumps({"ablation": ablation})[1:-1].replace("'", "''")  # as tagged
        query = f"tags.`{names.TAG_CELLS}` LIKE '%{entry}%'"
        found += [(other, run) for other in others for run in tracker.search(other, query)]
    unique = {run.info.run_id: (other, run) for other, run in found}
    return list(unique.values())


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow draws a progress bar per artifact download; a report downloads many small ones."""
    before = os.environ.get(_PROGRESS)
    os.environ[_PROGRESS] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_PROGRESS, None)
        else:
            os.environ[_PROGRESS] = before


def _runs_frame(runs: Sequence[tuple[str, Run]]) -> pd.DataFrame:
    rows = []
    for experiment, run in runs:
        tags, params = run.data.tags, run.data.params
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "experiment": experiment,
            "parent_run_id": tags.get("mlflow.parentRunId"),
            "status": run.info.status,
            "start_time": run.info.start_time,
            "end_time": run.info.end_time,
        }
        row.update({tag: tags.get(tag) for tag in TAGS})
        row.update({column: params.get(param) for param, column in PARAMS.items()})
        row.update(run.data.metrics)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else list(RUN_COLUMNS))
    for column in RUN_COLUMNS:  # text columns: None where absent, never NaN
        values = frame[column] if column in frame.columns else pd.Series(index=frame.index)
        frame[column] = values.astype(object).where(values.notna(), None)
    return frame.sort_values(["experiment", "start_time", "run_id"], kind="stable").reset_index(
        drop=True
    )


def _finished(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    return frame[(frame[names.TAG_KIND] == kind) & (frame["status"] == names.STATUS_FINISHED)]


def _curves(tracker: Tracker, frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for run_id in _finished(frame, names.KIND_ENSEMBLE)["run_id"]:
        for point in tracker.client.get_metric_history(run_id, names.ENSEMBLE_ACC1):
            rows.append({"run_id": run_id, "alpha": point.step / 100, "acc1": point.value})
    curves = pd.DataFrame(rows, columns=["run_id", "alpha", "acc1"])
    return curves.sort_values(["run_id", "alpha"]).reset_index(drop=True)


def _per_class(
    tracker: Tracker, frame: pd.DataFrame, missing: list[str]
) -> dict[str, pd.DataFrame]:
    motion = _finished(frame, names.KIND_TRAIN)
    motion = motion[motion[names.TAG_DATASET] == MOTION_STAND_IN]
    # a search sample that ASHA stopped early never evaluated its last step: no per-class file
    motion = motion[motion[names.TAG_EARLY_STOPPED] != "true"]
    found: dict[str, pd.DataFrame] = {}
    for run_id in motion["run_id"]:
        text = _artifact_text(tracker, run_id, names.ARTIFACT_PER_CLASS)
        if text is None:
            missing.append(f"run {run_id} has no {names.ARTIFACT_PER_CLASS} artifact")
            continue
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "per_class.csv"
            path.write_text(text, encoding="utf-8")
            found[run_id] = pd.read_csv(path)
    return found


def _ablation_tables(
    tracker: Tracker, frame: pd.DataFrame, missing: list[str]
) -> dict[str, dict[str, Any]]:
    """The ``table`` block of each sweep's ablation file (with its profile's overlay)."""
    tables: dict[str, dict[str, Any]] = {}
    for _, parent in frame[frame[names.TAG_KIND] == names.KIND_SWEEP].iterrows():
        text = _artifact_text(tracker, parent["run_id"], names.ARTIFACT_ABLATION)
        if text is None:
            missing.append(f"sweep run {parent['run_name']} has no {names.ARTIFACT_ABLATION}")
            continue
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            missing.append(f"sweep run {parent['run_name']}: unreadable ablation.yaml ({err})")
            continue
        table = dict(raw.get("table") or {})
        overlay = ((raw.get("profiles") or {}).get(parent[names.TAG_PROFILE]) or {}).get("table")
        table.update(overlay or {})
        tables[parent["run_id"]] = table
    return tables


def _artifact_text(tracker: Tracker, run_id: str, path: str) -> str | None:
    with tempfile.TemporaryDirectory() as directory, _no_progress_bars():
        try:
            local = tracker.client.download_artifacts(run_id, path, directory)
        except (MlflowException, OSError):
            return None
        return Path(local).read_text(encoding="utf-8")

"""Runs -> measurements: which paper table cell each finished run fills, and with what value.

Pure functions over the :class:`~evl_platform.report.collect.Collection` DataFrames:

- a sweep's trial run fills ``(paper_table, paper_row, column)``: its ablation's ``table``
  block maps the run's ``dataset_key`` tag to the paper's column (``ssv2 -> SSv2``); an id like
  ``6a+8b`` names one paper table per dataset, picked by the column. A run of a batch over
  several ablation files fills every cell its ``evl.cells`` tag lists (:func:`run_cells`),
  each read with its own table's ``table`` block (from that table's parent run);
- an ensemble run of a sweep fills an ensemble table's row ``"<model 1> + <model 2>"``;
- a plain ``train`` run of one of the paper's experiment files fills that model's rows
  (:data:`EXPERIMENT_ROWS`), and a few sweep rows also fill rows of Tables 2 and 4
  (:data:`ALSO_FILLS`);
- ``bench infer`` runs fill Table 3 and ``bench step`` runs Table 5, one measured row per
  experiment and device (the newest run).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pandas as pd

from evl_platform.report.collect import Collection
from evl_platform.report.paper import PaperTable, paper_tables
from evl_platform.tracking import names

MEASUREMENT_COLUMNS = ("table", "row", "label", "column", "value", "run_id", "dataset", "order")

# Plain training runs of the paper's experiment files -> the (table, row) cells they fill.
EXPERIMENT_ROWS: dict[str, tuple[tuple[str, str], ...]] = {
    "k400_vitb16_8f": (("1", "8"), ("4", "evl_vitb16_8")),
    "k400_vitb16_16f": (("1", "16"),),
    "k400_vitb16_32f": (("1", "32"),),
    "k400_vitl14_8f": (("1", "ViT-L/14 8"),),
    "k400_vitl14_16f": (("1", "ViT-L/14 16"),),
    "k400_vitl14_32f": (("1", "ViT-L/14 32"),),
    "k400_vitl14_336_32f": (("1", "ViT-L/14 336px 32"),),
    "ssv2_vitb16_8f": (("9", "8"),),
    "ssv2_vitb16_16f": (("9", "16"),),
    "ssv2_vitb16_32f": (("9", "32"),),
    "ssv2_vitl14_8f": (("9", "ViT-L/14 8"),),
    "ssv2_vitl14_32f": (("9", "ViT-L/14 32"),),
    "ssv2_vitl14_336_32f": (("9", "ViT-L/14 336px 32"),),
}
# (ablation, paper row, column) of a sweep -> further (table, row) cells the same runs fill.
ALSO_FILLS: dict[tuple[str, str, str], tuple[tuple[str, str], ...]] = {
    ("decoder_depth", "1", "K-400"): (("2", "evl 1 layer 8x3"),),
    ("decoder_depth", "4", "K-400"): (("2", "evl 4 layers 8x3"),),
    ("num_frames", "32", "K-400"): (("2", "evl 4 layers 32x3"),),
    ("num_frames", "8", "K-400"): (("4", "evl_vitb16_8"),),
}
# Run metric -> paper column id, for accuracy/model-info/training-time tables; the accuracy
# column itself is the dataset's column (``K-400`` / ``SSv2``).
RUN_COLUMNS = {
    names.MODEL_GFLOPS: ("gflops", 1.0),
    names.MODEL_NEW_PARAMS: ("new_params_m", 1e-6),
    names.DEVICE_HOURS: ("gpu_hours", 1.0),
}
ENSEMBLE_COLUMNS = {
    names.ENSEMBLE_ACC1_A: "acc1_a",
    names.ENSEMBLE_ACC1_B: "acc1_b",
    names.ENSEMBLE_ACC1_BEST: "acc1_ensemble",
    names.ENSEMBLE_GAIN: "gain",
    names.ENSEMBLE_ALPHA: "alpha",
}
INFER_COLUMNS = {
    "gflops_per_video": "gflops",
    "latency_ms": "latency_ms",
    "throughput_videos_per_s": "throughput_vps",
}
STEP_ROWS = ("frozen_gap", "open_gap", "frozen_evl", "open_evl")


def resolve_table(paper_table: str, column: str) -> str | None:
    """The paper table holding ``column`` among the ``+``-joined ids (``6a+8b``, ``SSv2`` ->
    ``8b``); ``None`` when no part matches."""
    tables = paper_tables()
    for part in str(paper_table).split("+"):
        table = tables.get(part.strip())
        if table is None:
            continue
        if table.dataset == column or (
            table.dataset is None and any(c.id == column for c in table.columns)
        ):
            return table.id
    return None


def measurements(collection: Collection, profile: str) -> tuple[pd.DataFrame, list[str]]:
    """Every (table, row, column) value the finished runs of ``profile`` give.

    Returns:
        The measurements (:data:`MEASUREMENT_COLUMNS`; ``label`` is the row's display label
        when it differs from the paper row, ``order`` keeps first-run order for new rows) and
        what is missing (runs without the metric their cell needs), one sentence each.
    """
    runs = finished(collection.runs, profile)
    missing: list[str] = []
    rows = [
        *_sweep_cells(runs, collection, missing),
        *_ensemble_cells(runs, collection),
        *_experiment_cells(runs),
        *_bench_cells(runs),
    ]
    frame = pd.DataFrame(rows, columns=list(MEASUREMENT_COLUMNS))
    return frame, missing


def finished(runs: pd.DataFrame, profile: str) -> pd.DataFrame:
    """FINISHED runs of ``profile`` (ensemble runs without a profile tag count for any)."""
    same = (runs[names.TAG_PROFILE] == profile) | runs[names.TAG_PROFILE].isna()
    return runs[(runs["status"] == names.STATUS_FINISHED) & same]


def _cell(table: str, row: str, column: str, value: Any, run: pd.Series, label: str = "") -> dict:
    return {
        "table": table,
        "row": row,
        "label": label,
        "column": column,
        "value": float(value),
        "run_id": run["run_id"],
        "dataset": run[names.TAG_DATASET],
        "order": run["start_time"],
    }


def _has(run: pd.Series, metric: str) -> bool:
    return metric in run.index and pd.notna(run[metric])


def _sweep_cells(runs: pd.DataFrame, collection: Collection, missing: list[str]) -> Iterator[dict]:
    trials = runs[(runs[names.TAG_KIND] == names.KIND_TRAIN) & runs[names.TAG_ABLATION].notna()]
    for _, run in trials.iterrows():
        for cell in run_cells(run):
            block = collection.ablation_tables.get(cell["parent_run_id"])
            if block is None:
                continue
            column = (block.get("columns") or {}).get(cell["dataset_key"])
            table_id = resolve_table(cell["paper_table"], column) if column else None
            if table_id is None:
                continue
            metric = block.get("metric") or names.VAL_ACC1
            if not _has(run, metric):
                missing.append(f"run {run['run_name']} ({cell['trial']}) has no {metric}")
                continue
            row = cell["row"]
            targets = [(table_id, row)]
            targets += ALSO_FILLS.get((cell["ablation"], row, column), ())
            for table, target_row in targets:
                yield _cell(table, target_row, column, run[metric], run)
                yield from _model_cells(paper_tables()[table], target_row, run)


def run_cells(run: pd.Series) -> list[dict[str, str]]:
    """The table cells a sweep's training run fills: its ``evl.cells`` tag (every identical
    trial of a batch over several ablation files), else its own trial's tags."""
    listed = run.get(names.TAG_CELLS)
    if isinstance(listed, str) and listed:
        try:
            return list(json.loads(listed))
        except ValueError:
            pass  # not written by this platform: its own tags say its one cell
    return [
        {
            "ablation": run[names.TAG_ABLATION],
            "paper_table": run[names.TAG_PAPER_TABLE],
            "row": run[names.TAG_PAPER_ROW],
            "dataset_key": run[names.TAG_DATASET_KEY],
            "trial": run[names.TAG_TRIAL],
            "parent_run_id": run["parent_run_id"],
        }
    ]


def _model_cells(table: PaperTable, row: str, run: pd.Series) -> Iterator[dict]:
    """The run's size, cost and device-hours, where ``table`` has such columns."""
    columns = {c.id for c in table.columns}
    for metric, (column, scale) in RUN_COLUMNS.items():
        if column in columns and _has(run, metric):
            yield _cell(table.id, row, column, run[metric] * scale, run)
    if "views" in columns and pd.notna(run["views_temporal"]):
        views = int(run["views_temporal"]) * int(run["views_spatial"] or 1)
        yield _cell(table.id, row, "views", views, run)


def _ensemble_cells(runs: pd.DataFrame, collection: Collection) -> Iterator[dict]:
    sweeps = runs[(runs[names.TAG_KIND] == names.KIND_ENSEMBLE) & runs[names.TAG_ABLATION].notna()]
    for _, run in sweeps.iterrows():
        block = collection.ablation_tables.get(run["parent_run_id"]) or {}
        column = (block.get("columns") or {}).get(run[names.TAG_DATASET_KEY])
        table = resolve_table(run[names.TAG_PAPER_TABLE], column) if column else None
        if table is None:
            continue
        for metric, target in ENSEMBLE_COLUMNS.items():
            if _has(run, metric):
                yield _cell(table, run[names.TAG_PAPER_ROW], target, run[metric], run)


def _experiment_cells(runs: pd.DataFrame) -> Iterator[dict]:
    plain = runs[(runs[names.TAG_KIND] == names.KIND_TRAIN) & runs[names.TAG_ABLATION].isna()]
    for _, run in plain.iterrows():
        for table_id, row in EXPERIMENT_ROWS.get(run["config_name"], ()):
            table = paper_tables()[table_id]
            if _has(run, names.VAL_ACC1) and table.dataset:
                yield _cell(table_id, row, table.dataset, run[names.VAL_ACC1], run)
            yield from _model_cells(table, row, run)


def _bench_cells(runs: pd.DataFrame) -> Iterator[dict]:
    bench = runs[runs[names.TAG_KIND] == names.KIND_BENCHMARK]
    newest = bench.sort_values("start_time").groupby(["bench", "config_name", "device"]).tail(1)
    for _, run in newest.sort_values("start_time").iterrows():
        where = f"{run['config_name']} on {run['device']}"
        if run["bench"] == "infer":
            for metric, column in INFER_COLUMNS.items():
                if _has(run, metric):
                    yield _cell("3", "evl_vitb16_8", column, run[metric], run, where)
        elif run["bench"] == "step":
            for row in STEP_ROWS:
                if _has(run, f"step_time_s/{row}"):
                    yield _cell("5", row, "step_time_s", run[f"step_time_s/{row}"], run, where)
                if _has(run, f"max_batch/{row}"):
                    yield _cell("5", row, "max_batch", run[f"max_batch/{row}"], run, where)

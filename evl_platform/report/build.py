"""``evl-platform report``: collect -> measurements -> tables, figures, findings -> files.

The output folder gets ``index.html`` (self-contained: figures embedded as data URIs),
``README.md`` (the same tables in Markdown), ``tables/table_<id>.csv`` per table,
``figures/*.png`` and, on request, ``tex/table_<id>.tex``. A manifest
(``.evl-report-files``) lists what the report wrote, so regenerating removes only the
report's own files that are no longer produced and never touches anything else.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from evl_platform import __version__
from evl_platform.data.synth import SYNTHETIC_DATASETS
from evl_platform.report import figures, page, render
from evl_platform.report.cells import EXPERIMENT_ROWS, finished, measurements
from evl_platform.report.collect import Collection, collect
from evl_platform.report.document import Report
from evl_platform.report.findings import ALL_ROW, NONE_ROW, findings
from evl_platform.report.paper import PaperColumn, paper_table
from evl_platform.report.tables import ReportRow, ReportTable, build_tables
from evl_platform.sweep.results import Cell
from evl_platform.tracking import git_commit, names

FORMATS = ("html", "md", "csv", "tex")
DEFAULT_FORMATS = ("html", "md", "csv")
MANIFEST = ".evl-report-files"


@dataclass
class ReportOptions:
    """Settings of one report (the CLI's flags)."""

    out: Path
    tracking_uri: str | None = None
    experiments: Sequence[str] = ()
    profile: str | None = None
    formats: Sequence[str] = DEFAULT_FORMATS


@dataclass
class ReportOutcome:
    """What :func:`write_report` wrote. ``empty``: no run at all could be reported."""

    out: Path
    files: list[Path]
    report: Report

    @property
    def empty(self) -> bool:
        return self.report.measured == 0


def write_report(options: ReportOptions) -> ReportOutcome:
    """Builds the report from the tracking store and writes it to ``options.out``."""
    unknown = sorted(set(options.formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown report format(s) {', '.join(unknown)}: choose from {FORMATS}")
    collection = collect(options.tracking_uri, options.experiments or None)
    report = build_report(collection, options.profile)
    files = _write(report, Path(options.out), options.formats)
    return ReportOutcome(Path(options.out), files, report)


def choose_profile(runs: pd.DataFrame) -> str:
    """The profile of the newest finished training run (``local`` when there is none)."""
    trained = runs[
        (runs[names.TAG_KIND] == names.KIND_TRAIN) & (runs["status"] == names.STATUS_FINISHED)
    ]
    trained = trained[trained[names.TAG_PROFILE].notna()]
    if trained.empty:
        return "local"
    return str(trained.sort_values("start_time").iloc[-1][names.TAG_PROFILE])


def build_report(collection: Collection, profile: str | None = None) -> Report:
    """The tables, figures and findings of the runs of ``profile`` (pure, given the data)."""
    profile = profile or choose_profile(collection.runs)
    measured, missing = measurements(collection, profile)
    runs = finished(collection.runs, profile)
    tables = [*build_tables(measured), runs_table(runs)]
    by_id = {t.id: t for t in tables}
    report = Report(
        profile=profile,
        header=_header(collection, runs, profile),
        tables=tables,
        findings=findings(by_id, _stand_in(tables)),
        missing=[*collection.missing, *_status_notes(collection.runs, profile), *missing],
    )
    report.figures = _figures(collection, runs, measured)
    if report.measured == 0:
        where = ", ".join(collection.experiments) or "no experiments"
        report.missing.insert(
            0, f"no finished run of profile {profile!r} in {collection.uri} ({where})"
        )
    return report


def runs_table(runs: pd.DataFrame) -> ReportTable:
    """Every finished training run: dataset, model, size, cost, device-hours, top-1."""
    columns = [
        PaperColumn("new_params_m", "new params (M)"),
        PaperColumn("gflops", "GFLOPs / video"),
        PaperColumn("gpu_hours", "device-hours"),
        PaperColumn("acc1", "val top-1 (%)"),
    ]
    info = [
        PaperColumn("experiment", "MLflow experiment"),
        PaperColumn("dataset", "dataset"),
        PaperColumn("model", "model"),
        PaperColumn("frames", "frames × views"),
    ]
    rows = []
    for _, run in runs[runs[names.TAG_KIND] == names.KIND_TRAIN].iterrows():
        values = {
            "new_params_m": run.get(names.MODEL_NEW_PARAMS) / 1e6
            if pd.notna(run.get(names.MODEL_NEW_PARAMS))
            else None,
            "gflops": run.get(names.MODEL_GFLOPS),
            "gpu_hours": run.get(names.DEVICE_HOURS),
            "acc1": run.get(names.VAL_ACC1),
        }
        cells = {k: Cell([float(v)]) for k, v in values.items() if v is not None and pd.notna(v)}
        rows.append(ReportRow(run["run_name"], run["run_name"], None, _run_info(run), cells))
    return ReportTable(
        id="runs",
        title="Training runs",
        caption="Every finished training run of this profile (sweep trials included), oldest "
        "first; GFLOPs are multiply-accumulates over all test views, as in the paper.",
        kind="runs",
        paper=None,
        info_columns=info,
        columns=columns,
        rows=rows,
    )


def _run_info(run: pd.Series) -> dict[str, str]:
    views = ""
    if pd.notna(run["views_temporal"]) and pd.notna(run["num_frames"]):
        count = int(run["views_temporal"]) * int(run["views_spatial"] or 1)
        views = f"{run['num_frames']}×{count}"
    model = run[names.TAG_BACKBONE] or ""
    if run["backbone_mode"] and run["arch"] == "evl":
        model = f"{model} ({run['backbone_mode']})"
    return {
        "experiment": run["experiment"],
        "dataset": _dataset(run[names.TAG_DATASET]),
        "model": model,
        "frames": views,
    }


def _dataset(name: str | None) -> str:
    if not name:
        return ""
    return f"{name} (stand-in)" if name in SYNTHETIC_DATASETS else name


def _stand_in(tables: list[ReportTable]):
    """Column id -> ``SSv2 (synthetic-motion stand-in)`` when measured on a stand-in."""
    measured: dict[str, set[str]] = {}
    for table in tables:
        for column, datasets in table.datasets.items():
            measured.setdefault(column, set()).update(datasets)

    def name(column: str) -> str:
        datasets = sorted(measured.get(column, ()))
        stand_ins = [d for d in datasets if d in SYNTHETIC_DATASETS]
        return f"{column} ({', '.join(stand_ins)} stand-in)" if stand_ins else column

    return name


def _status_notes(runs: pd.DataFrame, profile: str) -> list[str]:
    notes = []
    mine = runs[runs[names.TAG_PROFILE] == profile]
    unfinished = mine[
        (mine["status"] != names.STATUS_FINISHED) & (mine[names.TAG_KIND] != names.KIND_SWEEP)
    ]
    if not unfinished.empty:
        counts = unfinished["status"].value_counts().sort_index()
        shown = ", ".join(f"{n} {status}" for status, n in counts.items())
        notes.append(f"runs not finished, left out: {shown}")
    others = sorted(set(runs[names.TAG_PROFILE].dropna()) - {profile})
    if others:
        notes.append(
            f"runs of profile {', '.join(others)} exist too; this report shows profile "
            f"{profile!r} (choose with --profile)"
        )
    return notes


def _header(collection: Collection, runs: pd.DataFrame, profile: str) -> dict[str, str]:
    ends = runs["end_time"].dropna()
    newest = (
        datetime.datetime.fromtimestamp(ends.max() / 1000, datetime.UTC).strftime("%Y-%m-%d")
        if not ends.empty
        else "no runs"
    )
    datasets = sorted(set(runs[names.TAG_DATASET].dropna()))
    return {
        "profile": profile,
        "datasets": ", ".join(_dataset(d) for d in datasets) or "none",
        "platform": f"evl-platform {__version__}, git {git_commit()[:12]}",
        "runs up to": newest,
        "tracking store": collection.uri,
        "experiments": ", ".join(collection.experiments) or "none",
        **({"sweeps": sweeps} if (sweeps := _sweeps(runs, profile)) else {}),
    }


def _sweeps(runs: pd.DataFrame, profile: str) -> str:
    """How the sweeps ran: each batch (several ablation files in one ``evl-platform sweep``)
    with its tables and wall time, first table's start to last table's end (a resumed batch
    includes the pause), and how many single-file sweeps."""
    mine = runs[runs[names.TAG_PROFILE] == profile]
    parents = mine[mine[names.TAG_KIND] == names.KIND_SWEEP]
    parts = []
    batched = parents[parents[names.TAG_BATCH].notna()]
    for batch, group in batched.groupby(names.TAG_BATCH, sort=True):
        minutes = (group["end_time"].max() - group["start_time"].min()) / 60_000
        wall = f", {minutes:.1f} min wall" if pd.notna(minutes) else ""
        tables = ", ".join(sorted(group[names.TAG_ABLATION].dropna()))
        files = f"{len(group)} ablation file{'s' if len(group) > 1 else ''}"
        parts.append(f"{batch}: {files} in one sweep ({tables}){wall}")
    single = len(parents) - len(batched)
    if single:
        parts.append(f"{single} single-file sweep{'s' if single > 1 else ''}")
    return "; ".join(parts)


def _figures(
    collection: Collection, runs: pd.DataFrame, measured: pd.DataFrame
) -> dict[str, tuple[str, bytes]]:
    trained = runs[runs[names.TAG_KIND] == names.KIND_TRAIN]
    out = {}
    points = _points(trained, {names.MODEL_GFLOPS: "gflops", names.VAL_ACC1: "acc1"})
    out["accuracy_vs_gflops.png"] = (
        "Accuracy vs GFLOPs per video (Fig. 1, right): the paper's Table 1 and the runs here.",
        figures.accuracy_vs_gflops(paper_table("1"), points, _evl_rows("1")),
    )
    hours = _points(trained, {names.DEVICE_HOURS: "hours", names.VAL_ACC1: "acc1"})
    hours["mode"] = trained.loc[hours.index, "backbone_mode"].fillna("frozen")
    out["hours_vs_accuracy.png"] = (
        "Training device-hours vs accuracy (Fig. 3): the paper's Table 4 and the runs here.",
        figures.hours_vs_accuracy(paper_table("4"), hours),
    )
    ensembles = runs[runs[names.TAG_KIND] == names.KIND_ENSEMBLE]
    labels = {r["run_id"]: _ensemble_label(r) for _, r in ensembles.iterrows()}
    curves = collection.curves[collection.curves["run_id"].isin(list(labels))]
    if not curves.empty:
        out["ensemble_alpha.png"] = (
            "Ensemble accuracy vs α, chosen α circled (Tables 10-11).",
            figures.ensemble_curves(curves, {r: labels[r] for r in curves["run_id"].unique()}),
        )
    per_class = _per_class_runs(collection, runs, measured)
    if per_class:
        out["motion_per_class.png"] = (
            "Per-class accuracy on the motion stand-in, time-reversal pairs side by side.",
            figures.per_class_pairs({r: collection.per_class[r] for r in per_class}, per_class),
        )
    return out


def _evl_rows(table_id: str) -> set[str]:
    """The rows of a paper table that are EVL models: those the paper's experiment files fill."""
    return {row for cells in EXPERIMENT_ROWS.values() for t, row in cells if t == table_id}


def _points(runs: pd.DataFrame, metrics: dict[str, str]) -> pd.DataFrame:
    present = [m for m in metrics if m in runs.columns]
    if len(present) < len(metrics):
        return pd.DataFrame(columns=["label", "dataset", *metrics.values()])
    have = runs.dropna(subset=present)
    frame = have[present].rename(columns=metrics)
    frame["label"] = have["run_name"]
    frame["dataset"] = have[names.TAG_DATASET].map(_dataset)
    return frame


def _ensemble_label(run: pd.Series) -> str:
    pair = run[names.TAG_PAPER_ROW] or (
        f"{run[names.TAG_MEMBER_A_NAME]} + {run[names.TAG_MEMBER_B_NAME]}"
    )
    where = run[names.TAG_DATASET_KEY] or run[names.TAG_DATASET] or ""
    return f"{pair} ({where})" if where else pair


def _per_class_runs(
    collection: Collection, runs: pd.DataFrame, measured: pd.DataFrame
) -> dict[str, str]:
    """Run id -> label: Table 8a's no-module and all-module SSv2 runs when there are, else
    the newest two motion stand-in runs."""
    available = [r for r in runs["run_id"] if r in collection.per_class]
    table = measured[(measured["table"] == "8a") & (measured["column"] == "SSv2")]
    chosen = {}
    for row, label in ((NONE_ROW, "no temporal modules"), (ALL_ROW, "T-Conv + T-PE + T-CA")):
        ids = [r for r in table[table["row"] == row]["run_id"] if r in available]
        if ids:
            chosen[ids[-1]] = f"{label} ({ids[-1][:8]})"
    if chosen:
        return chosen
    names_by_id = dict(zip(runs["run_id"], runs["run_name"], strict=True))
    return {r: names_by_id[r] for r in available[-2:]}


def _write(report: Report, out: Path, formats: Sequence[str]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    contents: dict[str, bytes] = {}
    for name, (_, data) in report.figures.items():
        contents[f"figures/{name}"] = data
    for table in report.tables:
        if "csv" in formats:
            contents[f"tables/table_{table.id}.csv"] = render.csv_text(table).encode()
        if "tex" in formats:
            contents[f"tex/table_{table.id}.tex"] = render.latex(table).encode()
    if "md" in formats:
        contents["README.md"] = page.markdown_page(report).encode()
    if "html" in formats:
        contents["index.html"] = page.html_page(report).encode()
    written = [_put(out / name, data) for name, data in sorted(contents.items())]
    _prune(out, set(contents))
    (out / MANIFEST).write_text("".join(f"{name}\n" for name in sorted(contents)), "utf-8")
    return written


def _put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
    return path


def _prune(out: Path, keep: set[str]) -> None:
    """Removes files the previous report wrote (its manifest) that this one did not."""
    manifest = out / MANIFEST
    if not manifest.exists():
        return
    for name in manifest.read_text("utf-8").split():
        path = (out / name).resolve()
        if name not in keep and path.is_file() and path.is_relative_to(out.resolve()):
            path.unlink()

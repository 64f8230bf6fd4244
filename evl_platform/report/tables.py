"""Measurements + the paper's numbers -> report tables (pure: DataFrames in, tables out).

Each :class:`ReportTable` is one paper table: the paper's rows in the paper's order (each
followed by any measured row that carries its own label, e.g. a benchmark on another device),
then measured rows the paper does not have (e.g. a depth the stand-in profile adds). Every
numeric column shows the measured mean ± std over seeds and n, the paper's value and the
difference; a cell with no run says "not run".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from evl_platform.data.synth import SYNTHETIC_DATASETS
from evl_platform.report.paper import PaperColumn, PaperTable, paper_tables
from evl_platform.sweep.results import Cell

NOT_RUN = "not run"
# Columns holding top-1 accuracies (%) or differences of them.
ACCURACY_COLUMNS = ("K-400", "SSv2", "acc1", "acc1_a", "acc1_b", "acc1_ensemble", "gain", "alpha")
# Columns measured here that the paper does not print (the ensemble's chosen α).
EXTRA_COLUMNS = {"ensemble": (PaperColumn("alpha", "α chosen"),)}


@dataclass
class ReportRow:
    """One row: the paper row it compares with (``paper_row``, ``None`` when the paper has no
    such row), its label, descriptive fields and measured cells by column id."""

    key: str
    label: str
    paper_row: str | None
    info: dict[str, str] = field(default_factory=dict)
    cells: dict[str, Cell] = field(default_factory=dict)

    def cell(self, column: str) -> Cell:
        return self.cells.get(column, Cell())


@dataclass
class ReportTable:
    """One table of the report.

    Attributes:
        id: the paper's table id (``8a``) or a name for tables the paper has not (``runs``).
        title / caption: from the paper.
        kind: accuracy | model_info | speed | training_time | ensemble | runs.
        paper: the paper table compared with (``None`` for ``runs``).
        columns: numeric columns in display order; ``paper_columns`` those with paper values.
        datasets: column id -> datasets measured in it (stand-ins flagged by :meth:`notes`).
    """

    id: str
    title: str
    caption: str
    kind: str
    paper: PaperTable | None
    info_columns: list[PaperColumn]
    columns: list[PaperColumn]
    rows: list[ReportRow]
    datasets: dict[str, list[str]] = field(default_factory=dict)

    @property
    def measured(self) -> int:
        """How many cells hold at least one measured value."""
        return sum(1 for r in self.rows for c in r.cells.values() if c.n)

    def paper_value(self, row: ReportRow, column: str) -> float | None:
        if self.paper is None or row.paper_row is None:
            return None
        if all(c.id != column for c in self.paper.columns):  # measured here only (α chosen)
            return None
        return self.paper.value(row.paper_row, column)

    def diff(self, row: ReportRow, column: str) -> float | None:
        """Measured mean minus the paper's value (``None`` if either is absent)."""
        paper, cell = self.paper_value(row, column), row.cell(column)
        if paper is None or not cell.n or math.isinf(paper):
            return None
        return cell.mean - paper

    def row(self, key: str) -> ReportRow | None:
        return next((r for r in self.rows if r.key == key), None)

    def notes(self) -> list[str]:
        """Which dataset each column was measured on, stand-ins labelled as such."""
        out = []
        for column, datasets in self.datasets.items():
            shown = ", ".join(
                f"{d} (synthetic stand-in)" if d in SYNTHETIC_DATASETS else d for d in datasets
            )
            out.append(f"{column} measured on {shown}")
        return out


def build_tables(measured: pd.DataFrame) -> list[ReportTable]:
    """One table per paper table, in paper order, filled from ``measured``
    (:func:`~evl_platform.report.cells.measurements`)."""
    return [
        _table(paper, measured[measured["table"] == paper.id]) for paper in paper_tables().values()
    ]


def _table(paper: PaperTable, measured: pd.DataFrame) -> ReportTable:
    extra = list(EXTRA_COLUMNS.get(paper.kind, ()))
    rows = [ReportRow(r.id, r.label, r.id, dict(r.info)) for r in paper.rows]
    by_key = {r.key: r for r in rows}
    labelled: dict[str, list[ReportRow]] = {}
    new_rows: list[ReportRow] = []
    for (row_id, label), group in _groups(measured):
        key = f"{row_id} | {label}" if label else row_id
        row = by_key.get(key)
        if row is None:
            known = paper.row(row_id)
            shown = (known.label if known else row_id) + (f" ({label})" if label else "")
            row = ReportRow(
                key, shown, row_id if known else None, dict(known.info) if known else {}
            )
            by_key[key] = row
            (labelled.setdefault(row_id, []) if known else new_rows).append(row)
        for column, values in group.groupby("column", sort=False)["value"]:
            row.cells[column] = Cell(list(values))
    ordered = []
    for row in rows:
        ordered += [row, *labelled.get(row.key, [])]
    datasets = {
        column: sorted(set(group["dataset"].dropna()))
        for column, group in measured.groupby("column", sort=True)
        if column in ACCURACY_COLUMNS and any(c.id == column for c in paper.columns)
    }
    return ReportTable(
        id=paper.id,
        title=paper.title,
        caption=paper.caption,
        kind=paper.kind,
        paper=paper,
        info_columns=list(paper.info_columns),
        columns=[*paper.columns, *extra],
        rows=ordered + new_rows,
        datasets=datasets,
    )


def _groups(measured: pd.DataFrame) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    """Measured rows in first-run order; values within a group in run order."""
    measured = measured.sort_values(["order", "run_id"], kind="stable")
    return list(measured.groupby(["row", "label"], sort=False))

"""A sweep's results table: rows (variants) x dataset columns, mean ± std over seeds.

Values come from the trials' MLflow runs (the last logged value of the table's metric), so a
resumed sweep's table covers the trials of every attempt.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Cell:
    """The measured values of one (row, column) over seeds."""

    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (0 for a single seed)."""
        if len(self.values) < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (len(self.values) - 1))

    def text(self) -> str:
        if not self.values:
            return "not run"
        if self.n == 1:
            return f"{self.mean:.1f}"
        return f"{self.mean:.1f} ± {self.std:.1f} (n={self.n})"


@dataclass
class ResultsTable:
    """One table: ``rows`` x ``columns`` of :class:`Cell`.

    Attributes:
        title: the caption (ablation name and paper table).
        metric: what the cells measure.
        rows / columns: labels in display order.
        column_notes: what stands in for each column (e.g. ``synthetic-motion``).
    """

    title: str
    metric: str
    rows: list[str]
    columns: list[str]
    column_notes: dict[str, str] = field(default_factory=dict)
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)

    def add(self, row: str, column: str, value: float) -> None:
        if row not in self.rows:
            self.rows.append(row)
        if column not in self.columns:
            self.columns.append(column)
        self.cells.setdefault((row, column), Cell()).values.append(float(value))

    def cell(self, row: str, column: str) -> Cell:
        return self.cells.get((row, column), Cell())

    def _header(self) -> list[str]:
        return [
            f"{c} ({self.column_notes[c]})" if self.column_notes.get(c) else c for c in self.columns
        ]

    def markdown(self) -> str:
        """A Markdown table with the caption as a heading line."""
        lines = [f"**{self.title}** ({self.metric})", ""]
        lines.append("| variant | " + " | ".join(self._header()) + " |")
        lines.append("|---|" + "---:|" * len(self.columns))
        for row in self.rows:
            cells = [self.cell(row, c).text() for c in self.columns]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def terminal(self) -> str:
        """A plain fixed-width table for the console."""
        header = ["variant", *self._header()]
        body = [[row, *(self.cell(row, c).text() for c in self.columns)] for row in self.rows]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

        def line(cells: Sequence[str]) -> str:
            first = cells[0].ljust(widths[0])
            rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
            return "  ".join([first, *rest])

        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        return "\n".join([f"{self.title} ({self.metric})", line(header), rule, *map(line, body)])

    def write_csv(self, path: Path) -> None:
        """One line per cell: row, column, stand-in, n, mean, std, values."""
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["variant", "dataset", "stands_in", "n", "mean", "std", "values"])
            for row in self.rows:
                for column in self.columns:
                    cell = self.cell(row, column)
                    writer.writerow(
                        [
                            row,
                            column,
                            self.column_notes.get(column, ""),
                            cell.n,
                            f"{cell.mean:.4f}" if cell.n else "",
                            f"{cell.std:.4f}" if cell.n else "",
                            " ".join(f"{v:.4f}" for v in cell.values),
                        ]
                    )

"""The paper's reference numbers (Tables 1-11), typed and validated.

The numbers live in ``paper_tables.yaml`` next to this module, shipped as package data. They
are validated once, at load: an unknown key, a value for a column the table does not declare,
a missing cell, a duplicate row id or a non-numeric value raises :class:`PaperTableError`
naming the table and the row. Row ids match the ``row:`` values of the ablation files in
``ablations/``; accuracy columns are named by dataset (``K-400``, ``SSv2``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

TableKind = Literal["accuracy", "model_info", "speed", "training_time", "ensemble"]
Dataset = Literal["K-400", "SSv2"]

PAPER_TABLES_RESOURCE = "paper_tables.yaml"


class PaperTableError(ValueError):
    """The paper tables file is malformed; the message names the table and row."""


@dataclass(frozen=True)
class PaperColumn:
    """One column of a paper table.

    Attributes:
        id: stable key, e.g. ``K-400`` or ``gflops``.
        label: header as displayed, e.g. ``K-400 Acc. (%)``.
    """

    id: str
    label: str


@dataclass(frozen=True)
class PaperRow:
    """One row of a paper table.

    Attributes:
        id: stable key, matched against ablation ``row:`` values.
        label: human-readable row name.
        values: numeric column id -> number; ``None`` where the paper leaves the cell empty.
        info: info column id -> descriptive text.
    """

    id: str
    label: str
    values: dict[str, float | None]
    info: dict[str, str]


@dataclass(frozen=True)
class PaperTable:
    """One table (or sub-table, e.g. ``6a``) of the paper.

    Attributes:
        id: ``"1"`` ... ``"11"``, with a letter for sub-tables (``"6a"``, ``"8b"``).
        title: e.g. ``Table 8a: Local temporal information``.
        caption: the paper's caption.
        kind: what the numbers measure.
        dataset: the dataset of the whole table; ``None`` when the table has one column per
            dataset (8a) or no dataset (5).
        info_columns: descriptive columns shown before the numbers.
        columns: numeric columns, in display order.
        rows: rows in the paper's order.
        note: provenance and transcription remarks (hardware, footnotes, OCR fixes).
    """

    id: str
    title: str
    caption: str
    kind: TableKind
    dataset: Dataset | None
    info_columns: tuple[PaperColumn, ...]
    columns: tuple[PaperColumn, ...]
    rows: tuple[PaperRow, ...]
    note: str

    def row(self, row_id: str) -> PaperRow | None:
        """The row with id ``row_id``, or ``None`` if the table has none."""
        return next((row for row in self.rows if row.id == row_id), None)

    def value(self, row_id: str, column_id: str) -> float | None:
        """The number in row ``row_id``, column ``column_id``.

        Returns:
            The number, or ``None`` if the row is absent or the paper leaves the cell empty.

        Raises:
            KeyError: ``column_id`` is not a numeric column of this table.
        """
        if column_id not in {column.id for column in self.columns}:
            known = ", ".join(column.id for column in self.columns)
            raise KeyError(f"table {self.id} has no column {column_id!r}; columns: {known}")
        row = self.row(row_id)
        return None if row is None else row.values[column_id]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _ColumnSpec(_Spec):
    id: str
    label: str


class _RowSpec(_Spec):
    id: str
    label: str
    values: dict[str, float | None]
    info: dict[str, str] = {}


class _TableSpec(_Spec):
    id: str
    title: str
    caption: str
    kind: TableKind
    dataset: Dataset | None
    info_columns: list[_ColumnSpec] = []
    columns: list[_ColumnSpec]
    note: str = ""
    rows: list[dict[str, Any]]


class _FileSpec(_Spec):
    tables: list[dict[str, Any]]


_SpecT = TypeVar("_SpecT", bound=_Spec)


def _name(raw: Any, index: int) -> str:
    """How an error names a raw table or row: its id if it has one, else its position."""
    raw_id = raw.get("id") if isinstance(raw, dict) else None
    return repr(raw_id) if raw_id is not None else f"#{index}"


def _validate(model: type[_SpecT], raw: Any, where: str) -> _SpecT:
    """``model.model_validate(raw)``, with errors re-raised as :class:`PaperTableError`."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or '<top>'}: {e['msg']}"
            for e in err.errors()
        )
        raise PaperTableError(f"{where}: {problems}") from None


def _check_keys(given: dict[str, Any], declared: list[_ColumnSpec], what: str, where: str) -> None:
    """Require ``given`` to hold exactly the declared column ids."""
    declared_ids = [column.id for column in declared]
    unknown = [key for key in given if key not in declared_ids]
    if unknown:
        raise PaperTableError(
            f"{where}: {what} for undeclared column(s) {unknown}; declared: {declared_ids}"
        )
    missing = [key for key in declared_ids if key not in given]
    if missing:
        raise PaperTableError(f"{where}: no {what} for column(s) {missing} (use null if empty)")


def _build_row(raw: Any, index: int, table: _TableSpec) -> PaperRow:
    """Validate one raw row of ``table`` into a :class:`PaperRow`."""
    where = f"paper table {table.id!r}, row {_name(raw, index)}"
    spec = _validate(_RowSpec, raw, where)
    _check_keys(spec.values, table.columns, "value", where)
    _check_keys(spec.info, table.info_columns, "info", where)
    for column_id, number in spec.values.items():
        if number is not None and math.isnan(number):
            raise PaperTableError(f"{where}: value for {column_id!r} is NaN")
    return PaperRow(id=spec.id, label=spec.label, values=dict(spec.values), info=dict(spec.info))


def _unique_ids(ids: list[str], where: str, what: str) -> None:
    """Raise if ``ids`` holds a duplicate."""
    seen: set[str] = set()
    for item in ids:
        if item in seen:
            raise PaperTableError(f"{where}: duplicate {what} id {item!r}")
        seen.add(item)


def _build_table(raw: Any, index: int) -> PaperTable:
    """Validate one raw table into a :class:`PaperTable`."""
    where = f"paper table {_name(raw, index)}"
    spec = _validate(_TableSpec, raw, where)
    _unique_ids([c.id for c in spec.info_columns + spec.columns], where, "column")
    rows = tuple(_build_row(raw_row, i, spec) for i, raw_row in enumerate(spec.rows))
    _unique_ids([row.id for row in rows], where, "row")
    return PaperTable(
        id=spec.id,
        title=spec.title,
        caption=spec.caption,
        kind=spec.kind,
        dataset=spec.dataset,
        info_columns=tuple(PaperColumn(c.id, c.label) for c in spec.info_columns),
        columns=tuple(PaperColumn(c.id, c.label) for c in spec.columns),
        rows=rows,
        note=spec.note,
    )


def parse_paper_tables(text: str, source: str = PAPER_TABLES_RESOURCE) -> dict[str, PaperTable]:
    """Parse and validate the YAML text of a paper tables file.

    Args:
        text: the YAML document.
        source: where the text came from, for error messages.

    Returns:
        Table id -> table, in file order.

    Raises:
        PaperTableError: the document is malformed; the message names the table and row.
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise PaperTableError(f"{source}: not valid YAML: {err}") from None
    spec = _validate(_FileSpec, raw, source)
    tables = [_build_table(raw_table, i) for i, raw_table in enumerate(spec.tables)]
    _unique_ids([table.id for table in tables], source, "table")
    return {table.id: table for table in tables}


def load_paper_tables(path: str | Path) -> dict[str, PaperTable]:
    """Load and validate a paper tables YAML file (see :func:`parse_paper_tables`)."""
    path = Path(path)
    return parse_paper_tables(path.read_text(encoding="utf-8"), source=str(path))


@functools.cache
def _packaged_tables() -> dict[str, PaperTable]:
    text = resources.files(__package__).joinpath(PAPER_TABLES_RESOURCE).read_text("utf-8")
    return parse_paper_tables(text)


def paper_tables() -> dict[str, PaperTable]:
    """All of the paper's tables, in paper order, from the packaged YAML (loaded once).

    Returns:
        Table id (``"1"``, ``"6a"``, ...) -> table; a fresh dict, safe to modify.
    """
    return dict(_packaged_tables())


def paper_table(table_id: str) -> PaperTable:
    """One of the paper's tables.

    Args:
        table_id: ``"1"`` ... ``"11"``, with a letter for sub-tables (``"6a"``, ``"8b"``).

    Raises:
        KeyError: no such table; the message lists the known ids.
    """
    tables = _packaged_tables()
    if table_id not in tables:
        raise KeyError(f"no paper table {table_id!r}; known: {', '.join(tables)}")
    return tables[table_id]

"""Findings: short sentences computed from the report tables, each beside the paper's.

A finding is written only when the runs it needs exist; each states the measured numbers, so a
reader can check it against the table above it.
"""

from __future__ import annotations

from collections.abc import Callable

from evl_platform.report.render import number
from evl_platform.report.tables import ReportTable

NONE_ROW, ALL_ROW = "- - -", "T-Conv T-PE T-CA"


def findings(tables: dict[str, ReportTable], stand_in: Callable[[str], str]) -> list[str]:
    """The findings the tables support, in paper order.

    Args:
        tables: report tables by id.
        stand_in: column id -> how to name its data (``SSv2`` or ``SSv2 (synthetic-motion)``).
    """
    out = []
    for finding in (_temporal, _depth, _feature_shape, _frozen, _ensembles):
        sentence = finding(tables, stand_in)
        if sentence:
            out.append(sentence)
    return out


def _mean(table: ReportTable | None, row: str, column: str) -> float | None:
    found = table.row(row) if table else None
    return found.cell(column).mean if found and found.cell(column).n else None


def _signed(value: float) -> str:
    return ("+" if value >= 0 else "") + f"{value:.1f}"


def _temporal(tables: dict[str, ReportTable], stand_in: Callable[[str], str]) -> str | None:
    """Table 8a: do the temporal modules help the motion data much more than appearance?"""
    table = tables.get("8a")
    gaps = {}
    for column in ("SSv2", "K-400"):
        none, every = _mean(table, NONE_ROW, column), _mean(table, ALL_ROW, column)
        if none is not None and every is not None:
            gaps[column] = every - none
    if len(gaps) < 2 or table is None or table.paper is None:
        return None
    paper = {
        c: table.paper.value(ALL_ROW, c) - table.paper.value(NONE_ROW, c) for c in ("SSv2", "K-400")
    }
    much_more = gaps["SSv2"] >= gaps["K-400"] + 5
    verdict = (
        "Temporal modules help the motion-heavy data much more than the appearance-heavy data, "
        "as the paper found"
        if much_more
        else "Unlike the paper, the temporal modules do not help the motion-heavy data much more "
        "than the appearance-heavy data"
    )
    return (
        f"{verdict}: all three modules (T-Conv + T-PE + T-CA) against none change top-1 by "
        f"{_signed(gaps['SSv2'])} points on {stand_in('SSv2')} and {_signed(gaps['K-400'])} on "
        f"{stand_in('K-400')}, a gap of {gaps['SSv2'] - gaps['K-400']:.1f} points (paper, "
        f"Table 8a: {_signed(paper['SSv2'])} on SSv2 and {_signed(paper['K-400'])} on K-400)."
    )


def _best(table: ReportTable | None, column: str) -> tuple[str, float] | None:
    if table is None:
        return None
    measured = [(r.label, r.cell(column).mean) for r in table.rows if r.cell(column).n]
    return max(measured, key=lambda item: item[1]) if measured else None


def _depth(tables: dict[str, ReportTable], stand_in: Callable[[str], str]) -> str | None:
    """Tables 6a / 8b: the best decoder depth per dataset."""
    parts = []
    for table_id, column in (("6a", "K-400"), ("8b", "SSv2")):
        table = tables.get(table_id)
        best = _best(table, column)
        paper_best = _paper_best(table, column)
        if best and paper_best:
            parts.append(
                f"on {stand_in(column)} depth {best[0]} is best ({number(best[1], column)}%; "
                f"paper Table {table_id}: depth {paper_best})"
            )
    return f"Decoder depth: {'; '.join(parts)}." if parts else None


def _paper_best(table: ReportTable | None, column: str) -> str | None:
    if table is None or table.paper is None:
        return None
    rows = [(r.label, r.values.get(column)) for r in table.paper.rows]
    rows = [(label, v) for label, v in rows if v is not None]
    return max(rows, key=lambda item: item[1])[0] if rows else None


def _feature_shape(tables: dict[str, ReportTable], stand_in: Callable[[str], str]) -> str | None:
    """Table 6c: the unpooled spatiotemporal map against the best pooled shape."""
    table = tables.get("6c")
    full = _mean(table, "spatiotemporal", "K-400")
    pooled = [
        (r.label, r.cell("K-400").mean)
        for r in (table.rows if table else [])
        if r.key != "spatiotemporal" and r.cell("K-400").n
    ]
    if table is None or table.paper is None or full is None or not pooled:
        return None
    label, best = max(pooled, key=lambda item: item[1])
    paper = table.paper
    paper_pooled = [r for r in paper.rows if r.id != "spatiotemporal" and r.values.get("K-400")]
    paper_best = max(paper_pooled, key=lambda r: r.values["K-400"])
    paper_gap = paper.value("spatiotemporal", "K-400") - paper_best.values["K-400"]
    return (
        f"Feature shape: the unpooled spatiotemporal map gives {full:.1f}% on "
        f"{stand_in('K-400')}, {_signed(full - best)} points over the best pooled shape "
        f"({label}, {best:.1f}%; paper Table 6c: {_signed(paper_gap)} over "
        f"{paper_best.label})."
    )


def _frozen(tables: dict[str, ReportTable], stand_in: Callable[[str], str]) -> str | None:
    """Table 7: frozen backbone against finetuned, as measured by ``backbone_mode``."""
    table = tables.get("7")
    frozen, tuned = _mean(table, "frozen", "K-400"), _mean(table, "finetuned", "K-400")
    if table is None or frozen is None or tuned is None:
        return None
    return (
        f"Backbone: frozen {frozen:.1f}% against finetuned {tuned:.1f}% on {stand_in('K-400')} "
        f"({_signed(frozen - tuned)} points for frozen; paper Table 7 with CLIP ViT-B/16, "
        f"frozen EVL {table.paper_value(table.row('frozen'), 'K-400'):.1f}% against the "
        "finetuned baselines in the table)."
    )


def _members(row_key: str) -> list[str]:
    """``"cnn3d + evl | label"`` -> ``["cnn3d", "evl"]``: the variants of an ensemble row."""
    return [m.strip() for m in row_key.split("|")[0].split("+")]


def _gains(rows: list[tuple[str, float | None]]) -> tuple[list[float], list[float]]:
    """Gains of rows whose pair has an ``evl`` member, and of the others."""
    with_evl = [g for key, g in rows if g is not None and "evl" in _members(key)]
    without = [g for key, g in rows if g is not None and "evl" not in _members(key)]
    return with_evl, without


def _ensembles(tables: dict[str, ReportTable], stand_in: Callable[[str], str]) -> str | None:
    """Tables 10-11: the best gain of ensembles with an EVL member against those without."""
    parts = []
    for table_id in ("10", "11"):
        table = tables.get(table_id)
        if table is None or table.paper is None:
            continue
        measured = _gains(
            [(r.key, r.cell("gain").mean if r.cell("gain").n else None) for r in table.rows]
        )
        paper = _gains([(r.id, r.values.get("gain")) for r in table.paper.rows])
        if all(measured) and all(paper):
            parts.append(
                f"on {stand_in(table.paper.dataset or '')} the best pair with EVL gains "
                f"{_signed(max(measured[0]))} points over model 1, the best without "
                f"{_signed(max(measured[1]))} (paper Table {table_id}: {_signed(max(paper[0]))} "
                f"and {_signed(max(paper[1]))})"
            )
    return f"Ensembles: {'; '.join(parts)}." if parts else None

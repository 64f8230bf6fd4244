"""Report tables -> Markdown, CSV, HTML and LaTeX text (pure functions, stable output)."""

from __future__ import annotations

import csv
import html
import io
import math

from evl_platform.report.tables import ACCURACY_COLUMNS, NOT_RUN, ReportRow, ReportTable

TWO_DECIMALS = ("new_params_m", "latency_ms", "throughput_vps", "step_time_s")


def number(value: float, column: str) -> str:
    """A value as the paper prints its column: accuracies with one decimal, ``inf.``, params
    and timings with two, big numbers with thousands separators, small ones with three
    significant digits."""
    if math.isinf(value):
        return "inf."
    if column in ACCURACY_COLUMNS:
        return f"{value:.1f}"
    if column in TWO_DECIMALS:
        return f"{value:,.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"
    if column in ("max_batch", "views") or abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def measured_text(table: ReportTable, row: ReportRow, column: str) -> str:
    """``82.9``, ``82.7 ± 0.3 (n=3)`` or ``not run``."""
    cell = row.cell(column)
    if not cell.n:
        return NOT_RUN if table.paper else ""  # a training run without this metric: blank
    if cell.n == 1:
        return number(cell.mean, column)
    return f"{number(cell.mean, column)} ± {number(cell.std, column)} (n={cell.n})"


def paper_text(table: ReportTable, row: ReportRow, column: str) -> str:
    value = table.paper_value(row, column)
    return "" if value is None else number(value, column)


def diff_text(table: ReportTable, row: ReportRow, column: str) -> str:
    value = table.diff(row, column)
    return "" if value is None else ("+" if value >= 0 else "") + number(value, column)


def header(table: ReportTable) -> list[str]:
    """Column headings: the label, info columns, then measured / paper / Δ per column."""
    names = ["Row", *(c.label for c in table.info_columns)]
    for column in table.columns:
        names += [column.label, "paper", "Δ"] if table.paper else [column.label]
    return names


def body(table: ReportTable) -> list[list[str]]:
    """The displayed cells, one list per row, matching :func:`header`."""
    lines = []
    for row in table.rows:
        line = [row.label, *(row.info.get(c.id, "") for c in table.info_columns)]
        for column in table.columns:
            line.append(measured_text(table, row, column.id))
            if table.paper:
                line += [paper_text(table, row, column.id), diff_text(table, row, column.id)]
        lines.append(line)
    return lines


def markdown(table: ReportTable) -> str:
    """The table in Markdown with its title, caption and dataset notes."""
    head = header(table)
    out = [f"### {table.title}", "", table.caption, ""]
    for note in table.notes():
        out += [f"*{note}.*", ""]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_md(c) for c in line) + " |" for line in body(table)]
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def csv_text(table: ReportTable) -> str:
    """Machine-readable: per numeric column its mean (or ``not run``), std, n, paper value and
    difference, with full precision."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    head = ["row", "label", *(c.id for c in table.info_columns)]
    for column in table.columns:
        head += [column.id, f"{column.id}_std", f"{column.id}_n", f"{column.id}_paper"]
        head += [f"{column.id}_diff"]
    writer.writerow(head)
    for row in table.rows:
        line = [row.key, row.label, *(row.info.get(c.id, "") for c in table.info_columns)]
        for column in table.columns:
            cell, paper = row.cell(column.id), table.paper_value(row, column.id)
            diff = table.diff(row, column.id)
            line += [
                _num(cell.mean) if cell.n else NOT_RUN if table.paper else "",
                _num(cell.std) if cell.n else "",
                cell.n,
                "" if paper is None else _num(paper),
                "" if diff is None else _num(diff),
            ]
        writer.writerow(line)
    return out.getvalue()


def _num(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4f}".rstrip("0").rstrip(".")


def html_table(table: ReportTable) -> str:
    """An HTML ``<section>``: heading, caption, notes and the table."""
    esc = html.escape
    parts = [f'<section id="table-{esc(table.id)}">', f"<h2>{esc(table.title)}</h2>"]
    parts.append(f'<p class="caption">{esc(table.caption)}</p>')
    parts += [f'<p class="note">{esc(note)}.</p>' for note in table.notes()]
    head = header(table)
    parts.append("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head))
    parts.append("</tr></thead><tbody>")
    for line in body(table):
        cells = [f"<th>{esc(line[0])}</th>"]
        for index, text in enumerate(line[1:], start=1):
            kind = _kind(index - 1 - len(table.info_columns), table.paper is not None)
            cls = ' class="missing"' if text == NOT_RUN else f' class="{kind}"' if kind else ""
            cells.append(f"<td{cls}>{esc(text)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table></section>")
    return "\n".join(parts)


def _kind(position: int, compared: bool) -> str:
    if position < 0:
        return "info"
    return ("measured", "paper", "diff")[position % 3] if compared else "measured"


def latex(table: ReportTable) -> str:
    """A booktabs ``tabular`` with the same cells as the Markdown table."""
    head = header(table)
    lines = [
        f"% {table.title}",
        "\\begin{tabular}{l"
        + "l" * len(table.info_columns)
        + ("rrr" if table.paper else "r") * len(table.columns)
        + "}",
        "\\toprule",
        " & ".join(_tex(h) for h in head) + " \\\\",
        "\\midrule",
    ]
    lines += [" & ".join(_tex(c) for c in line) + " \\\\" for line in body(table)]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    for char, escaped in (
        ("\\", "\\textbackslash{}"),
        ("&", "\\&"),
        ("%", "\\%"),
        ("_", "\\_"),
        ("#", "\\#"),
        ("±", "$\\pm$"),
        ("Δ", "$\\Delta$"),
        ("α", "$\\alpha$"),
        ("×", "$\\times$"),
    ):
        text = text.replace(char, escaped)
    return text

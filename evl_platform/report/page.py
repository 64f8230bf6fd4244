"""Whole pages: ``index.html`` (self-contained, figures as data URIs) and ``README.md``."""

from __future__ import annotations

import base64
import html

from evl_platform.report import render
from evl_platform.report.document import Report

TITLE = "EVL: Frozen CLIP Models are Efficient Video Learners — measured vs paper"
INTRO = (
    "Each table puts the values measured here (mean ± std over seeds, n runs) beside the "
    "paper's and their difference (Δ = measured − paper); a cell without a run says "
    '"not run". Runs on synthetic stand-ins are labelled as such: their numbers are not '
    "comparable with the paper's, only the direction of the findings is."
)
STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;
 padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.2em .5em;text-align:right}
th{background:#f4f4f4}tbody th,td.info{text-align:left;font-weight:normal}
td.paper{color:#666}td.diff{color:#555;font-style:italic}td.missing{color:#b0b0b0}
.caption{color:#444;font-size:.9em}.note{color:#8a5a00;font-size:.85em}
dl.header{display:grid;grid-template-columns:max-content auto;gap:.1em 1em;font-size:.9em}
dl.header dt{font-weight:bold}dl.header dd{margin:0}
figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #eee}
ul.missing li{color:#8a5a00}
"""


def markdown_page(report: Report) -> str:
    """README.md: header, findings, what is missing, every table, the figure files."""
    lines = [f"# {TITLE}", ""]
    lines += [f"- **{key}**: {value}" for key, value in report.header.items()]
    lines += ["", INTRO, "", "## Findings", ""]
    lines += [f"- {f}" for f in report.findings] or ["- none yet: the runs they need are missing"]
    if report.missing:
        lines += ["", "## Missing", ""] + [f"- {m}" for m in report.missing]
    lines += ["", "## Tables", ""]
    for table in report.tables:
        lines += [render.markdown(table), ""]
    lines += ["## Figures", ""]
    for name, (caption, _) in report.figures.items():
        lines += [f"![{caption}](figures/{name})", "", f"*{caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


def html_page(report: Report) -> str:
    """index.html: one file, no scripts, no network; figures embedded as PNG data URIs."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(TITLE)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{esc(TITLE)}</h1>",
        '<dl class="header">',
    ]
    for key, value in report.header.items():
        parts.append(f"<dt>{esc(key)}</dt><dd>{esc(value)}</dd>")
    parts += ["</dl>", f"<p>{esc(INTRO)}</p>", "<h2>Findings</h2><ul>"]
    parts += [f"<li>{esc(f)}</li>" for f in report.findings] or [
        "<li>none yet: the runs they need are missing</li>"
    ]
    parts.append("</ul>")
    if report.missing:
        parts.append('<h2>Missing</h2><ul class="missing">')
        parts += [f"<li>{esc(m)}</li>" for m in report.missing]
        parts.append("</ul>")
    parts.append("<h2>Contents</h2><ul>")
    for table in report.tables:
        parts.append(f'<li><a href="#table-{esc(table.id)}">{esc(table.title)}</a></li>')
    parts.append('<li><a href="#figures">Figures</a></li></ul>')
    parts += [render.html_table(table) for table in report.tables]
    parts.append('<section id="figures"><h2>Figures</h2>')
    for name, (caption, data) in report.figures.items():
        encoded = base64.b64encode(data).decode("ascii")
        parts.append(
            f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{encoded}" '
            f'data-file="{esc(name)}"><figcaption>{esc(caption)}</figcaption></figure>'
        )
    parts += ["</section>", "</body></html>"]
    return "\n".join(parts) + "\n"

"""The report's figures as PNG bytes (matplotlib, no pyplot state, no timestamps).

Each function takes plain DataFrames and returns the PNG, so the report embeds it in
``index.html`` and writes it next to the tables.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import pandas as pd
from matplotlib.figure import Figure

from evl_platform.report.paper import PaperTable

PAPER_GREY = "#8a8a8a"
COLORS = ("#1f6fb4", "#d9641c", "#2b9a4a", "#b8322c", "#7d4fb0", "#8c5a3c", "#d45fb0", "#6c6c6c")


def png(figure: Figure) -> bytes:
    """The figure as PNG bytes, identical for identical input (no software/date metadata)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def accuracy_vs_gflops(paper: PaperTable, measured: pd.DataFrame, evl_rows: set[str]) -> bytes:
    """Fig. 1 (right): top-1 vs GFLOPs per video, log scale; the paper's Table 1 points in
    grey (EVL rows, ``evl_rows``, darker and labelled), measured runs in colour, one series
    per dataset.

    Args:
        measured: columns ``label``, ``dataset``, ``gflops``, ``acc1``.
    """
    figure = Figure(figsize=(7.5, 4.8))
    ax = figure.subplots()
    column = paper.dataset or "K-400"
    for kind in ("other", "evl"):
        points = [
            (paper.value(r.id, "gflops"), paper.value(r.id, column), r.label)
            for r in paper.rows
            if (r.id in evl_rows) == (kind == "evl")
        ]
        points = [p for p in points if p[0] is not None and p[1] is not None]
        color = "#555555" if kind == "evl" else "#bbbbbb"
        label = f"paper: EVL (Table {paper.id})" if kind == "evl" else "paper: other methods"
        ax.scatter(
            [p[0] for p in points], [p[1] for p in points], color=color, s=18, label=label, zorder=2
        )
        for i, (x, y, text) in enumerate(points if kind == "evl" else []):
            ax.annotate(
                text.replace("EVL ", ""),
                (x, y),
                fontsize=6,
                color=color,
                xytext=(-4, 6 if i % 2 else -10),
                textcoords="offset points",
                ha="right",
            )
    for i, (dataset, group) in enumerate(measured.groupby("dataset", sort=True)):
        group = group.sort_values("gflops")
        ax.scatter(
            group["gflops"],
            group["acc1"],
            color=COLORS[i % len(COLORS)],
            s=30,
            zorder=3,
            label=f"measured: {dataset}",
        )
    ax.set_xscale("log")
    ax.set_xlabel("GFLOPs per video (multiply-accumulates × views, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"Accuracy vs inference cost (paper: Table {paper.id}, {column})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    return png(figure)


def hours_vs_accuracy(paper: PaperTable, measured: pd.DataFrame) -> bytes:
    """Fig. 3: training device-hours vs top-1; the paper's Table 4 in grey, measured runs by
    backbone mode (frozen / finetuned).

    Args:
        measured: columns ``label``, ``mode``, ``hours``, ``acc1``.
    """
    figure = Figure(figsize=(7.5, 4.8))
    ax = figure.subplots()
    column = paper.dataset or "K-400"
    for row in paper.rows:
        x, y = paper.value(row.id, "gpu_hours"), paper.value(row.id, column)
        if x is not None and y is not None:
            ax.scatter(x, y, color=PAPER_GREY, s=18)
            gpu = row.info.get("gpu", "")
            ax.annotate(
                f"{row.label} ({gpu})" if gpu else row.label,
                (x, y),
                fontsize=6,
                color=PAPER_GREY,
                xytext=(3, 2),
                textcoords="offset points",
            )
    for i, (mode, group) in enumerate(measured.groupby("mode", sort=True)):
        ax.scatter(
            group["hours"],
            group["acc1"],
            color=COLORS[i % len(COLORS)],
            s=30,
            label=f"measured: {mode} backbone",
            marker="o" if i == 0 else "s",
        )
    ax.set_xscale("log")
    ax.set_xlabel("training device-hours (log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"Training time vs accuracy (grey: paper Table {paper.id}, GPU-hours)")
    ax.grid(True, alpha=0.3)
    if not measured.empty:
        ax.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    return png(figure)


def ensemble_curves(curves: pd.DataFrame, labels: Mapping[str, str]) -> bytes:
    """Ensemble top-1 vs α (model 1's weight), one line per ensemble run, the chosen α marked.

    Args:
        curves: ``run_id``, ``alpha``, ``acc1``; labels: run id -> legend label.
    """
    figure = Figure(figsize=(7.5, 4.5))
    ax = figure.subplots()
    for i, run_id in enumerate(sorted(labels, key=lambda r: labels[r])):
        curve = curves[curves["run_id"] == run_id].sort_values("alpha")
        color = COLORS[i % len(COLORS)]
        ax.plot(curve["alpha"], curve["acc1"], marker="o", ms=3, color=color, label=labels[run_id])
        best = curve.loc[curve["acc1"].idxmax()] if not curve.empty else None
        if best is not None:
            ax.scatter([best["alpha"]], [best["acc1"]], s=60, facecolors="none", edgecolors=color)
    ax.set_xlabel("α (weight of model 1; 0 = model 2 alone, 1 = model 1 alone)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Ensemble accuracy vs α (validation)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    figure.tight_layout()
    return png(figure)


def per_class_pairs(per_class: Mapping[str, pd.DataFrame], labels: Mapping[str, str]) -> bytes:
    """Per-class top-1 on the motion stand-in, classes grouped by time-reversal pair (classes
    2k and 2k+1 play the same motion forwards and backwards), one bar per run.

    Args:
        per_class: run id -> ``class``, ``index``, ``acc1``; labels: run id -> legend label.
    """
    runs = list(labels)
    first = per_class[runs[0]].sort_values("index")
    classes = list(first["class"])
    figure = Figure(figsize=(8.5, 0.32 * len(classes) + 1.6))
    ax = figure.subplots()
    height = 0.8 / len(runs)
    for pair in range(0, len(classes), 4):  # shade every other pair
        ax.axhspan(pair - 0.5, pair + 1.5, color="#eeeeee", zorder=0)
    for i, run_id in enumerate(runs):
        frame = per_class[run_id].sort_values("index")
        y = [index - 0.4 + height * (i + 0.5) for index in frame["index"]]
        ax.barh(
            y,
            frame["acc1"],
            height=height,
            color=COLORS[i % len(COLORS)],
            label=labels[run_id],
            zorder=2,
        )
    ax.set_yticks(range(len(classes)), [_short(c) for c in classes], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(50, color=PAPER_GREY, ls="--", lw=1, zorder=1)
    ax.set_xlim(0, 100)
    ax.set_xlabel("per-class top-1 (%); dashed: 50%, the order-blind level within a pair")
    ax.set_title("Motion stand-in: per-class top-1, reversal pairs shaded together")
    ax.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return png(figure)


def _short(name: str, limit: int = 44) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"

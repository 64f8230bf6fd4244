"""Files a training run leaves in MLflow: per-video scores, per-class accuracy, confusion matrix.

The per-video score file is the input of ensembles: one row per validation video with its id,
its true label and one probability column per class (named by class).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

VIDEO_ID = "video_id"
LABEL = "label"


def scores_frame(
    video_ids: Sequence[str],
    indices: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
) -> pd.DataFrame:
    """One row per video: ``video_id``, ``label`` (class index), then a probability column
    per class, in class-index order.

    Args:
        video_ids: ids of the split's videos, by dataset position.
        indices: (N,) dataset positions of the scored videos.
        labels: (N,) true classes.
        probs: (N, classes) view-averaged probabilities.
        class_names: class names in index order.
    """
    if probs.shape[1] != len(class_names):
        raise ValueError(f"{probs.shape[1]} score columns for {len(class_names)} classes")
    frame = pd.DataFrame(probs.astype(np.float32), columns=list(class_names))
    frame.insert(0, LABEL, labels.astype(np.int64))
    frame.insert(0, VIDEO_ID, [video_ids[i] for i in indices])
    return frame.sort_values(VIDEO_ID, kind="stable").reset_index(drop=True)


def write_scores(frame: pd.DataFrame, path: Path) -> Path:
    """Writes the per-video scores as parquet."""
    frame.to_parquet(path, index=False)
    return path


def write_per_class(accuracy: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    """Writes per-class top-1 accuracy (percent) as CSV: ``class,index,acc1``."""
    frame = pd.DataFrame(
        {"class": list(class_names), "index": range(len(class_names)), "acc1": accuracy}
    )
    frame.to_csv(path, index=False, float_format="%.4f")
    return path


def write_confusion_png(
    matrix: np.ndarray, class_names: Sequence[str], path: Path, *, title: str
) -> Path:
    """Draws the confusion matrix (rows: true class, columns: prediction) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = min(24.0, 3.0 + 0.35 * len(class_names))
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=100)
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if len(class_names) <= 40:
        ticks = range(len(class_names))
        ax.set_xticks(ticks, [_short(n) for n in class_names], rotation=90, fontsize=7)
        ax.set_yticks(ticks, [_short(n) for n in class_names], fontsize=7)
        for (row, col), count in np.ndenumerate(matrix):
            if count:
                ax.text(col, row, str(count), ha="center", va="center", fontsize=6)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"

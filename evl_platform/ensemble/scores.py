"""Per-video score tables, read from a training run's MLflow artifact or from a file.

A table has one row per video: its id, its true class when known, and one score per class.
Every training run logs one (``val_scores.parquet``, see
:mod:`evl_platform.tracking.artifacts`); models trained elsewhere come as CSV or parquet files
with the same layout:

- a video id column, named ``video_id`` (or ``id``);
- an optional ``label`` column: the class index, or the class name;
- every other column: one class's scores, named by class, in class-index order.

Ensembles average probabilities. Scores that are all non-negative, with every row summing to 1
within :data:`PROB_TOLERANCE`, are read as probabilities (and renormalised exactly); anything
else (a negative value, or a row summing elsewhere) is read as logits, turned into
probabilities with a softmax, and the table carries a note that says so.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from evl_platform.ensemble.errors import EnsembleError
from evl_platform.tracking.artifacts import LABEL, VIDEO_ID
from evl_platform.tracking.client import Tracker, resolve_tracking_uri
from evl_platform.tracking.names import ARTIFACT_SCORES, TAG_DATASET

PROB_TOLERANCE = 0.01
"""How far a row's sum may be from 1 for the scores to count as probabilities."""
ID_COLUMNS = (VIDEO_ID, "id")
READERS = {".csv": "CSV", ".parquet": "parquet", ".pq": "parquet"}
_SHOWN = 5  # examples listed in an error message


@dataclass(frozen=True, eq=False)
class ScoreTable:
    """One model's per-video class probabilities.

    Attributes:
        video_ids: (N,) video ids, unique.
        labels: (N,) true class indices, or ``None`` when the source has no labels.
        class_names: (C,) class names in index order.
        probs: (N, C) probabilities; every row sums to 1.
        name: what messages and output call the model: a run name or a file name.
        source: where the table came from: an MLflow run id or a file path.
        notes: how the scores were read (e.g. a softmax applied to logits).
        dataset: the run's ``dataset`` tag, when it came from a run that has one.
    """

    video_ids: tuple[str, ...]
    labels: np.ndarray | None
    class_names: tuple[str, ...]
    probs: np.ndarray
    name: str = "scores"
    source: str = ""
    notes: tuple[str, ...] = ()
    dataset: str | None = None

    def __post_init__(self) -> None:
        videos, classes = len(self.video_ids), len(self.class_names)
        if self.probs.shape != (videos, classes):
            raise EnsembleError(
                f"{self.name}: scores of shape {self.probs.shape} for {videos} videos and "
                f"{classes} classes"
            )
        if self.labels is not None and self.labels.shape != (videos,):
            raise EnsembleError(f"{self.name}: {len(self.labels)} labels for {videos} videos")

    @property
    def num_videos(self) -> int:
        """N, the number of videos."""
        return len(self.video_ids)

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return len(self.class_names)


def load_scores(source: str | Path, tracking_uri: str | None = None) -> ScoreTable:
    """Reads one model's scores from a file or an MLflow run.

    Args:
        source: a path to a CSV or parquet score file, or an MLflow run id. An existing file
            is read as a file; anything else that looks like a path (a ``.csv`` or
            ``.parquet`` name, or a directory part) is a missing file; the rest are run ids.
        tracking_uri: the MLflow store runs are looked up in (default: ``$MLFLOW_TRACKING_URI``,
            else ``sqlite:///mlflow.db``).

    Raises:
        EnsembleError: the file or run cannot be read, or its scores are malformed.
    """
    path = Path(source)
    if path.is_file():
        return read_score_file(path)
    text = str(source)
    if path.exists():
        raise EnsembleError(f"{text}: not a file")
    if path.suffix.lower() in READERS or "/" in text or "\\" in text:
        raise EnsembleError(f"{text}: no such file")
    return read_run_scores(text, tracking_uri)


def read_score_file(path: str | Path) -> ScoreTable:
    """Reads a CSV or parquet score file (layout: see the module docstring)."""
    path = Path(path)
    frame = _read_frame(path, where=str(path))
    return table_from_frame(frame, name=path.name, source=str(path.resolve()), where=str(path))


def read_run_scores(run_id: str, tracking_uri: str | None = None) -> ScoreTable:
    """Reads the ``val_scores.parquet`` artifact of MLflow run ``run_id``."""
    uri = resolve_tracking_uri(tracking_uri)
    _require_store(uri, run_id)
    client = Tracker(uri).client
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise EnsembleError(f"{run_id}: not a score file, and no such run in {uri}") from err
    label = f"run {run_id} ({run.info.run_name}, {run.info.status})"
    artifacts = sorted(item.path for item in client.list_artifacts(run_id))
    if ARTIFACT_SCORES not in artifacts:
        found = ", ".join(artifacts) or "none"
        raise EnsembleError(
            f"{label}: no {ARTIFACT_SCORES} artifact (artifacts: {found}); only a finished "
            "training run has one"
        )
    where = f"{label} {ARTIFACT_SCORES}"
    with tempfile.TemporaryDirectory() as directory:
        local = client.download_artifacts(run_id, ARTIFACT_SCORES, directory)
        frame = _read_frame(Path(local), where=where)
    return table_from_frame(
        frame,
        name=run.info.run_name or run_id,
        source=run_id,
        where=where,
        dataset=run.data.tags.get(TAG_DATASET),
    )


def _require_store(uri: str, run_id: str) -> None:
    """Fails, without creating it, when a local store the run would be in does not exist."""
    if uri.startswith("sqlite:///"):
        local = Path(uri.removeprefix("sqlite:///").partition("?")[0])
    elif uri.startswith("file:"):
        local = Path(unquote(urlparse(uri).path))
    else:
        return
    if not local.exists():
        raise EnsembleError(f"{run_id}: not a score file, and there is no MLflow store at {local}")


def _read_frame(path: Path, *, where: str) -> pd.DataFrame:
    """The file as a DataFrame, ids read as text; any reading problem is one EnsembleError."""
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise EnsembleError(
            f"{where}: unknown file type {path.suffix!r} (expected .csv or .parquet)"
        )
    try:
        if kind == "CSV":
            return pd.read_csv(path, dtype={column: str for column in ID_COLUMNS})
        return pd.read_parquet(path)
    except pd.errors.EmptyDataError as err:
        raise EnsembleError(f"{where}: empty file") from err
    except (ValueError, OSError) as err:  # parser errors, pyarrow's ArrowInvalid, bad bytes
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EnsembleError(f"{where}: cannot be read as {kind}: {first_line}") from err


def table_from_frame(
    frame: pd.DataFrame,
    *,
    name: str,
    source: str = "",
    where: str | None = None,
    dataset: str | None = None,
) -> ScoreTable:
    """Checks a score DataFrame and turns it into a :class:`ScoreTable`.

    Args:
        frame: a video id column, an optional ``label`` column, one score column per class.
        name: what messages and output call the model.
        source: the run id or file path it came from.
        where: how error messages name the data (default: ``name``).
        dataset: the dataset, when known.

    Raises:
        EnsembleError: a missing id column, duplicate or missing ids, no or non-numeric class
            columns, missing scores, or labels that are not classes.
    """
    where = where or name
    frame = frame.rename(columns=str)
    if frame.empty:
        raise EnsembleError(f"{where}: no videos (the table has no rows)")
    id_column = _id_column(frame, where)
    video_ids = _video_ids(frame[id_column], where)
    class_names = [column for column in frame.columns if column not in (id_column, LABEL)]
    scores = _class_scores(frame, class_names, video_ids, where)  # (N, C)
    probs, note = as_probabilities(scores)
    labels = _labels(frame[LABEL], class_names, where) if LABEL in frame.columns else None
    return ScoreTable(
        video_ids=tuple(video_ids),
        labels=labels,
        class_names=tuple(class_names),
        probs=probs,
        name=name,
        source=source,
        notes=(f"{name}: {note}",) if note else (),
        dataset=dataset,
    )


def as_probabilities(scores: np.ndarray) -> tuple[np.ndarray, str | None]:
    """(N, C) scores as probabilities, and a note when they were read as logits.

    Probabilities (non-negative, rows summing to 1 within :data:`PROB_TOLERANCE`) are
    renormalised; any other scores are treated as logits and go through a softmax.
    """
    sums = scores.sum(axis=1)
    off = int(np.sum(np.abs(sums - 1.0) > PROB_TOLERANCE))
    negative = int(np.sum((scores < 0).any(axis=1)))
    if not off and not negative:
        return scores / sums[:, None], None
    exp = np.exp(scores - scores.max(axis=1, keepdims=True))
    reasons = [
        f"{count} rows {what}"
        for count, what in (
            (negative, "with negative scores"),
            (off, f"not summing to 1 (±{PROB_TOLERANCE:g})"),
        )
        if count
    ]
    note = f"scores read as logits ({', '.join(reasons)}): softmax applied"
    return exp / exp.sum(axis=1, keepdims=True), note


def _id_column(frame: pd.DataFrame, where: str) -> str:
    present = [column for column in ID_COLUMNS if column in frame.columns]
    if len(present) == 2:
        raise EnsembleError(f"{where}: both 'video_id' and 'id' columns; keep one")
    if not present:
        raise EnsembleError(
            f"{where}: no video id column (expected 'video_id' or 'id'; columns: "
            f"{_listed(frame.columns)})"
        )
    return present[0]


def _video_ids(column: pd.Series, where: str) -> list[str]:
    missing = int(column.isna().sum())
    if missing:
        raise EnsembleError(f"{where}: {missing} rows without a video id")
    ids = [str(value) for value in column]
    counts = pd.Series(ids).value_counts()
    repeated = counts[counts > 1]
    if len(repeated):
        raise EnsembleError(
            f"{where}: {len(repeated)} duplicate video ids (first: {_listed(repeated.index)})"
        )
    return ids


def _class_scores(
    frame: pd.DataFrame, class_names: list[str], video_ids: list[str], where: str
) -> np.ndarray:
    if len(class_names) < 2:
        raise EnsembleError(
            f"{where}: {len(class_names)} class score columns, need at least 2 (columns: "
            f"{_listed(frame.columns)})"
        )
    text = [name for name in class_names if not pd.api.types.is_numeric_dtype(frame[name])]
    if text:
        raise EnsembleError(
            f"{where}: non-numeric class column(s) {_listed(text, quote=True)} (every column "
            "other than the video id and 'label' must hold one class's scores)"
        )
    scores = frame[class_names].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(scores).all(axis=1)
    if bad.any():
        first = [video_ids[i] for i in np.flatnonzero(bad)]
        raise EnsembleError(
            f"{where}: {int(bad.sum())} videos with missing or infinite scores (first: "
            f"{_listed(first)})"
        )
    return scores


def _labels(column: pd.Series, class_names: list[str], where: str) -> np.ndarray:
    """Class indices from a column of indices or of class names."""
    missing = int(column.isna().sum())
    if missing:
        raise EnsembleError(f"{where}: {missing} videos without a label")
    if pd.api.types.is_numeric_dtype(column):
        values = column.to_numpy(dtype=np.float64)
        wrong = values[(values != np.round(values)) | (values < 0) | (values >= len(class_names))]
        if len(wrong):
            raise EnsembleError(
                f"{where}: labels must be class indices 0..{len(class_names) - 1} or class "
                f"names; got {_listed([f'{value:g}' for value in pd.unique(wrong)])}"
            )
        return values.astype(np.int64)
    index = {name: i for i, name in enumerate(class_names)}
    unknown = pd.unique(column[~column.astype(str).isin(list(index))].astype(str))
    if len(unknown):
        raise EnsembleError(
            f"{where}: labels that are not class columns: {_listed(unknown, quote=True)}"
        )
    return np.array([index[str(value)] for value in column], dtype=np.int64)


def _listed(values: Sequence | pd.Index | np.ndarray, *, quote: bool = False) -> str:
    """The first few values, comma-separated (``...`` when there are more)."""
    items = [repr(str(v)) if quote else str(v) for v in list(values)[:_SHOWN]]
    return ", ".join(items) + (", ..." if len(values) > _SHOWN else "")

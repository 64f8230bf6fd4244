"""Weighted-average ensembles of two models' per-video scores (paper Tables 10-11).

The ensemble scores a video with ``α·P_A + (1−α)·P_B``, where ``P`` are the class
probabilities: α is the weight of model A, so α = 1 is model A alone and α = 0 is model B alone.
As in the paper, α is searched on the validation set with a step of 0.1 and the accuracy at
the best α on that same set is reported; the gain (the paper's Δ) is over model A.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from evl_platform.ensemble.errors import EnsembleError
from evl_platform.ensemble.scores import ScoreTable

DEFAULT_ALPHAS = tuple(round(i / 10, 1) for i in range(11))
"""0, 0.1, ..., 1: the paper's search grid."""
_SHOWN = 5  # examples listed in an error message


@dataclass(frozen=True, eq=False)
class MatchedScores:
    """Two models' scores over the same videos and classes, row for row.

    Attributes:
        video_ids: (N,) the videos, sorted.
        labels: (N,) true class indices.
        class_names: (C,) class names in index order (model A's order).
        probs_a: (N, C) model A's probabilities.
        probs_b: (N, C) model B's probabilities.
        notes: how the scores were read and aligned.
    """

    video_ids: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    probs_a: np.ndarray
    probs_b: np.ndarray
    notes: tuple[str, ...] = ()

    def accuracy(self, alpha: float) -> float:
        """Top-1 accuracy (%) of ``alpha * P_A + (1 - alpha) * P_B``."""
        combined = alpha * self.probs_a + (1.0 - alpha) * self.probs_b  # (N, C)
        correct = int(np.sum(combined.argmax(axis=1) == self.labels))
        return 100.0 * correct / len(self.labels)

    def curve(self, alphas: Iterable[float]) -> dict[float, float]:
        """Top-1 accuracy (%) at every α, in increasing α."""
        return {alpha: self.accuracy(alpha) for alpha in check_alphas(alphas)}


def match(a: ScoreTable, b: ScoreTable) -> MatchedScores:
    """Aligns two score tables by video id and by class name.

    B's class columns are reordered to A's order when both have the same classes in another
    order. Labels come from whichever table has them.

    Raises:
        EnsembleError: the tables have different videos or classes, their labels disagree,
            or neither has labels.
    """
    order_b = _class_order(a, b)  # B's column for each of A's classes
    _check_videos(a, b)
    video_ids = tuple(sorted(a.video_ids))
    rows_a = _rows(a, video_ids)
    rows_b = _rows(b, video_ids)
    labels_a = None if a.labels is None else a.labels[rows_a]
    labels_b = None if b.labels is None else np.argsort(order_b)[b.labels[rows_b]]
    notes = list(a.notes) + list(b.notes)
    if not np.array_equal(order_b, np.arange(len(order_b))):
        notes.append(f"{b.name}: class columns reordered to match {a.name}")
    return MatchedScores(
        video_ids=video_ids,
        labels=_agreed_labels(a, b, video_ids, labels_a, labels_b),
        class_names=a.class_names,
        probs_a=a.probs[rows_a],
        probs_b=b.probs[rows_b][:, order_b],
        notes=tuple(notes),
    )


def alpha_curve(
    a: ScoreTable, b: ScoreTable, alphas: Iterable[float] = DEFAULT_ALPHAS
) -> dict[float, float]:
    """Top-1 accuracy (%) of ``α·P_A + (1−α)·P_B`` at every α (α = 1: A alone, 0: B alone)."""
    return match(a, b).curve(alphas)


def choose_alpha(curve: Mapping[float, float]) -> float:
    """The α with the best accuracy; among equals the one closest to 0.5, then the smaller."""
    if not curve:
        raise EnsembleError("no alphas to choose from")
    return min(curve, key=lambda alpha: (-curve[alpha], round(abs(alpha - 0.5), 9), alpha))


def check_alphas(alphas: Iterable[float]) -> tuple[float, ...]:
    """The distinct α values, sorted; each in [0, 1], each on its own MLflow step.

    Raises:
        EnsembleError: no alphas, one outside [0, 1], or two that round to the same step
            (``round(α·100)``, the step ``ensemble/acc1`` is logged at).
    """
    values = sorted({float(alpha) for alpha in alphas})
    if not values:
        raise EnsembleError("no alphas given")
    outside = [alpha for alpha in values if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0)]
    if outside:
        raise EnsembleError(f"alpha {outside[0]:g} is outside [0, 1] (α is the weight of A)")
    steps: dict[int, float] = {}
    for alpha in values:
        other = steps.setdefault(alpha_step(alpha), alpha)
        if other != alpha:
            raise EnsembleError(
                f"alphas {other:g} and {alpha:g} would share MLflow step {alpha_step(alpha)} "
                "(round(α·100)); use at most two decimals"
            )
    return tuple(values)


def alpha_step(alpha: float) -> int:
    """The MLflow step ``ensemble/acc1`` is logged at for ``alpha``."""
    return round(alpha * 100)


@dataclass(frozen=True)
class EnsembleResult:
    """An ensemble of models A and B, searched over α (the weight of A).

    Attributes:
        alphas: the α values tried, increasing.
        accuracies: top-1 accuracy (%) at each α.
        alpha: the chosen α (best accuracy; ties: closest to 0.5, then smaller).
        acc_a: model A's top-1 accuracy (%) alone.
        acc_b: model B's top-1 accuracy (%) alone.
        acc: the ensemble's top-1 accuracy (%) at the chosen α.
        gain: ``acc - acc_a``, the paper's Δ.
        gain_best_member: ``acc - max(acc_a, acc_b)``.
        num_videos: videos both models scored.
        num_classes: classes.
        name_a: what output calls model A (run name or file name).
        name_b: what output calls model B.
        member_a: model A's source: an MLflow run id or a file path.
        member_b: model B's source.
        dataset: the members' dataset, when known.
        notes: how the scores were read and aligned (e.g. softmax applied to logits).
    """

    alphas: tuple[float, ...]
    accuracies: tuple[float, ...]
    alpha: float
    acc_a: float
    acc_b: float
    acc: float
    gain: float
    gain_best_member: float
    num_videos: int
    num_classes: int
    name_a: str = "A"
    name_b: str = "B"
    member_a: str = ""
    member_b: str = ""
    dataset: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def curve(self) -> dict[float, float]:
        """Accuracy (%) by α."""
        return dict(zip(self.alphas, self.accuracies, strict=True))

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)

    def summary(self) -> str:
        """One line: ``A 82.0  B 82.9  A+B 84.5 at α=0.4 (+2.5 over A)``."""
        return (
            f"A {self.acc_a:.1f}  B {self.acc_b:.1f}  A+B {self.acc:.1f} at α={self.alpha:g} "
            f"({self.gain:+.1f} over A, {self.gain_best_member:+.1f} over the better member)"
        )

    def render(self) -> str:
        """The members, the α table (chosen α marked) and the summary line."""
        lines = [
            f"A  {self.name_a} ({self.member_a})",
            f"B  {self.name_b} ({self.member_b})",
            f"{self.num_videos} videos, {self.num_classes} classes",
            *(f"note: {note}" for note in self.notes),
            "",
            "     α   acc1",
        ]
        for alpha, acc in self.curve.items():
            mark = "  <- chosen" if alpha == self.alpha else ""
            lines.append(f"{alpha:6.2f} {acc:6.2f}{mark}")
        return "\n".join([*lines, "", self.summary()])


def ensemble(
    a: ScoreTable, b: ScoreTable, alphas: Iterable[float] = DEFAULT_ALPHAS
) -> EnsembleResult:
    """Matches two models' scores, searches α and reports the best ensemble.

    Args:
        a: model A's scores (α is its weight; the gain is over A).
        b: model B's scores.
        alphas: the α values to try (default 0, 0.1, ..., 1).

    Raises:
        EnsembleError: bad alphas, or scores that do not match (see :func:`match`).
    """
    alphas = check_alphas(alphas)
    pair = match(a, b)
    curve = pair.curve(alphas)
    alpha = choose_alpha(curve)
    acc_a, acc_b = pair.accuracy(1.0), pair.accuracy(0.0)
    same = a.dataset is None or b.dataset is None or a.dataset == b.dataset
    return EnsembleResult(
        alphas=alphas,
        accuracies=tuple(curve.values()),
        alpha=alpha,
        acc_a=acc_a,
        acc_b=acc_b,
        acc=curve[alpha],
        gain=curve[alpha] - acc_a,
        gain_best_member=curve[alpha] - max(acc_a, acc_b),
        num_videos=len(pair.video_ids),
        num_classes=len(pair.class_names),
        name_a=a.name,
        name_b=b.name,
        member_a=a.source,
        member_b=b.source,
        dataset=(a.dataset or b.dataset) if same else None,
        notes=pair.notes,
    )


def _class_order(a: ScoreTable, b: ScoreTable) -> np.ndarray:
    """For each of A's classes, B's column index; fails when the classes differ."""
    if len(a.class_names) != len(b.class_names):
        raise EnsembleError(
            f"A ({a.name}) has {a.num_classes} classes, B ({b.name}) has {b.num_classes}"
        )
    if set(a.class_names) != set(b.class_names):
        differences = [
            f"#{i} {name_a!r} vs {name_b!r}"
            for i, (name_a, name_b) in enumerate(zip(a.class_names, b.class_names, strict=True))
            if name_a != name_b
        ]
        raise EnsembleError(
            f"A ({a.name}) and B ({b.name}) have different class names at "
            f"{len(differences)} of {a.num_classes} positions (first: "
            f"{', '.join(differences[:_SHOWN])})"
        )
    column = {name: i for i, name in enumerate(b.class_names)}
    return np.array([column[name] for name in a.class_names], dtype=np.int64)


def _check_videos(a: ScoreTable, b: ScoreTable) -> None:
    ids_a, ids_b = set(a.video_ids), set(b.video_ids)
    if ids_a == ids_b:
        return
    only = {
        side: sorted(ids - other) for side, ids, other in (("A", ids_a, ids_b), ("B", ids_b, ids_a))
    }
    parts = [
        f"{len(ids)} only in {side}" + (f" (first: {', '.join(ids[:_SHOWN])})" if ids else "")
        for side, ids in only.items()
    ]
    raise EnsembleError(
        f"A ({a.name}) has {a.num_videos} videos, B ({b.name}) has {b.num_videos}: "
        f"{', '.join(parts)}"
    )


def _rows(table: ScoreTable, video_ids: tuple[str, ...]) -> np.ndarray:
    """The table's row of each video in ``video_ids``."""
    row = {video: i for i, video in enumerate(table.video_ids)}
    return np.array([row[video] for video in video_ids], dtype=np.int64)


def _agreed_labels(
    a: ScoreTable,
    b: ScoreTable,
    video_ids: tuple[str, ...],
    labels_a: np.ndarray | None,
    labels_b: np.ndarray | None,
) -> np.ndarray:
    if labels_a is None and labels_b is None:
        raise EnsembleError(
            f"neither A ({a.name}) nor B ({b.name}) has labels: at least one score table "
            "needs a 'label' column"
        )
    if labels_a is None or labels_b is None:
        return labels_a if labels_b is None else labels_b
    differ = np.flatnonzero(labels_a != labels_b)
    if len(differ):
        first = ", ".join(
            f"{video_ids[i]} ({a.class_names[labels_a[i]]!r} vs {a.class_names[labels_b[i]]!r})"
            for i in differ[:_SHOWN]
        )
        raise EnsembleError(
            f"A ({a.name}) and B ({b.name}) disagree on the label of {len(differ)} of "
            f"{len(video_ids)} videos (first: {first})"
        )
    return labels_a

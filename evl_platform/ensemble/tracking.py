"""Logs an ensemble as one MLflow run: α curve, chosen α, gains, curve CSV and plot."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from evl_platform.ensemble.combine import EnsembleResult, alpha_step
from evl_platform.tracking import names
from evl_platform.tracking.client import Tracker, git_commit


def log_ensemble(
    tracker: Tracker,
    result: EnsembleResult,
    *,
    experiment: str = names.ENSEMBLE_EXPERIMENT,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    members: tuple[str, str] | None = None,
) -> str:
    """Logs one finished ensemble run and returns its id.

    Tags: ``kind=ensemble``, the members (run ids or file paths) and their names, the git
    commit, the dataset when known, then ``tags``. Params: the alphas, the members, the video
    and class counts. Metrics: ``ensemble/acc1`` at step ``round(α·100)`` for every α; the
    chosen α, its accuracy, each member's accuracy and the gains at step 0. Artifacts:
    ``ensemble_curve.csv`` and ``ensemble_curve.png``.

    Args:
        tracker: the MLflow client.
        result: the ensemble to log.
        experiment: the MLflow experiment (default ``ensembles``).
        run_name: the run's name (default ``<name A>+<name B>``).
        tags: extra tags, applied last.
        parent_run_id: nests the run under this one (a sweep's parent run).
        members: how to record A and B (default: the result's run ids or file paths).
    """
    member_a, member_b = members or (result.member_a, result.member_b)
    run_tags = {
        names.TAG_KIND: names.KIND_ENSEMBLE,
        names.TAG_MEMBER_A: member_a,
        names.TAG_MEMBER_B: member_b,
        names.TAG_MEMBER_A_NAME: result.name_a,
        names.TAG_MEMBER_B_NAME: result.name_b,
        names.TAG_GIT_COMMIT: git_commit(),
        **({names.TAG_DATASET: result.dataset} if result.dataset else {}),
        **(tags or {}),
    }
    run_id = tracker.create_run(
        experiment,
        run_name=run_name or f"{result.name_a}+{result.name_b}",
        tags=run_tags,
        parent_run_id=parent_run_id,
    )
    with tracker.finishing(run_id):
        tracker.log_params(run_id, _params(result, member_a, member_b))
        for alpha, acc in result.curve.items():
            tracker.log_metrics(run_id, {names.ENSEMBLE_ACC1: acc}, step=alpha_step(alpha))
        tracker.log_metrics(run_id, summary_metrics(result), step=0)
        with tempfile.TemporaryDirectory() as directory:
            for path in write_curve_files(result, Path(directory)):
                tracker.log_artifact(run_id, path)
    return run_id


def summary_metrics(result: EnsembleResult) -> dict[str, float]:
    """The chosen α, the accuracies (%) and the gains (percentage points)."""
    return {
        names.ENSEMBLE_ALPHA: result.alpha,
        names.ENSEMBLE_ACC1_BEST: result.acc,
        names.ENSEMBLE_ACC1_A: result.acc_a,
        names.ENSEMBLE_ACC1_B: result.acc_b,
        names.ENSEMBLE_GAIN: result.gain,
        names.ENSEMBLE_GAIN_BEST_MEMBER: result.gain_best_member,
    }


def _params(result: EnsembleResult, member_a: str, member_b: str) -> dict[str, object]:
    return {
        names.PARAM_ENSEMBLE_ALPHAS: ",".join(f"{alpha:g}" for alpha in result.alphas),
        names.PARAM_ENSEMBLE_MEMBER_A: member_a,
        names.PARAM_ENSEMBLE_MEMBER_B: member_b,
        names.PARAM_ENSEMBLE_VIDEOS: result.num_videos,
        names.PARAM_ENSEMBLE_CLASSES: result.num_classes,
    }


def write_curve_files(result: EnsembleResult, directory: Path) -> list[Path]:
    """Writes ``ensemble_curve.csv`` and ``ensemble_curve.png`` into ``directory``."""
    csv = directory / names.ARTIFACT_ENSEMBLE_CURVE
    frame = pd.DataFrame({"alpha": result.alphas, "acc1": result.accuracies})
    frame.to_csv(csv, index=False, float_format="%.6g")
    return [csv, write_curve_png(result, directory / names.ARTIFACT_ENSEMBLE_PLOT)]


def write_curve_png(result: EnsembleResult, path: Path) -> Path:
    """Draws accuracy vs α, with A alone (α = 1), B alone (α = 0) and the chosen α marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    ax.plot(result.alphas, result.accuracies, marker="o", color="tab:blue", label="A+B")
    marks = (
        (
            1.0,
            result.acc_a,
            "s",
            "tab:orange",
            90,
            f"A alone: {result.name_a} ({result.acc_a:.1f})",
        ),
        (0.0, result.acc_b, "D", "tab:green", 90, f"B alone: {result.name_b} ({result.acc_b:.1f})"),
        (
            result.alpha,
            result.acc,
            "*",
            "tab:red",
            200,
            f"chosen α={result.alpha:g} ({result.acc:.1f}, {result.gain:+.1f} over A)",
        ),
    )
    for alpha, acc, marker, color, size, label in marks:
        ax.scatter([alpha], [acc], s=size, marker=marker, color=color, zorder=3, label=label)
    ax.set_xlim(-0.05, 1.05)
    ax.set_xlabel("α, the weight of A (0: B alone, 1: A alone)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"ensemble on {result.num_videos} videos")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

"""Ensembles of two models' per-video scores, searched over the weight α (paper Tables 10-11).

``load_scores`` reads a training run's ``val_scores.parquet`` or an external CSV/parquet file,
``ensemble`` matches two tables by video id and finds the best ``α·P_A + (1−α)·P_B``, and
``log_ensemble`` records the result as one MLflow run.
"""

from evl_platform.ensemble.combine import (
    DEFAULT_ALPHAS,
    EnsembleResult,
    MatchedScores,
    alpha_curve,
    choose_alpha,
    ensemble,
    match,
)
from evl_platform.ensemble.errors import EnsembleError
from evl_platform.ensemble.scores import ScoreTable, load_scores
from evl_platform.ensemble.tracking import log_ensemble

__all__ = [
    "DEFAULT_ALPHAS",
    "EnsembleError",
    "EnsembleResult",
    "MatchedScores",
    "ScoreTable",
    "alpha_curve",
    "choose_alpha",
    "ensemble",
    "load_scores",
    "log_ensemble",
    "match",
]

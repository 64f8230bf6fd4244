"""``evl-platform ensemble A B``: the best weighted average of two models' per-video scores."""

from __future__ import annotations

import argparse
import json
import sys

from evl_platform.ensemble.combine import DEFAULT_ALPHAS, check_alphas, ensemble
from evl_platform.ensemble.errors import EnsembleError
from evl_platform.ensemble.scores import load_scores
from evl_platform.ensemble.tracking import log_ensemble
from evl_platform.tracking.client import Tracker
from evl_platform.tracking.names import ENSEMBLE_EXPERIMENT

DESCRIPTION = """\
Ensemble two models (paper Tables 10-11): every validation video is scored with
alpha * P_A + (1 - alpha) * P_B, where P are the class probabilities, and top-1 accuracy is
measured for every alpha. alpha is the weight of model A: 1 is A alone, 0 is B alone. As in
the paper, the best alpha on the validation set is chosen (ties: the one closest to 0.5, then
the smaller) and the gain is reported over model A (the paper's delta) and over the better of
the two.

A and B are each an MLflow run id (its val_scores.parquet artifact, written by every training
run) or a CSV/parquet score file: a 'video_id' (or 'id') column, an optional 'label' column
(class index or class name) and one score column per class, in class order. Scores that are
not probabilities (a negative value, or a row not summing to 1) are read as logits and go
through a softmax; the output says so. Both must cover the same videos and classes, and at
least one must have labels.

The result is logged as one MLflow run (kind=ensemble) unless --no-track. Exit status: 0 done,
2 a score file or run cannot be used.
"""


def parse_alphas(text: str) -> tuple[float, ...]:
    """``0,0.25,0.5`` → the distinct α values, sorted; each must lie in [0, 1]."""
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
        return check_alphas(values)
    except ValueError as err:  # a non-number, or an EnsembleError
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from err


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``ensemble`` subcommand (its handler is :func:`run`)."""
    parser = subparsers.add_parser(
        "ensemble",
        help="weighted average of two models' per-video scores, best alpha (Tables 10-11)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("a", metavar="A", help="model A (weight alpha): run id or score file")
    parser.add_argument("b", metavar="B", help="model B (weight 1 - alpha): run id or score file")
    parser.add_argument(
        "--alphas",
        type=parse_alphas,
        default=DEFAULT_ALPHAS,
        metavar="LIST",
        help="comma-separated weights of A to try, each in [0, 1] (default 0,0.1,...,1)",
    )
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        default=None,
        help="MLflow store the runs are read from and the ensemble is logged to "
        "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    parser.add_argument(
        "--experiment",
        default=ENSEMBLE_EXPERIMENT,
        metavar="NAME",
        help=f"MLflow experiment of the ensemble run (default {ENSEMBLE_EXPERIMENT})",
    )
    parser.add_argument("--name", metavar="RUN_NAME", help="run name (default: <A>+<B>)")
    parser.add_argument("--no-track", action="store_true", help="log no MLflow run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Runs ``ensemble``; an unusable score file or run is one ``error:`` line and exit 2."""
    try:
        a = load_scores(args.a, args.tracking_uri)
        b = load_scores(args.b, args.tracking_uri)
        result = ensemble(a, b, args.alphas)
    except EnsembleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_id = None
    if not args.no_track:
        tracker = Tracker(args.tracking_uri)
        run_id = log_ensemble(tracker, result, experiment=args.experiment, run_name=args.name)
    if args.json:
        print(json.dumps({**result.to_dict(), "run_id": run_id}))
        return 0
    print(result.render())
    if run_id is not None:
        print(f"MLflow run {run_id} in experiment {args.experiment} ({tracker.uri})")
    return 0

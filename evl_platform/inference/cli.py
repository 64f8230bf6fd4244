"""``evl-platform evaluate``, ``predict`` and ``import-checkpoint``: a model after training."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from evl_platform.arguments import positive_int
from evl_platform.inference.runs import parse_views, resolve_run, with_views

RUN_HELP = (
    "an MLflow run id or run name (a training run, or an import registered with "
    "import-checkpoint --register), or a weights file plus --config"
)


def _views(text: str):  # noqa: ANN202 (TestViewsConfig)
    try:
        return parse_views(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help=RUN_HELP)
    parser.add_argument(
        "--config",
        metavar="EXPERIMENT.yaml",
        default=None,
        help="the experiment of a weights file (with a run: use this config instead of the "
        "run's; the architecture must match)",
    )
    parser.add_argument(
        "--views",
        type=_views,
        default=None,
        metavar="TxS",
        help="test views, temporal x spatial, e.g. 3x1 (default: the run's)",
    )
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds ``evaluate``, ``predict`` and ``import-checkpoint``."""
    _add_evaluate(commands)
    _add_predict(commands)
    _add_import(commands)


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="multi-view evaluation of a trained run, logged as a new MLflow run",
        description="Evaluate a trained model with the paper's protocol (every temporal x "
        "spatial view classified, softmax averaged) on Ray, with the run's resolved config "
        "and weights and the inputs its validation used (the frozen-feature cache when the "
        "run used it: features for other views are extracted first). Prints top-1/top-5 and "
        "a per-class table. Logs eval/* metrics, per-video scores (val_scores.parquet, "
        "usable by `evl-platform ensemble`) and per-class accuracy to a new MLflow run "
        "(kind=evaluation) tagged eval.source_run=<the run's id>; the training run is not "
        "changed.",
    )
    _add_run_arguments(evaluate)
    evaluate.add_argument("--split", choices=("val", "train"), default="val")
    evaluate.add_argument("--num-workers", type=positive_int, default=1, metavar="N")
    evaluate.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C")
    evaluate.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    evaluate.add_argument(
        "--address", metavar="ADDR", default=None, help="Ray cluster (default: start Ray here)"
    )
    evaluate.add_argument("--no-track", action="store_true", help="log no MLflow run")
    evaluate.set_defaults(handler=_evaluate)


def _add_predict(commands: argparse._SubParsersAction) -> None:
    predict = commands.add_parser(
        "predict",
        help="top-k classes of video files with a trained model",
        description="Decode each video file, classify its test views with the full model "
        "(backbone included) and print the top-k classes with their probabilities. A missing, "
        "empty or undecodable file gets one error line naming the file and why; the other "
        "files are still predicted. Exit status 1 if any file failed.",
    )
    _add_run_arguments(predict)
    predict.add_argument("videos", nargs="+", metavar="VIDEO", help="video files")
    predict.add_argument("--topk", type=positive_int, default=5, metavar="K")
    predict.set_defaults(handler=_predict)


def _add_import(commands: argparse._SubParsersAction) -> None:
    imports = commands.add_parser(
        "import-checkpoint",
        help="convert an official EVL checkpoint into the platform's weights",
        description="Map a checkpoint released with the official EVL code ({'model': state "
        "dict}, keys under module.) onto the experiment's model, and report missing, "
        "unexpected and mismatched-shape keys by name. The official model reads the last "
        "num_layers backbone blocks, has T-CA on and fixes the number of frames: the config "
        "must agree. With --register, an MLflow run (kind=import) holds the imported weights "
        "and the MLflow model, so evaluate and predict take its run id.",
    )
    imports.add_argument("file", metavar="FILE", help="the official checkpoint (.pth)")
    imports.add_argument("--config", required=True, metavar="EXPERIMENT.yaml")
    imports.add_argument("--set", dest="overrides", action="append", default=[])
    imports.add_argument("--out", metavar="FILE", default=None, help="default: <FILE>.evl.pt")
    imports.add_argument("--register", action="store_true", help="log an MLflow run")
    imports.add_argument("--allow-partial", action="store_true", help="write a partial model")
    imports.add_argument("--tracking-uri", metavar="URI", default=None)
    imports.set_defaults(handler=_import)


def _evaluate(args: argparse.Namespace) -> int:
    from evl_platform.inference.evaluate import (
        EvalOptions,
        evaluate_run,
        format_evaluation,
        outcome_json,
    )

    trained = resolve_run(args.run, config=args.config, tracking_uri=args.tracking_uri)
    options = EvalOptions(
        split=args.split,
        views=args.views,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker,
        address=args.address,
        tracking_uri=args.tracking_uri,
        track=not args.no_track,
    )
    outcome = evaluate_run(trained, options)
    if args.json:
        print(json.dumps(outcome_json(outcome)))
        return 0
    print(format_evaluation(outcome))
    if outcome.run_id is not None:
        print(f"\nMLflow run {outcome.run_id} (evaluation of {trained.label})")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from evl_platform.inference.predict import (
        create_classifier,
        format_prediction,
        prediction_json,
    )
    from evl_platform.inference.runs import build_model

    trained = resolve_run(args.run, config=args.config, tracking_uri=args.tracking_uri)
    trained = dataclasses.replace(trained, cfg=with_views(trained.cfg, args.views))
    classifier = create_classifier(trained.cfg, build_model(trained))
    found = classifier.predict(args.videos)
    names = classifier.class_names
    if args.json:
        print(json.dumps([prediction_json(p, args.topk, names) for p in found]))
    else:
        for prediction in found:
            print(format_prediction(prediction, args.topk, names))
    failed = [p for p in found if p.error is not None]
    for prediction in failed if args.json else ():
        print(f"error: {prediction.path}: {prediction.error}", file=sys.stderr)
    return 1 if failed else 0


def _import(args: argparse.Namespace) -> int:
    import torch

    from evl_platform.config import load_config
    from evl_platform.inference.official import (
        import_official,
        read_official,
        register_import,
        require_complete,
    )

    cfg = load_config(args.config, overrides=args.overrides)
    state = read_official(args.file)
    _, report = import_official(state, cfg)
    require_complete(report, allow_partial=args.allow_partial, source=args.file)
    out = Path(args.out or Path(args.file).with_suffix(".evl.pt"))
    torch.save(report.weights, out)
    print(report.summary())
    print(f"wrote {out} ({len(report.weights)} tensors) for {args.config}")
    if args.register:
        run_id = register_import(cfg, out, source=args.file, tracking_uri=args.tracking_uri)
        print(f"MLflow run {run_id} (kind=import): evl-platform evaluate {run_id}")
    return 0


__all__ = ["add_parser"]

"""``evl-platform`` command line: parse arguments, load the config, call one function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evl_platform import __version__
from evl_platform.arguments import (
    add_ablation_arguments,
    add_cluster_arguments,
    add_config_arguments,
    positive_int,
)
from evl_platform.bench import cli as bench_cli
from evl_platform.config import ConfigError, load_config
from evl_platform.data import cli as data_cli
from evl_platform.data.annotations import AnnotationError
from evl_platform.data.errors import DataSourceError
from evl_platform.ensemble import cli as ensemble_cli
from evl_platform.inference import cli as inference_cli
from evl_platform.inference.errors import InferenceError
from evl_platform.report import cli as report_cli
from evl_platform.runtime.cluster import SharedStorageError
from evl_platform.runtime.session import (
    EXIT_TERMINATED,
    Terminated,
    ray_session,
    received_sigterm,
)
from evl_platform.sweep.spec import AblationError
from evl_platform.train.errors import ResumeError

TRAIN_STOPPED = (
    "the run is marked KILLED and its checkpoints are kept: "
    "the same command with --resume continues it"
)
SWEEP_STOPPED = (
    "unfinished trials are marked KILLED and their checkpoints are kept: "
    "the same command with --resume finishes the sweep"
)
EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT); SIGTERM gives :data:`EXIT_TERMINATED` (143)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="evl-platform",
        description="Train, sweep and report EVL video models "
        "(frozen CLIP image encoder + temporal Transformer decoder).",
    )
    parser.add_argument("--version", action="version", version=f"evl-platform {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser(
        "model-info",
        help="parameters and GFLOPs of an experiment's model (no weights needed)",
        description="Report new (decoder + temporal modules + head) and backbone parameters, "
        "and GFLOPs per view in the paper's convention (multiply-accumulates, backbone + "
        "decoder) times the test views. Builds the model on the meta device: no weights, "
        "data or GPU are needed.",
    )
    add_config_arguments(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=_model_info)
    _add_train_command(commands)
    _add_sweep_command(commands)
    ensemble_cli.add_parser(commands)
    report_cli.add_parser(commands)
    inference_cli.add_parser(commands)
    data_cli.add_parser(commands, prepare=_data_prepare)
    bench_cli.add_parser(commands)
    return parser


def _data_prepare(args: argparse.Namespace) -> int:
    """``data prepare``: re-encodes the experiment's videos as Ray tasks (docs/data.md)."""
    from evl_platform.data.prepare import encode_settings, prepare_dataset, render_report

    cfg = load_config(args.config, overrides=args.overrides, profile=args.profile)
    settings = encode_settings(
        cfg, short_side=args.short_side, keyframe_interval=args.keyframe_interval
    )
    with ray_session(args.address):
        report = prepare_dataset(cfg, args.out, settings)
    print(render_report(report))
    return 0


def _add_sweep_command(commands: argparse._SubParsersAction) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="run an ablation (a paper table) on Ray Tune, tracked as nested MLflow runs",
        description="Run every trial of an ablation file (ablations/*.yaml: named variants x "
        "datasets x seeds) as one Ray Train run each, scheduled by Ray Tune. MLflow gets one "
        "parent run per sweep (with the ablation file and the results table as artifacts) "
        "and one nested run per trial, tagged with ablation, variant, dataset, seed and paper "
        "table. Prints one line per trial start, validation and end, then the results table "
        "(variant x dataset, mean ± std over seeds) and where it was written. The local "
        "profile (default) runs on the synthetic stand-ins with the tiny backbone: frozen "
        "features are extracted once and shared by every trial. Variants of a grid that "
        "differ only in their decoder, head or its optimisation train as packs: one Tune trial "
        "and one backbone pass per batch for the whole pack, each variant still its own run "
        "(--no-pack: one trial each). After Ctrl-C, SIGTERM (exit 130 and 143: unfinished runs "
        "marked KILLED) or a killed driver, --resume finishes the "
        "sweep without rerunning finished trials. The sweep ends with where its time went.",
    )
    add_ablation_arguments(sweep)
    sweep.add_argument(
        "--seeds",
        type=positive_int,
        default=None,
        metavar="K",
        help="run seeds 0..K-1 of every trial (default: the file's seeds)",
    )
    sweep.add_argument(
        "--resume",
        action="store_true",
        help="finish the newest unfinished sweep of this ablation and profile (several files: "
        "of each of them)",
    )
    sweep.add_argument(
        "--dry-run",
        action="store_true",
        help="print the trial table (variant, dataset, seed, overrides) and the packs (several "
        "files: also the identical trials that train once, and the packs across tables), and "
        "exit",
    )
    sweep.add_argument(
        "--no-pack",
        action="store_true",
        help="one Tune trial (one TorchTrainer) per variant, instead of packs of variants "
        "trained on one frozen-backbone pass (the ablation file's sweep.pack_size)",
    )
    add_cluster_arguments(sweep)
    sweep.set_defaults(handler=_sweep, stopped=SWEEP_STOPPED)


def _add_train_command(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train one experiment on Ray Train, tracked as one MLflow run",
        description="Train one experiment with Ray Train workers (DDP: gloo on CPU, NCCL on "
        "GPU). Ray is started locally unless --address (or $RAY_ADDRESS) names a cluster. "
        "Metrics, the resolved config, per-video validation scores, a confusion matrix and "
        "the trained weights go to one MLflow run (default store: ./mlflow.db; browse with "
        "`mlflow ui --backend-store-uri sqlite:///mlflow.db`). Checkpoints go to "
        "--storage-path; a failed worker restarts from the last one, and --resume continues "
        "a run whose driver died or was stopped (Ctrl-C: exit 130, SIGTERM: exit 143, the run "
        "marked KILLED), into the same MLflow run. With features.reuse (the local "
        "profile's default) the frozen backbone's features are extracted once into the "
        "cache and reused by later runs.",
    )
    add_config_arguments(train)
    train.add_argument(
        "--num-workers",
        type=positive_int,
        default=1,
        metavar="N",
        help="Ray Train workers, one device each (default 1)",
    )
    train.add_argument(
        "--cpus-per-worker",
        type=float,
        default=1.0,
        metavar="C",
        help="CPUs reserved per worker (default 1)",
    )
    train.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    add_cluster_arguments(train)
    train.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="RUN",
        help="continue the newest run of this experiment (or the named run) from its last "
        "checkpoint, into the same MLflow run",
    )
    train.set_defaults(handler=_train, stopped=TRAIN_STOPPED)


def _train(args: argparse.Namespace) -> int:
    from evl_platform.train.launcher import TrainOptions, train

    cfg = load_config(args.config, overrides=args.overrides, profile=args.profile)
    options = TrainOptions(
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker,
        address=args.address,
        tracking_uri=args.tracking_uri,
        storage_path=args.storage_path,
        resume=args.resume,
    )
    outcome = train(cfg, options)
    shown = {k: round(v, 2) for k, v in outcome.metrics.items() if k.startswith("val/acc")}
    print(f"finished {outcome.run_name}: {shown}")
    print(f"MLflow run {outcome.run_id} in {outcome.tracking_uri}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from evl_platform.sweep.packs import packing_table
    from evl_platform.sweep.plan import dry_run_table
    from evl_platform.sweep.runner import SweepOptions, plan, plan_packing, run_sweep

    options = SweepOptions(
        profile=args.profile,
        max_concurrent=args.max_concurrent,
        seeds=args.seeds,
        resume=args.resume,
        address=args.address,
        tracking_uri=args.tracking_uri,
        storage_path=args.storage_path,
        overrides=args.overrides,
        pack=not args.no_pack,
    )
    if len(args.ablation) > 1 or Path(args.ablation[0]).is_dir():
        return _sweep_batch(args, options)
    planned = plan(args.ablation[0], options)
    if args.dry_run:
        print(dry_run_table(planned))
        if planned.ablation.spec.search is None:
            print(packing_table(plan_packing(planned, options)))
        return 0
    outcome = run_sweep(planned, options)
    print()
    print(outcome.table.terminal())
    if outcome.ensembles is not None:
        print()
        print(outcome.ensembles.terminal())
    print()
    print(outcome.breakdown())
    print(
        f"\nresults: {outcome.results_dir} (results.md, results.csv); MLflow parent run "
        f"{outcome.parent_run_id}; {outcome.seconds / 60:.1f} min"
    )
    return _sweep_failed(outcome.failed)


def _sweep_batch(args: argparse.Namespace, options: Any) -> int:
    """``sweep A.yaml B.yaml`` / ``sweep ablations/``: every file planned and packed together."""
    from evl_platform.sweep.batch import batch_dry_run, batch_todo, pack_batch, plan_batch
    from evl_platform.sweep.batch_runner import run_batch

    batch = plan_batch(
        args.ablation, profile=args.profile, seeds=args.seeds, overrides=args.overrides
    )
    if args.dry_run:
        packing = pack_batch(batch_todo(batch), batch, enabled=options.pack)
        print(batch_dry_run(batch, packing))
        return 0
    outcome = run_batch(batch, options)
    for table in outcome.tables:
        print()
        print(table.table.terminal())
        if table.ensembles is not None:
            print()
            print(table.ensembles.terminal())
    print()
    print(outcome.breakdown())
    print()
    for table in outcome.tables:
        print(f"results: {table.results_dir}; MLflow parent run {table.parent_run_id}")
    print(
        f"batch {outcome.name}: {len(outcome.tables)} tables, {outcome.trained} runs; "
        f"{outcome.seconds / 60:.1f} min"
    )
    return _sweep_failed(outcome.failed)


def _sweep_failed(failed: Sequence[str]) -> int:
    if failed:
        print(
            f"error: {len(failed)} trials did not finish ({', '.join(failed)}); "
            "run the same command with --resume to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


def _model_info(args: argparse.Namespace) -> int:
    from evl_platform.models import model_info

    cfg = load_config(args.config, overrides=args.overrides, profile=args.profile)
    try:
        info = model_info(cfg)
    except (ValueError, KeyError) as err:  # architecture problems found while building
        message = err.args[0] if isinstance(err, KeyError) else str(err)
        raise ConfigError(f"{args.config}: {message}") from err
    if args.json:
        print(json.dumps(info))
    else:
        print(format_model_info(info))
    return 0


def format_model_info(info: dict) -> str:
    """Human-readable summary of :func:`evl_platform.models.model_info`."""
    modules = " + ".join(info["temporal_modules"]) or "no temporal modules"
    height, width = info["image_size"]
    if info.get("arch", "evl") == "evl":
        rows = [
            (
                "backbone",
                f"{info['backbone']} ({info['backbone_mode']}), {height}x{width}px, "
                f"{info['backbone_params'] / 1e6:.2f} M params",
            ),
            (
                "decoder",
                f"{info['decoder_layers']} layers reading blocks {info['feature_layers']}, "
                f"{modules}, {info['feature_shape']} features",
            ),
        ]
        new = "decoder + temporal modules + head"
    else:
        rows = [("model", f"{info['backbone_mode']}, {height}x{width}px")]
        new = "the whole network, trained from scratch"
    rows += [
        ("input", f"{info['num_frames']} frames, {info['num_classes']} classes"),
        ("new params", f"{info['new_params'] / 1e6:.2f} M ({new})"),
        ("trainable", f"{info['trainable_params'] / 1e6:.2f} M"),
        ("GFLOPs/view", f"{info['gflops_per_view']:.4g} (multiply-accumulates, as in the paper)"),
        ("as run", f"{info['gflops_per_view_run']:.4g} GFLOPs/view (query-side decoder attention)"),
        ("views", f"{info['views']} -> {info['gflops_total']:.4g} GFLOPs per video"),
    ]
    header = f"{info['experiment']} (profile {info['profile']})"
    return "\n".join([header, *(f"  {key:<12} {value}" for key, value in rows)])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``evl-platform`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except DataSourceError as err:  # a data.* value: name the experiment file too, if any
        where = getattr(args, "config", None)
        print(f"error: {where + ': ' if where else ''}{err}", file=sys.stderr)
        return 2
    except (
        ConfigError,
        AnnotationError,
        ResumeError,
        AblationError,
        SharedStorageError,
        InferenceError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ConnectionError as err:  # --address / $RAY_ADDRESS names no reachable cluster
        print(f"error: cannot connect: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM inside a Ray session
        return _stopped(args, terminated=isinstance(err, Terminated) or received_sigterm())


def _stopped(args: argparse.Namespace, *, terminated: bool) -> int:
    """One line on what a stopped command left behind; the exit status of the signal."""
    how = "SIGTERM" if terminated else "Ctrl-C"
    left = getattr(args, "stopped", None)
    print(f"stopped by {how}" + (f": {left}" if left else ""), file=sys.stderr, flush=True)
    return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

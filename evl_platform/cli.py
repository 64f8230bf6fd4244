"""``evl-platform`` command line: parse arguments, load the config, call one function."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from evl_platform import __version__
from evl_platform.config import ConfigError, load_config
from evl_platform.data.annotations import AnnotationError
from evl_platform.data.errors import DataSourceError
from evl_platform.ensemble import cli as ensemble_cli
from evl_platform.report import cli as report_cli
from evl_platform.runtime.cluster import SharedStorageError
from evl_platform.sweep.spec import AblationError
from evl_platform.train.errors import ResumeError


def _add_set_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="EXPERIMENT.yaml", help="experiment YAML file")
    _add_set_argument(
        parser, "override one config value, e.g. --set model.decoder.num_layers=2 (repeatable)"
    )
    parser.add_argument(
        "--profile",
        choices=("local", "paper"),
        default=None,
        help="profile overlay to apply (default: the file's `profile`, else local)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _add_workers_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=os.cpu_count() or 1,
        metavar="N",
        help=f"{what} (default: all cores)",
    )


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
    _add_config_arguments(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=_model_info)
    _add_train_command(commands)
    _add_sweep_command(commands)
    ensemble_cli.add_parser(commands)
    report_cli.add_parser(commands)
    _add_data_commands(commands)
    _add_bench_commands(commands)
    return parser


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """--address, --tracking-uri and --storage-path: where runs execute and are recorded."""
    parser.add_argument(
        "--address",
        metavar="ADDR",
        default=None,
        help="Ray cluster to attach to, e.g. auto or 10.0.0.5:6379 (default: $RAY_ADDRESS, "
        "else start Ray here)",
    )
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the cluster head's "
        "$MLFLOW_TRACKING_URI when attached to a cluster, else sqlite:///mlflow.db)",
    )
    parser.add_argument(
        "--storage-path",
        metavar="PATH",
        default=None,
        help="checkpoint storage: a directory, or a bucket URI; on a cluster it must be "
        "storage every node shares (default: $EVL_PLATFORM_STORAGE, else the cluster head's "
        "when attached, else ./ray_results)",
    )


def _add_ablation_arguments(parser: argparse.ArgumentParser) -> None:
    """The ablation file, its profile, trial concurrency and overrides for every trial."""
    parser.add_argument("ablation", metavar="ABLATION.yaml", help="ablation file (ablations/)")
    parser.add_argument(
        "--profile",
        default=None,
        metavar="NAME",
        help="experiment profile: local (stand-ins, tiny backbone; default) or paper",
    )
    parser.add_argument(
        "--max-concurrent",
        type=_positive_int,
        default=None,
        metavar="N",
        help="trials running at once (default: as many as the cluster's CPUs/GPUs fit)",
    )
    _add_set_argument(
        parser, "override a config value in every trial (repeatable), e.g. train.num_steps=50"
    )


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
        "features are extracted once and shared by every trial. After Ctrl-C or a killed "
        "driver, --resume finishes the sweep without rerunning finished trials.",
    )
    _add_ablation_arguments(sweep)
    sweep.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        metavar="K",
        help="run seeds 0..K-1 of every trial (default: the file's seeds)",
    )
    sweep.add_argument(
        "--resume",
        action="store_true",
        help="finish the newest unfinished sweep of this ablation and profile",
    )
    sweep.add_argument(
        "--dry-run",
        action="store_true",
        help="print the trial table (variant, dataset, seed, overrides) and exit",
    )
    _add_cluster_arguments(sweep)
    sweep.set_defaults(handler=_sweep)


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
        "a run whose driver died, into the same MLflow run. With features.reuse (the local "
        "profile's default) the frozen backbone's features are extracted once into the "
        "cache and reused by later runs.",
    )
    _add_config_arguments(train)
    train.add_argument(
        "--num-workers",
        type=_positive_int,
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
    _add_cluster_arguments(train)
    train.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="RUN",
        help="continue the newest run of this experiment (or the named run) from its last "
        "checkpoint, into the same MLflow run",
    )
    train.set_defaults(handler=_train)


def _add_data_commands(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="generate stand-in datasets, check video files")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    synth = actions.add_parser(
        "synth",
        help="write the synthetic stand-in datasets (real H.264 mp4 + annotations)",
        description="Write synthetic-motion (SSv2 JSON format; classes in time-reversal pairs) "
        "and synthetic-appearance (Kinetics CSV format; classes by static appearance). The "
        "same settings always give the same files. Without --out they go to the cache "
        "directory that the local profile reads ($EVL_PLATFORM_CACHE, default "
        "~/.cache/evl-platform), where an existing copy is reused.",
    )
    synth.add_argument("--out", metavar="DIR", help="write DIR/<dataset>/ instead of the cache")
    synth.add_argument(
        "--dataset",
        action="append",
        choices=("synthetic-motion", "synthetic-appearance"),
        help="generate only this stand-in (repeatable; default: both)",
    )
    synth.add_argument(
        "--clips-per-class",
        type=_positive_int,
        default=40,
        metavar="N",
        help="training clips per class (default 40)",
    )
    synth.add_argument(
        "--val-clips-per-class",
        type=_positive_int,
        default=10,
        metavar="N",
        help="validation clips per class (default 10)",
    )
    synth.add_argument("--seed", type=int, default=0, metavar="S", help="generation seed")
    synth.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help="encoding processes (default: all cores)",
    )
    synth.set_defaults(handler=_data_synth)

    check = actions.add_parser(
        "check",
        help="decode every video of an experiment's dataset and report problems",
        description="Decode every video listed in the train and val annotations (or read only "
        "container headers with --quick), count missing / empty / unreadable / too-short / "
        "timed-out files, summarise frames, fps, resolutions and classes, and write a CSV of "
        "problem files. Exit status: 0 passed, 1 a split has more problems than "
        "data.max_bad_fraction, 2 the config or annotations cannot be read.",
    )
    _add_config_arguments(check)
    _add_workers_argument(check, "checking processes")
    check.add_argument(
        "--quick",
        action="store_true",
        help="read container headers only (fast; finds missing, empty and "
        "unparsable files, not corrupt frames)",
    )
    check.add_argument(
        "--out", metavar="CSV", help="problem list path (default: data_check_<experiment>.csv)"
    )
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(handler=_data_check)


def _add_bench_commands(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="speed measurements")
    actions = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    data = actions.add_parser(
        "data",
        help="loader clips/s vs. raw decord decoding of the same frames",
        description="Time the full loader (decode + sample + augment + collate, with its "
        "worker processes) against decord decoding the same frames of the same clips in the "
        "same number of processes, and print both rates and their ratio (target >= 0.9).",
    )
    _add_config_arguments(data)
    _add_workers_argument(data, "processes on both sides")
    data.add_argument(
        "--clips",
        type=_positive_int,
        default=512,
        metavar="N",
        help="clips timed on each side (default 512)",
    )
    data.add_argument(
        "--split",
        choices=("train", "val"),
        default="train",
        help="train: random clip + augmentation; val: all test views",
    )
    data.add_argument("--json", action="store_true", help="print one JSON object")
    data.set_defaults(handler=_bench_data)
    for name, handler, summary, batch_help, memory_gib in (
        (
            "step",
            _bench_model,
            "training step time: frozen/open backbone x GAP/EVL head (paper Table 5)",
            "samples per step (default 64 on CUDA, 16 on CPU; gradient accumulation "
            "beyond the largest batch that fits)",
            16.0,
        ),
        (
            "infer",
            _bench_model,
            "inference latency, throughput and GFLOPs per video (paper Table 3)",
            "videos per forward for the throughput (default: the largest that fits on CUDA, "
            "4 on CPU)",
            32.0,
        ),
    ):
        parser = actions.add_parser(
            name,
            help=summary,
            description=f"Measure the {summary} on fake data, print it beside the paper's "
            "figures and log one MLflow run in experiment `benchmarks`. The largest batch is "
            "an out-of-memory search on CUDA and an estimate on CPU.",
        )
        _add_config_arguments(parser)
        parser.add_argument("--batch", type=_positive_int, metavar="N", help=batch_help)
        parser.add_argument(
            "--iters",
            type=_positive_int,
            default=10,
            metavar="N",
            help="timed runs after 2 warm-up runs; the median is reported (default 10)",
        )
        parser.add_argument(
            "--device", choices=("cpu", "cuda"), help="default: cuda when available"
        )
        parser.add_argument(
            "--memory-gib",
            type=float,
            default=memory_gib,
            metavar="G",
            help=f"memory the largest batch must fit in (default {memory_gib:g}, the paper's "
            f"V100-{memory_gib:g}G)",
        )
        parser.add_argument(
            "--threads",
            type=_positive_int,
            metavar="N",
            help="CPU threads while measuring (default: torch's; 1 is steadier on shared cores)",
        )
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument(
            "--tracking-uri", metavar="URI", help="MLflow store (default ./mlflow.db)"
        )
        parser.add_argument("--no-track", action="store_true", help="log no MLflow run")
        parser.set_defaults(handler=handler)

    sweep = actions.add_parser(
        "sweep",
        help="wall time of an ablation sweep with frozen-feature reuse vs without",
        description="Run the ablation twice in one Ray session: with frozen-feature reuse "
        "(from an empty feature cache, so extraction is included) and without (every trial "
        "decodes videos and runs the backbone at every step). Each sweep goes to a temporary "
        "MLflow store; the timings and the speedup (target 5x) are printed and logged as one "
        "run in experiment `benchmarks`.",
    )
    _add_ablation_arguments(sweep)
    sweep.add_argument("--address", metavar="ADDR", default=None, help="Ray cluster to attach to")
    sweep.add_argument("--tracking-uri", metavar="URI", default=None, help="MLflow tracking URI")
    sweep.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    sweep.add_argument("--json", action="store_true", help="print one JSON object")
    sweep.set_defaults(handler=_bench_sweep)


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


def _data_synth(args: argparse.Namespace) -> int:
    from evl_platform.config import SyntheticConfig
    from evl_platform.data.source import synth_params
    from evl_platform.data.synth import ensure_synthetic, generate

    # The remaining settings keep the config defaults, so the cache entry written here is the
    # one the local profile looks up.
    params = synth_params(
        SyntheticConfig(
            clips_per_class=args.clips_per_class,
            val_clips_per_class=args.val_clips_per_class,
            seed=args.seed,
        )
    )
    for dataset in args.dataset or ("synthetic-motion", "synthetic-appearance"):
        if args.out:
            layout = generate(dataset, Path(args.out) / dataset, params, workers=args.workers)
        else:
            layout = ensure_synthetic(dataset, params, workers=args.workers)
        print(f"{dataset}: {layout.directory}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from evl_platform.data.check import check_data, render_report

    cfg = load_config(args.config, overrides=args.overrides, profile=args.profile)
    report = check_data(cfg, workers=args.workers, quick=args.quick)
    report.write_csv(args.out or f"data_check_{cfg.name}.csv")
    print(json.dumps(report.summary()) if args.json else render_report(report))
    return 1 if report.failed else 0


def _bench_data(args: argparse.Namespace) -> int:
    from evl_platform.bench.data import bench_data

    cfg = load_config(args.config, overrides=args.overrides, profile=args.profile)
    result = bench_data(cfg, workers=args.workers, clips=args.clips, split=args.split)
    print(json.dumps(result.to_dict()) if args.json else result.render())
    return 0


def _bench_sweep(args: argparse.Namespace) -> int:
    """``bench sweep``: the ablation with and without frozen-feature reuse."""
    from evl_platform.bench.common import finish
    from evl_platform.bench.sweep import bench_sweep

    result = bench_sweep(
        args.ablation,
        profile=args.profile,
        max_concurrent=args.max_concurrent,
        overrides=args.overrides,
        address=args.address,
    )
    print(
        finish(
            result,
            bench="sweep",
            track=not args.no_track,
            tracking_uri=args.tracking_uri,
            as_json=args.json,
        )
    )
    return 0


def _bench_model(args: argparse.Namespace) -> int:
    """``bench step`` and ``bench infer``: one measurement, printed and logged to MLflow."""
    from evl_platform.bench.common import finish
    from evl_platform.bench.infer import bench_infer
    from evl_platform.bench.step import bench_step

    measure = bench_step if args.bench_command == "step" else bench_infer
    cfg = load_config(args.config, overrides=args.overrides, profile=args.profile)
    try:
        result = measure(
            cfg,
            batch=args.batch,
            iters=args.iters,
            device=args.device,
            memory_gib=args.memory_gib,
            threads=args.threads,
        )
    except ValueError as err:  # no such device, or architecture problems found while building
        raise ConfigError(f"{args.config}: {err}") from err
    text = finish(
        result,
        bench=args.bench_command,
        track=not args.no_track,
        tracking_uri=args.tracking_uri,
        as_json=args.json,
    )
    print(text)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from evl_platform.sweep.runner import SweepOptions, dry_run_table, plan, run_sweep

    options = SweepOptions(
        profile=args.profile,
        max_concurrent=args.max_concurrent,
        seeds=args.seeds,
        resume=args.resume,
        address=args.address,
        tracking_uri=args.tracking_uri,
        storage_path=args.storage_path,
        overrides=args.overrides,
    )
    if args.dry_run:
        ablation, trials = plan(args.ablation, options)
        print(dry_run_table(ablation, trials))
        return 0
    outcome = run_sweep(args.ablation, options)
    print()
    print(outcome.table.terminal())
    if outcome.ensembles is not None:
        print()
        print(outcome.ensembles.terminal())
    print(
        f"\nresults: {outcome.results_dir} (results.md, results.csv); MLflow parent run "
        f"{outcome.parent_run_id}; {outcome.seconds / 60:.1f} min"
    )
    if outcome.failed:
        print(
            f"error: {len(outcome.failed)} trials did not finish ({', '.join(outcome.failed)}); "
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
        ("views", f"{info['views']} -> {info['gflops_total']:.4g} GFLOPs per video"),
    ]
    header = f"{info['experiment']} (profile {info['profile']})"
    return "\n".join([header, *(f"  {key:<12} {value}" for key, value in rows)])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``evl-platform`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except DataSourceError as err:  # a data.* value: name the experiment file too
        print(f"error: {args.config}: {err}", file=sys.stderr)
        return 2
    except (ConfigError, AnnotationError, ResumeError, AblationError, SharedStorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ConnectionError as err:  # --address / $RAY_ADDRESS names no reachable cluster
        print(f"error: cannot connect: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

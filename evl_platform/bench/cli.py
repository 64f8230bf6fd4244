"""``evl-platform bench data|step|infer|sweep|annotations``: the speed measurements."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import get_args

from evl_platform.arguments import (
    add_ablation_arguments,
    add_config_arguments,
    add_workers_argument,
    positive_int,
)
from evl_platform.bench import annotations
from evl_platform.config import ConfigError, load_config
from evl_platform.config.schema import VideoDecoder


def add_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="speed measurements")
    actions = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    data = actions.add_parser(
        "data",
        help="loader clips/s vs. raw decoding of the same frames",
        description="Time the full loader (decode + sample + augment + collate, with its "
        "worker processes) against the same decoder decoding the same frames of the same "
        "clips in the same number of processes, and print both rates, their ratio (target "
        ">= 0.9) and the loader's clips/s per core.",
    )
    add_config_arguments(data)
    add_workers_argument(data, "processes on both sides")
    data.add_argument(
        "--clips",
        type=positive_int,
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
    data.add_argument(
        "--decoder",
        choices=(*get_args(VideoDecoder), "all"),
        default=None,
        help="decoder to time instead of data.decoder; all: each installed one, one table",
    )
    data.add_argument(
        "--native-size",
        action="store_true",
        help="decode at each video's own size, not the short side the transforms need",
    )
    data.add_argument(
        "--batch",
        type=positive_int,
        default=None,
        metavar="N",
        help="clips per loader batch (default: train.batch_size, at most clips / (4 x "
        "workers)); a paper run's loader batches its GPU's share of the batch, e.g. 32",
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
        add_config_arguments(parser)
        parser.add_argument("--batch", type=positive_int, metavar="N", help=batch_help)
        parser.add_argument(
            "--iters",
            type=positive_int,
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
            type=positive_int,
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
        help="wall time of an ablation sweep run packed vs one Tune trial per variant",
        description="Run the ablation twice in one Ray session, both with the feature cache "
        "off (every batch decoded, augmented and run through the frozen backbone): packed "
        "(variants sharing their backbone-side inputs trained on one backbone pass) and with "
        "--no-pack (one Tune trial and TorchTrainer per variant). Each sweep goes to a "
        "temporary MLflow store; the wall times, their ratio (target 2.5x), each sweep's time "
        "breakdown and the compute ratio the same packing gives on the paper profile (from "
        "model-info's GFLOPs) are printed and logged as one run in experiment `benchmarks`. "
        '--json prints {"packed_s", "unpacked_s", "ratio", "paper_compute_ratio"}. Several '
        "files (or a directory): the batch packed across tables vs every file run one after "
        "another with one trial per table cell, and the paper profile's compute ratio of the "
        "same grouping per group of cells sharing a backbone pass (--compute-only: that ratio "
        "alone, nothing trained, no dataset needed).",
    )
    add_ablation_arguments(sweep)
    sweep.add_argument(
        "--compute-only",
        action="store_true",
        help="print the paper profile's compute ratio (packed across tables vs one run per "
        "table cell) and exit: nothing is trained",
    )
    sweep.add_argument(
        "--dataset",
        dest="datasets",
        action="append",
        default=[],
        metavar="KEY",
        help="with --compute-only: count only this dataset column, e.g. k400 (repeatable)",
    )
    sweep.add_argument(
        "--worker-gib",
        type=float,
        default=None,
        metavar="G",
        help="with --compute-only: size packs for workers of this much memory (default: a "
        "sweep's plan on this machine; 16 GiB per GPU worker when there is no GPU to ask)",
    )
    sweep.add_argument("--address", metavar="ADDR", default=None, help="Ray cluster to attach to")
    sweep.add_argument("--tracking-uri", metavar="URI", default=None, help="MLflow tracking URI")
    sweep.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    sweep.add_argument("--json", action="store_true", help="print one JSON object")
    sweep.set_defaults(handler=_bench_sweep)
    annotations.add_parser(actions)


def _bench_data(args: argparse.Namespace) -> int:
    from evl_platform.bench.data import bench_data, bench_decoders

    cfg = load_config(args.config, overrides=args.overrides, profile=args.profile)
    options = dict(
        workers=args.workers,
        clips=args.clips,
        split=args.split,
        native_size=args.native_size,
        batch=args.batch,
    )
    if args.decoder == "all":
        table = bench_decoders(cfg, **options)
        print(json.dumps(table.to_dict()) if args.json else table.render())
        return 0
    result = bench_data(cfg, decoder=args.decoder, **options)
    print(json.dumps(result.to_dict()) if args.json else result.render())
    return 0


def _bench_sweep(args: argparse.Namespace) -> int:
    """``bench sweep``: the ablation packed and one trial per variant; several files: packed
    across tables and one trial per cell; ``--compute-only``: the paper profile's compute
    ratio alone."""
    from evl_platform.bench.common import finish
    from evl_platform.bench.sweep import bench_sweep

    if args.compute_only:
        from evl_platform.bench.batch import paper_compute

        compute = paper_compute(args.ablation, datasets=args.datasets, worker_gib=args.worker_gib)
        print(json.dumps(compute.to_dict()) if args.json else compute.render())
        return 0
    if len(args.ablation) > 1 or Path(args.ablation[0]).is_dir():
        from evl_platform.bench.batch import bench_batch

        result = bench_batch(
            args.ablation,
            profile=args.profile,
            max_concurrent=args.max_concurrent,
            overrides=args.overrides,
            address=args.address,
        )
    else:
        result = bench_sweep(
            args.ablation[0],
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

"""``evl-platform data synth`` and ``data check``: stand-in datasets and video checks."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from evl_platform.arguments import add_config_arguments, add_workers_argument, positive_int
from evl_platform.config import load_config


def add_parser(
    commands: argparse._SubParsersAction, *, prepare: Callable[[argparse.Namespace], int]
) -> None:
    """``data synth``, ``data check`` and ``data prepare``; ``prepare`` runs the last (it
    needs a Ray session, which the layers above ``data`` provide)."""
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
        type=positive_int,
        default=40,
        metavar="N",
        help="training clips per class (default 40)",
    )
    synth.add_argument(
        "--val-clips-per-class",
        type=positive_int,
        default=10,
        metavar="N",
        help="validation clips per class (default 10)",
    )
    synth.add_argument("--seed", type=int, default=0, metavar="S", help="generation seed")
    synth.add_argument(
        "--workers",
        type=positive_int,
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
    add_config_arguments(check)
    add_workers_argument(check, "checking processes")
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
    _add_prepare_parser(actions, prepare)


def _add_prepare_parser(
    actions: argparse._SubParsersAction, handler: Callable[[argparse.Namespace], int]
) -> None:
    prepare = actions.add_parser(
        "prepare",
        help="re-encode an experiment's videos once for fast decoding (Ray tasks)",
        description="Re-encode every video of the train and val annotations to H.264 mp4 "
        "(libx264, crf 23, preset veryfast, no audio, the input's frame rate) with a smaller "
        "short side and a short keyframe interval, as Ray tasks over every CPU of the machine "
        "or cluster. Files already prepared are skipped, so a rerun after Ctrl-C or a killed "
        "run finishes the rest. Bad inputs are counted, listed in DIR/prepare_problems.csv and "
        "left out of the annotation files written into DIR; the command prints the --set "
        "values that make a config read the prepared copy. Exit status: 0 done, 2 the config "
        "or annotations cannot be read, or DIR was prepared with other settings.",
    )
    add_config_arguments(prepare)
    prepare.add_argument("--out", metavar="DIR", required=True, help="the prepared root")
    prepare.add_argument(
        "--short-side",
        type=positive_int,
        metavar="N",
        help="short side in pixels, never upscaled (default: 8/7 of the model's input size, "
        "256 for 224)",
    )
    prepare.add_argument(
        "--keyframe-interval",
        type=positive_int,
        metavar="K",
        help="frames between keyframes (default: stride x frames / 8 for dense sampling, "
        "16 for uniform)",
    )
    prepare.add_argument(
        "--address",
        metavar="ADDR",
        default=None,
        help="Ray cluster to attach to (default: $RAY_ADDRESS, else start Ray here); DIR and "
        "the videos must be on storage every node shares",
    )
    prepare.set_defaults(handler=handler)


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

"""Arguments shared by several ``evl-platform`` subcommands (each subcommand's parser is built
by the subpackage it runs: :mod:`evl_platform.bench.cli`, :mod:`evl_platform.data.cli`...)."""

from __future__ import annotations

import argparse
import os

PROFILE_CHOICES = ("local", "rehearsal", "paper")
"""``--profile`` values: the config's ``Profile`` names (this layer is below the config, so a
test checks that the two lists agree)."""


def add_set_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="EXPERIMENT.yaml", help="experiment YAML file")
    add_set_argument(
        parser, "override one config value, e.g. --set model.decoder.num_layers=2 (repeatable)"
    )
    parser.add_argument(
        "--profile",
        choices=PROFILE_CHOICES,
        default=None,
        help="profile overlay to apply (default: the file's `profile`, else local)",
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def add_workers_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=os.cpu_count() or 1,
        metavar="N",
        help=f"{what} (default: all cores)",
    )


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
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


def add_ablation_arguments(parser: argparse.ArgumentParser) -> None:
    """The ablation files, their profile, trial concurrency and overrides for every trial."""
    parser.add_argument(
        "ablation",
        metavar="ABLATION.yaml",
        nargs="+",
        help="ablation file(s) (ablations/*.yaml), or a directory: every ablation file in it; "
        "several files are planned and packed together",
    )
    parser.add_argument(
        "--profile",
        default=None,
        metavar="NAME",
        help="experiment profile: local (stand-ins, tiny backbone; default), rehearsal (the "
        "paper's models and recipe, random init, real-size stand-in videos) or paper",
    )
    parser.add_argument(
        "--max-concurrent",
        type=positive_int,
        default=None,
        metavar="N",
        help="trials running at once (default: as many as the cluster's CPUs/GPUs fit)",
    )
    add_set_argument(
        parser, "override a config value in every trial (repeatable), e.g. train.num_steps=50"
    )

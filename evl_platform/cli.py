"""``evl-platform`` command line: parse arguments, load the config, call one function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from evl_platform import __version__
from evl_platform.config import ConfigError, load_config


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="EXPERIMENT.yaml", help="experiment YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set model.decoder.num_layers=2 (repeatable)",
    )
    parser.add_argument(
        "--profile",
        choices=("local", "paper"),
        default=None,
        help="profile overlay to apply (default: the file's `profile`, else local)",
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
    return parser


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
        ("input", f"{info['num_frames']} frames, {info['num_classes']} classes"),
        ("new params", f"{info['new_params'] / 1e6:.2f} M (decoder + temporal modules + head)"),
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
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

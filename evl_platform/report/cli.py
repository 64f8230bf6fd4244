"""``evl-platform report --out DIR``: the paper's tables and figures from the MLflow runs."""

from __future__ import annotations

import argparse
import os
import sys

from evl_platform.report.build import DEFAULT_FORMATS, FORMATS, ReportOptions, write_report

DESCRIPTION = """\
Write the paper's results from whatever runs the MLflow store holds: every table of the paper
(1, 2, 3, 4, 5, 6a-c, 7, 8a-b, 9, 10, 11) with the measured values (mean ± std over seeds, n)
beside the paper's and their difference, "not run" where no run exists, a table of every
training run, figures (accuracy vs GFLOPs, device-hours vs accuracy, ensemble accuracy vs
alpha, per-class accuracy on the motion stand-in) and findings computed from the numbers.

Sweep trials reach their cell through their ablation's table block and their tags; plain
training runs of the paper's experiment files fill those models' rows; bench infer/step runs
fill Tables 3 and 5.

DIR gets index.html (self-contained: open it anywhere, no network), README.md, one CSV per
table under tables/, the figures under figures/ and, with --format tex, LaTeX tables under
tex/. Regenerating replaces the report's own files and leaves anything else in DIR alone.

Exit status: 0 written; 1 written, but no run could be reported (the report says what is
missing); 2 bad arguments, an unreadable tracking store or an unwritable DIR.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``report`` subcommand (its handler is :func:`run`)."""
    parser = subparsers.add_parser(
        "report",
        help="the paper's tables and figures from the MLflow runs (html, md, csv, tex)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder, e.g. reports/")
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the tracking server of "
        "the cluster named by --address, else sqlite:///mlflow.db)",
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        default=None,
        help="Ray cluster whose tracking server to read when no tracking URI is given, e.g. "
        "auto on the head node (default: $RAY_ADDRESS): the head's $MLFLOW_TRACKING_URI",
    )
    parser.add_argument(
        "--experiment",
        dest="experiments",
        action="append",
        default=[],
        metavar="NAME",
        help="MLflow experiment to read (repeatable; default: all), e.g. temporal_modules",
    )
    parser.add_argument(
        "--profile",
        default=None,
        metavar="NAME",
        help="report the runs of this profile: local or paper (default: the newest run's)",
    )
    parser.add_argument(
        "--format",
        dest="formats",
        type=_formats,
        default=DEFAULT_FORMATS,
        metavar="LIST",
        help=f"comma-separated outputs among {','.join(FORMATS)} "
        f"(default: {','.join(DEFAULT_FORMATS)})",
    )
    parser.set_defaults(handler=run)
    return parser


def _formats(text: str) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
    unknown = [item for item in chosen if item not in FORMATS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"{text!r}: choose one or more of {','.join(FORMATS)}, comma-separated"
        )
    return chosen


def _cluster_tracking_uri(address: str) -> str | None:
    """The tracking URI the cluster's head node was started with (None: it has none)."""
    from evl_platform.runtime.session import ray_session, use_cluster_defaults

    with ray_session(address, log_to_driver=False) as attached:
        use_cluster_defaults(attached)
    return os.environ.get("MLFLOW_TRACKING_URI")


def run(args: argparse.Namespace) -> int:
    """Writes the report and prints what it holds; 1 when no run could be reported."""
    from mlflow.exceptions import MlflowException

    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not tracking_uri and address:
        tracking_uri = _cluster_tracking_uri(address)
    options = ReportOptions(
        out=args.out,
        tracking_uri=tracking_uri,
        experiments=args.experiments,
        profile=args.profile,
        formats=args.formats,
    )
    try:
        outcome = write_report(options)
    except (MlflowException, OSError) as err:  # an unreachable server, an unwritable DIR
        print(f"error: report to {args.out}: {err}", file=sys.stderr)
        return 2
    report = outcome.report
    filled = [t for t in report.tables if t.measured]
    print(
        f"report (profile {report.profile}): {report.measured} measured cells in "
        f"{len(filled)} of {len(report.tables)} tables -> {outcome.out}/"
    )
    for table in filled:
        print(f"  {table.title}: {table.measured} cells")
    for finding in report.findings:
        print(f"finding: {finding}")
    for note in report.missing:
        print(f"missing: {note}", file=sys.stderr)
    main = "index.html" if "html" in args.formats else "README.md"
    print(f"open {outcome.out / main}" if any(p.name == main for p in outcome.files) else "")
    return 1 if outcome.empty else 0

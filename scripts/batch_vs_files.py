"""Every ablation file in one ``sweep`` against the same files swept one after another.

    python scripts/batch_vs_files.py OUT [--profile local] [--files ablations/*.yaml]

Runs ``evl-platform sweep FILE ...`` (one batch: packs across tables, identical trials trained
once) and then ``evl-platform sweep FILE`` for each file in turn, each side with its own empty
stand-in and feature cache (``OUT/<side>/cache``), MLflow store and storage, so neither reuses
the other's work. Prints both wall times, their ratio and every table's results side by side
(the same seeds give the same numbers up to run-to-run noise). What docs/benchmarks.md records
for issue 32's acceptance ("the whole ablation study in at most half the time of its files
run one by one").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def _sweep(side: Path, files: list[Path], profile: str) -> float:
    """Runs one ``evl-platform sweep`` over ``files``; its wall time in seconds."""
    side.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "evl_platform.cli", "sweep", *map(str, files)]
    command += ["--profile", profile, "--tracking-uri", f"sqlite:///{side}/mlflow.db"]
    command += ["--storage-path", str(side / "storage")]
    env = os.environ | {"EVL_PLATFORM_CACHE": str(side / "cache")}
    began = time.monotonic()
    with (side / "sweep.log").open("a") as log:
        print("$", " ".join(command), flush=True)
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.monotonic() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): see {side}/sweep.log")
    return seconds


def _results(side: Path) -> dict[str, pd.DataFrame]:
    """Each table's results.csv under the side's storage, by ablation name (the sweep
    directory is ``<ablation>-<profile>-<stamp>``)."""
    found = {}
    for path in sorted((side / "storage").glob("*/results.csv")):
        ablation = path.parent.name.rsplit("-", 3)[0]
        found[ablation] = pd.read_csv(path)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="an empty directory for both sides' runs")
    parser.add_argument("--profile", default="local")
    parser.add_argument("--files", nargs="+", type=Path, help="default: ablations/*.yaml")
    args = parser.parse_args(argv)
    files = [f.resolve() for f in args.files or sorted((ROOT / "ablations").glob("*.yaml"))]
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} is not empty: each side must start from nothing")
    batch = _sweep(out / "batch", files, args.profile)
    print(f"one batch: {batch:.0f} s", flush=True)
    one_by_one = 0.0
    for path in files:
        seconds = _sweep(out / "files", [path], args.profile)
        print(f"{path.name}: {seconds:.0f} s", flush=True)
        one_by_one += seconds
    print(f"\n| side | wall |\n|---|---:|\n| one batch | {batch:.0f} s |")
    print(
        f"| files one by one | {one_by_one:.0f} s |\n\nratio batch / one by one: "
        f"{batch / one_by_one:.2f}\n"
    )
    together, apart = _results(out / "batch"), _results(out / "files")
    for ablation in sorted(set(together) | set(apart)):
        if ablation not in together or ablation not in apart:
            print(f"{ablation}: results on one side only")
            continue
        keep = ["variant", "dataset", "n", "mean"]
        left, right = together[ablation][keep], apart[ablation][keep]
        merged = left.merge(right, on=["variant", "dataset"], how="outer", suffixes=("_b", "_f"))
        print(f"### {ablation}\n\n| variant | dataset | batch | one by one | Δ |")
        print("|---|---|---:|---:|---:|")
        for _, row in merged.iterrows():
            delta = row["mean_b"] - row["mean_f"]
            print(
                f"| {row['variant']} | {row['dataset']} | {row['mean_b']:.1f} (n={row['n_b']:.0f}) "
                f"| {row['mean_f']:.1f} (n={row['n_f']:.0f}) | {delta:+.1f} |"
            )
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

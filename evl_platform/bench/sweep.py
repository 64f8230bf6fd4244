"""``bench sweep``: wall time of one ablation sweep with frozen-feature reuse vs without.

Both sweeps run back to back in one Ray session, each into its own temporary MLflow store and
storage (the user's store only gets the benchmark run). With reuse, the feature cache starts
empty, so the time includes extracting the features once; without, every trial decodes its
videos and runs the frozen backbone at every step.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from evl_platform.bench.data import machine_description
from evl_platform.config import ExperimentConfig
from evl_platform.runtime.session import ray_session
from evl_platform.sweep.runner import SweepOptions, plan, run_sweep

TARGET_SPEEDUP = 5.0


@dataclass
class SweepTiming:
    """One sweep: its wall time and its results table."""

    mode: str
    seconds: float
    trials: int
    table: str


@dataclass
class SweepBench:
    """Both sweeps of one ablation, and the machine they ran on."""

    cfg: ExperimentConfig
    ablation: str
    profile: str
    max_concurrent: int | None
    device_name: str
    timings: list[SweepTiming] = field(default_factory=list)
    run_id: str | None = None

    @property
    def speedup(self) -> float:
        by_mode = {t.mode: t.seconds for t in self.timings}
        return by_mode["without reuse"] / by_mode["with reuse"]

    def params(self) -> dict[str, object]:
        return {
            "bench.ablation": self.ablation,
            "bench.profile": self.profile,
            "bench.max_concurrent": self.max_concurrent or "auto",
            "bench.trials": self.timings[0].trials,
        }

    def metrics(self) -> dict[str, float]:
        by_mode = {t.mode: t.seconds for t in self.timings}
        return {
            "bench/sweep_seconds_reuse": by_mode["with reuse"],
            "bench/sweep_seconds_no_reuse": by_mode["without reuse"],
            "bench/sweep_speedup": self.speedup,
        }

    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "cfg"}
        return out | {"speedup": self.speedup}

    def render(self) -> str:
        lines = [
            f"bench sweep {self.ablation} (profile {self.profile}, "
            f"{self.timings[0].trials} trials) on {self.device_name}",
            f"{'':<16}{'wall':>10}{'per trial':>12}",
        ]
        for t in self.timings:
            lines.append(f"{t.mode:<16}{t.seconds:>9.0f}s{t.seconds / t.trials:>11.1f}s")
        verdict = "meets" if self.speedup >= TARGET_SPEEDUP else "misses"
        lines.append(
            f"speedup with reuse: {self.speedup:.1f}x ({verdict} the {TARGET_SPEEDUP:g}x target)"
        )
        for t in self.timings:
            lines += ["", f"results {t.mode}:", t.table]
        return "\n".join(lines)


def bench_sweep(
    path: str | Path,
    *,
    profile: str | None = None,
    max_concurrent: int | None = None,
    overrides: Sequence[str] = (),
    address: str | None = None,
) -> SweepBench:
    """Runs the ablation twice (features reused from a fresh cache, then not reused)."""
    options = SweepOptions(profile=profile, max_concurrent=max_concurrent, overrides=overrides)
    planned = plan(path, options)
    ablation = planned.ablation
    first = next(t for t in planned.trials if t.scores is None)
    result = SweepBench(
        cfg=first.cfg,
        ablation=ablation.name,
        profile=ablation.profile,
        max_concurrent=max_concurrent,
        device_name=machine_description(),
    )
    with tempfile.TemporaryDirectory() as directory, ray_session(address, log_to_driver=False):
        root = Path(directory)
        modes = (
            ("with reuse", [f"features.cache_dir={root / 'features'}"]),  # starts empty
            ("without reuse", ["features.reuse=false"]),
        )
        for mode, extra in modes:
            print(f"bench sweep: {mode} ...", flush=True)
            run = dataclasses.replace(
                options,
                tracking_uri=f"sqlite:///{root / mode.replace(' ', '_')}.db",
                storage_path=str(root / mode.replace(" ", "_")),
                overrides=[*overrides, *extra],
                tags={"benchmark": "bench sweep"},
            )
            began = time.monotonic()
            outcome = run_sweep(path, run)
            seconds = time.monotonic() - began
            if outcome.failed:
                raise RuntimeError(f"bench sweep {mode}: trials failed: {outcome.failed}")
            result.timings.append(
                SweepTiming(mode, seconds, len(outcome.trial_runs), outcome.table.terminal())
            )
            print(f"bench sweep: {mode}: {seconds:.0f} s", flush=True)
    return result

"""``bench sweep``: wall time of one ablation sweep run packed vs one Tune trial per variant.

Both sweeps run back to back in one Ray session with the feature cache off (every batch is
decoded, augmented and run through the frozen backbone: the online path, where packing is
the only sharing), each into its own temporary MLflow store and storage (the user's store
only gets the benchmark run). It also states the compute ratio the same packing gives on the
paper profile, from :func:`~evl_platform.models.info.model_info`'s counts as the code runs
them (``gflops_per_view_run``): per training clip a pack runs the backbone once and each
member's decoder forward and backward (taken as three forwards), one trial per variant runs
both per variant. Each sweep's memory plan is checked against what it used: every Tune trial's
estimate (:func:`~evl_platform.sweep.packs.pack_memory_bytes`) next to the peak RSS of its
train workers on this machine (:class:`TrainWorkerPeaks`).
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from evl_platform.bench.data import machine_description
from evl_platform.config import ExperimentConfig
from evl_platform.runtime.session import ray_session
from evl_platform.sweep.packs import pack_memory_bytes, pack_todo
from evl_platform.sweep.plan import SweepPlan
from evl_platform.sweep.runner import SweepOptions, plan, plan_packing, run_sweep
from evl_platform.sweep.runs import TrialTodo

TARGET_RATIO = 2.5
PACKED, UNPACKED = "packed", "one trial per variant"
BACKWARD_FORWARDS = 2.0
"""A decoder's backward pass counted as this many forwards (the usual estimate)."""


@dataclass
class SweepTiming:
    """One sweep: its wall time, Tune trials, child runs, time breakdown and results table."""

    mode: str
    seconds: float
    tune_trials: int
    runs: int
    breakdown: str
    table: str
    memory: str = ""


@dataclass
class SweepBench:
    """Both sweeps of one ablation, the paper profile's compute ratio, and the machine."""

    cfg: ExperimentConfig
    ablation: str
    profile: str
    max_concurrent: int | None
    device_name: str
    paper_compute_ratio: float
    timings: list[SweepTiming] = field(default_factory=list)
    run_id: str | None = None

    def _seconds(self, mode: str) -> float:
        return next(t.seconds for t in self.timings if t.mode == mode)

    @property
    def ratio(self) -> float:
        return self._seconds(UNPACKED) / self._seconds(PACKED)

    def params(self) -> dict[str, object]:
        return {
            "bench.ablation": self.ablation,
            "bench.profile": self.profile,
            "bench.max_concurrent": self.max_concurrent or "auto",
            "bench.trials": self.timings[0].runs,
        }

    def metrics(self) -> dict[str, float]:
        return {
            "bench/sweep_seconds_packed": self._seconds(PACKED),
            "bench/sweep_seconds_unpacked": self._seconds(UNPACKED),
            "bench/sweep_pack_ratio": self.ratio,
            "bench/paper_compute_ratio": self.paper_compute_ratio,
        }

    def to_dict(self) -> dict:
        return {
            "packed_s": round(self._seconds(PACKED), 1),
            "unpacked_s": round(self._seconds(UNPACKED), 1),
            "ratio": round(self.ratio, 2),
            "paper_compute_ratio": round(self.paper_compute_ratio, 2),
        }

    def render(self) -> str:
        lines = [
            f"bench sweep {self.ablation} (profile {self.profile}, {self.timings[0].runs} "
            f"variants, feature cache off) on {self.device_name}",
            f"{'':<24}{'wall':>9}{'Tune trials':>13}",
        ]
        for t in self.timings:
            lines.append(f"{t.mode:<24}{t.seconds:>8.0f}s{t.tune_trials:>13}")
        verdict = "meets" if self.ratio >= TARGET_RATIO else "misses"
        lines.append(f"packed is {self.ratio:.2f}x faster ({verdict} the {TARGET_RATIO:g}x target)")
        lines.append(
            f"paper profile, same packing: {self.paper_compute_ratio:.2f}x less compute per "
            "training clip (backbone once per pack, decoder forward + backward per variant)"
        )
        for t in self.timings:
            lines += ["", f"{t.mode}:", t.breakdown, t.table]
            if t.memory:
                lines.append(t.memory)
        return "\n".join(lines)


def paper_compute_ratio(path: str | Path, planned: SweepPlan, options: SweepOptions) -> float:
    """Compute per training clip of the paper profile's trials run one per variant, over the
    same trials packed as ``planned`` packs them (at most as many members per pack)."""
    from evl_platform.models.info import model_info

    local = plan_packing(planned, options)
    size = max(len(p.trials) for p in local.packs)
    paper_options = dataclasses.replace(options, profile="paper")
    paper = plan(path, paper_options)
    forward = 1.0 + BACKWARD_FORWARDS
    packed = unpacked = 0.0
    todo = [TrialTodo(t) for t in paper.trials if t.scores is None]
    spec = paper.ablation.spec
    packing = pack_todo(
        todo,
        enabled=True,
        pack_size=size,  # the local packs' size, whatever a GPU's memory would allow
        use_gpu=spec.resources.use_gpu,
        num_workers=spec.resources.num_workers,
    )
    for pack in packing.packs:
        infos = [model_info(t.cfg) for t in pack.trials]
        backbone = float(infos[0]["backbone_gflops_per_view"])  # type: ignore[arg-type]
        # the decoders as they run here (query-side attention), not as the paper counts them
        decoders = [float(i["gflops_per_view_run"]) - backbone for i in infos]  # type: ignore[arg-type]
        unpacked += sum(backbone + forward * d for d in decoders)
        packed += backbone + forward * sum(decoders)
    return unpacked / packed


def bench_sweep(
    path: str | Path,
    *,
    profile: str | None = None,
    max_concurrent: int | None = None,
    overrides: Sequence[str] = (),
    address: str | None = None,
) -> SweepBench:
    """Runs the ablation twice with the feature cache off: packed, then one trial per
    variant."""
    options = SweepOptions(profile=profile, max_concurrent=max_concurrent, overrides=overrides)
    planned = plan(
        path, dataclasses.replace(options, overrides=[*overrides, "features.reuse=false"])
    )
    ablation = planned.ablation
    first = next(t for t in planned.trials if t.scores is None)
    result = SweepBench(
        cfg=first.cfg,
        ablation=ablation.name,
        profile=ablation.profile,
        max_concurrent=max_concurrent,
        device_name=machine_description(),
        paper_compute_ratio=paper_compute_ratio(path, planned, options),
    )
    with tempfile.TemporaryDirectory() as directory, ray_session(address, log_to_driver=False):
        root = Path(directory)
        for mode, pack in ((PACKED, True), (UNPACKED, False)):
            print(f"bench sweep: {mode} ...", flush=True)
            name = "packed" if pack else "unpacked"
            run = dataclasses.replace(
                options,
                tracking_uri=f"sqlite:///{root / name}.db",
                storage_path=str(root / name),
                tags={"benchmark": "bench sweep"},
                pack=pack,
            )
            began = time.monotonic()
            with TrainWorkerPeaks() as peaks:
                outcome = run_sweep(planned, run)
            seconds = time.monotonic() - began
            if outcome.failed:
                raise RuntimeError(f"bench sweep {mode}: trials failed: {outcome.failed}")
            result.timings.append(
                SweepTiming(
                    mode,
                    seconds,
                    outcome.tune_trials,
                    len(outcome.trial_runs),
                    outcome.breakdown(),
                    outcome.table.terminal(),
                    memory_report(planned, run, peaks.measured()),
                )
            )
            print(f"bench sweep: {mode}: {seconds:.0f} s", flush=True)
    return result


class TrainWorkerPeaks:
    """Samples the peak resident memory (``VmHWM``) of the connected Ray cluster's train
    worker processes that run on this machine, while in its ``with`` block.

    Args:
        every_s: seconds between samples (a worker's peak is read from the kernel, so a
            sample between its peak and its exit suffices).
    """

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self.peaks: dict[int, int] = {}  # pid -> bytes, in the order the workers appeared
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TrainWorkerPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def measured(self) -> list[int]:
        """Each train worker's peak RSS (bytes), in the order the workers started."""
        return list(self.peaks.values())

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._sample()
            except Exception:  # the state API may be briefly unavailable; sample again
                continue

    def _sample(self) -> None:
        from ray.util.state import list_actors

        actors = list_actors(
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
            raise_on_missing_output=False,
        )
        for actor in actors:
            peak = peak_rss(actor.pid) if actor.pid else 0
            if peak:
                self.peaks[actor.pid] = max(peak, self.peaks.get(actor.pid, 0))


def peak_rss(pid: int) -> int:
    """A process's peak resident memory (bytes, ``VmHWM``); 0 if it is not on this machine
    or has ended."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def memory_report(planned: SweepPlan, options: SweepOptions, peaks: Sequence[int]) -> str:
    """Each Tune trial's memory estimate (:func:`~evl_platform.sweep.packs.pack_memory_bytes`,
    per worker) against the peak RSS measured of its train workers (in start order; with
    several trials at once the order is only approximate)."""
    spec = planned.ablation.spec
    res = spec.resources
    packing = plan_packing(planned, options)
    gib = 1024**3
    lines = ["memory: estimate per worker vs measured peak RSS of its train worker(s)"]
    workers = iter(peaks)
    for pack in packing.packs:
        cfgs = [t.cfg for t in pack.trials]
        label = f"pack of {len(cfgs)}" if pack.packed else "alone"
        try:
            estimate = pack_memory_bytes(
                cfgs, num_workers=res.num_workers, device_type="cuda" if res.use_gpu else "cpu"
            ).total
        except ValueError:  # not an EVL model: no plan
            estimate = 0
        measured = [next(workers, 0) for _ in range(res.num_workers)]
        peak = max(measured)
        ratio = f"{estimate / peak:.2f}x" if peak and estimate else "n/a"
        lines.append(
            f"  {label} ({pack.trials[0].key} ...): estimate {estimate / gib:.2f} GiB, "
            f"measured {peak / gib:.2f} GiB, estimate/measured {ratio}"
        )
    return "\n".join(lines)

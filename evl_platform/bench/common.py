"""Shared parts of ``bench step`` and ``bench infer``: devices, timing, memory, MLflow logging.

Largest batch that fits: on CUDA a real search (run the batch, catch out-of-memory, read
``torch.cuda.max_memory_allocated``) under an emulated memory size; on CPU there is no
allocator to ask, so peak memory is estimated at two batch sizes and extrapolated linearly.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from evl_platform.bench.data import machine_description
from evl_platform.config import BackboneConfig, ExperimentConfig, flatten_config
from evl_platform.tracking import Tracker, git_commit
from evl_platform.tracking.names import (
    BENCHMARK_EXPERIMENT,
    KIND_BENCHMARK,
    TAG_BACKBONE,
    TAG_DATASET,
    TAG_GIT_COMMIT,
    TAG_KIND,
    TAG_PROFILE,
)

TAG_BENCH = "bench"  # step | infer
TAG_DEVICE = "device"
GIB = 2**30
MIB = 2**20
DEFAULT_CAP = 1024
"""Largest batch a search tries; fitting there is reported as ``>=cap`` (the paper's inf.)."""

Progress = Callable[[str], None]


def resolve_device(name: str | None) -> torch.device:
    """``cuda`` when available (or asked for), else ``cpu``."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available on this machine")
    return torch.device(name)


def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU model, core count and torch's CPU threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{machine_description()}, {torch.get_num_threads()} torch thread(s)"


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[int]:
    """Runs with ``threads`` intra-op CPU threads (``None``: as is); yields the count in use.

    One thread gives steadier CPU timings on a machine whose cores other processes share.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def load_average() -> float:
    """The 1-minute load average (other processes competing for the CPU skew timings)."""
    return os.getloadavg()[0]


def with_backbone(
    cfg: ExperimentConfig, *, device: torch.device, mode: str | None = None
) -> tuple[ExperimentConfig, list[str]]:
    """``cfg`` with the backbone in ``mode`` and a dtype the device runs fast.

    A finetuned backbone is float32. On CPU a float16 frozen backbone runs in float32: CPUs
    without float16 matrix units run float16 several times slower than float32.

    Returns:
        The config and notes saying what was changed.
    """
    backbone = cfg.model.backbone
    mode = mode or backbone.mode
    dtype = backbone.dtype if mode == "frozen" else "float32"
    notes = []
    if device.type == "cpu" and dtype == "float16":
        notes.append("CPU: the float16 frozen backbone runs in float32 (no fast float16 kernels)")
        dtype = "float32"
    changed = BackboneConfig.model_validate({**backbone.model_dump(), "mode": mode, "dtype": dtype})
    model = cfg.model.model_copy(update={"backbone": changed})
    return cfg.model_copy(update={"model": model}), notes


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast per ``train.amp`` on CUDA; nothing on CPU (``train.amp`` is GPU-only)."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, amp))


def fake_clips(
    batch: int, *, num_frames: int, image_size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Random normalised clips: (batch, 3, T, H, W), zero mean and unit variance."""
    return torch.randn(batch, 3, num_frames, *image_size, device=device)


def synchronize(device: torch.device) -> None:
    """Waits for queued CUDA work (timings must include it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_runs(
    run: Callable[[], object], *, iters: int, warmup: int, device: torch.device
) -> list[float]:
    """Wall times of ``iters`` calls of ``run`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def release_memory() -> None:
    """Frees what the last model left behind (cached CUDA blocks included)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tensor_bytes(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> int:
    """Total bytes of ``tensors``."""
    return sum(t.numel() * t.element_size() for t in tensors)


def storage_keys(module: nn.Module) -> set[int]:
    """Storage addresses of a module's parameters (excluded from activation counts)."""
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


@dataclass
class MaxBatch:
    """The largest batch that fits in a memory budget.

    Attributes:
        value: largest batch that fits (0: not even one sample).
        capped: the search stopped at its cap with the batch still fitting (paper: "inf.").
        method: how it was found, in words.
        estimated: ``True`` for the CPU estimate, ``False`` for a CUDA out-of-memory search.
        fixed_bytes: memory that does not grow with the batch.
        per_sample_bytes: memory each additional sample adds.
    """

    value: int
    capped: bool
    method: str
    estimated: bool
    fixed_bytes: float
    per_sample_bytes: float

    def bytes_at(self, batch: float) -> float:
        """Peak memory at ``batch`` on the fitted line."""
        return self.fixed_bytes + self.per_sample_bytes * batch

    @property
    def label(self) -> str:
        """``>=cap`` when the search stopped at its cap, else the batch."""
        return f">={self.value}" if self.capped else str(self.value)

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)


def _fitted_line(peaks: Mapping[int, float]) -> tuple[float, float]:
    """(fixed, per-sample) bytes through the two largest measured batches."""
    batches = sorted(peaks)
    if len(batches) < 2:
        return (0.0, peaks[batches[0]] / batches[0]) if batches else (0.0, 0.0)
    low, high = batches[-2], batches[-1]
    per_sample = max(0.0, (peaks[high] - peaks[low]) / (high - low))
    return max(0.0, peaks[high] - per_sample * high), per_sample


def estimate_max_batch(
    measure: Callable[[int], float], *, budget_gib: float, cap: int, what: str
) -> MaxBatch:
    """CPU estimate: peak memory measured at batches 1 and 2, extrapolated to the budget."""
    fixed, per_sample = _fitted_line({batch: measure(batch) for batch in (1, 2)})
    room = budget_gib * GIB - fixed
    value = cap if per_sample == 0 else int(max(0.0, room) // per_sample)
    return MaxBatch(
        value=min(value, cap),
        capped=value >= cap,
        method=f"CPU estimate under {budget_gib:g} GiB ({what}; not measured by an allocator)",
        estimated=True,
        fixed_bytes=fixed,
        per_sample_bytes=per_sample,
    )


@contextlib.contextmanager
def cuda_memory_budget(device: torch.device, budget_gib: float) -> Iterator[None]:
    """Makes the CUDA caching allocator fail above ``budget_gib`` (emulates a smaller GPU)."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * GIB / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        release_memory()


def cuda_peak_bytes(run: Callable[[], object], device: torch.device) -> int | None:
    """Peak allocated bytes of ``run`` on ``device``; ``None`` if it ran out of memory."""
    release_memory()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        run()
        torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:
        return None
    return torch.cuda.max_memory_allocated(device)


def search_max_batch(
    peak_at: Callable[[int], float | None], *, budget_gib: float, cap: int
) -> MaxBatch:
    """CUDA search: doubling from 1, then bisection; a batch fits if it runs within budget."""
    peaks: dict[int, float] = {}

    def fits(batch: int) -> bool:
        peak = peak_at(batch)
        if peak is None or peak > budget_gib * GIB:
            return False
        peaks[batch] = peak
        return True

    low, high, batch = 0, None, 1
    while high is None and low < cap:
        if fits(batch):
            low, batch = batch, min(2 * batch, cap)
        else:
            high = batch
    while high is not None and high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    fixed, per_sample = _fitted_line(peaks)
    return MaxBatch(
        value=low,
        capped=low >= cap,
        method=f"CUDA out-of-memory search within {budget_gib:g} GiB (max_memory_allocated)",
        estimated=False,
        fixed_bytes=fixed,
        per_sample_bytes=per_sample,
    )


def saved_tensor_bytes(module: nn.Module, inputs: torch.Tensor) -> int:
    """Bytes autograd keeps for backward after ``module(inputs)``, plus the inputs.

    Unique storages are counted once (views share one); parameters are left out.
    """
    params = storage_keys(module)
    storages = {inputs.untyped_storage().data_ptr(): inputs.untyped_storage().nbytes()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        # Detached: a saved output returned as itself would hold its own grad_fn, a reference
        # cycle autograd never frees. The graph is never run backward.
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(inputs)
    storages.pop(0, None)  # empty storages
    return sum(storages.values())


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created inside it, and their peak.

    Every storage an operation returns is counted until it is freed (a weak reference to the
    storage says when); storages in ``exclude`` (parameters) are never counted.
    """

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude = exclude
        self.live = self.peak = 0
        self._counted: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self.live -= self._counted.pop(key, 0)

    def __torch_dispatch__(
        self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None
    ) -> object:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self.exclude and key not in self._counted:
                self._counted[key] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._release, key)
        return out


class BenchResult(Protocol):
    """What :func:`log_benchmark` needs from a benchmark's results."""

    cfg: ExperimentConfig
    device_name: str
    run_id: str | None

    def params(self) -> dict[str, object]: ...

    def to_dict(self) -> dict: ...

    def metrics(self) -> dict[str, float]: ...

    def render(self) -> str: ...


def amp_label(cfg: ExperimentConfig, device: str) -> str:
    """The autocast dtype in use: ``train.amp`` on CUDA, off on CPU."""
    return cfg.train.amp if device == "cuda" else "off (CPU)"


def log_benchmark(result: BenchResult, *, bench: str, tracking_uri: str | None) -> str:
    """Logs one finished run in the ``benchmarks`` experiment and returns its id.

    Tags: kind, bench, profile, dataset, backbone, git commit, device. Params: the flattened
    config and the benchmark's own settings (``bench.*``). Artifact: the printed table.
    """
    cfg = result.cfg
    tracker = Tracker(tracking_uri)
    tags = {
        TAG_KIND: KIND_BENCHMARK,
        TAG_BENCH: bench,
        TAG_PROFILE: cfg.profile,
        TAG_DATASET: cfg.data.dataset,
        TAG_BACKBONE: cfg.model.backbone.name,
        TAG_GIT_COMMIT: git_commit(),
        TAG_DEVICE: result.device_name,
    }
    run_id = tracker.create_run(
        BENCHMARK_EXPERIMENT, run_name=f"bench-{bench}-{cfg.name}", tags=tags
    )
    with tracker.finishing(run_id):
        tracker.log_params(run_id, {**flatten_config(cfg), **result.params()})
        tracker.log_metrics(run_id, result.metrics(), step=0)
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / f"bench_{bench}.txt"
            path.write_text(result.render() + "\n")
            tracker.log_artifact(run_id, path)
    return run_id


def finish(
    result: BenchResult, *, bench: str, track: bool, tracking_uri: str | None, as_json: bool
) -> str:
    """Logs ``result`` unless ``track`` is off; returns what the command prints."""
    run_id = log_benchmark(result, bench=bench, tracking_uri=tracking_uri) if track else None
    result.run_id = run_id
    if as_json:
        return json.dumps(result.to_dict())
    tracked = f"\nMLflow run {run_id} in experiment {BENCHMARK_EXPERIMENT}" if run_id else ""
    return result.render() + tracked

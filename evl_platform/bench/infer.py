"""``evl-platform bench infer``: the paper's Table 3 (inference latency and throughput) here.

One video is every test view (``data.test_views.total`` clips of ``data.num_frames`` frames)
with the class scores averaged over views. Latency is one video at a time; throughput is in
videos/s at the largest batch that fits (CUDA: out-of-memory search) or, on CPU, at a given
batch beside an estimate of the largest one. AMP per ``train.amp`` on CUDA; inputs are fake
clips already on the device. The paper's figures come from its Table 3
(:mod:`evl_platform.bench.paper`).
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from evl_platform.bench.common import (
    DEFAULT_CAP,
    MIB,
    LiveBytes,
    MaxBatch,
    Progress,
    amp_label,
    autocast,
    cpu_threads,
    cuda_memory_budget,
    cuda_peak_bytes,
    device_description,
    estimate_max_batch,
    fake_clips,
    load_average,
    resolve_device,
    search_max_batch,
    storage_keys,
    tensor_bytes,
    timed_runs,
    with_backbone,
)
from evl_platform.bench.paper import paper_infer
from evl_platform.config import ExperimentConfig
from evl_platform.models import create_model, model_info

CPU_THROUGHPUT_BATCH = 4


@dataclass
class InferBench:
    """Results of one ``bench infer`` run.

    Attributes:
        latency_ms: median time of one video (all its views), batch 1.
        throughput_videos_per_s: videos/s at ``throughput_batch`` videos per forward.
        max_batch: largest batch of videos that fits (searched on CUDA, estimated on CPU).
        gflops_per_video: multiply-accumulates of all views, from ``model_info``.
    """

    cfg: ExperimentConfig
    device: str
    device_name: str
    load_average: float
    views: int
    iters: int
    warmup: int
    memory_gib: float
    gflops_per_view: float
    gflops_per_video: float
    latency_ms: float
    latency_times_ms: list[float]
    throughput_videos_per_s: float
    throughput_batch: int
    throughput_batch_source: str
    max_batch: MaxBatch
    notes: list[str] = field(default_factory=list)
    run_id: str | None = None

    def metrics(self) -> dict[str, float]:
        """MLflow metrics."""
        return {
            "latency_ms": self.latency_ms,
            "throughput_videos_per_s": self.throughput_videos_per_s,
            "throughput_batch": self.throughput_batch,
            "gflops_per_video": self.gflops_per_video,
            "max_batch": self.max_batch.value,
            "max_batch_capped": float(self.max_batch.capped),
            "memory_mib_per_video": self.max_batch.per_sample_bytes / MIB,
        }

    def to_dict(self) -> dict:
        """JSON-ready fields, with the paper's figures."""
        fields = {k: v for k, v in self.__dict__.items() if k not in ("cfg", "max_batch")}
        return {
            "experiment": self.cfg.name,
            "profile": self.cfg.profile,
            "backbone": self.cfg.model.backbone.name,
            "num_frames": self.cfg.data.num_frames,
            **fields,
            "max_batch": self.max_batch.to_dict(),
            "paper": paper_infer(),
        }

    def render(self) -> str:
        """The printed table and notes."""
        cfg = self.cfg
        paper = paper_infer()
        lines = [
            f"bench infer: {cfg.name} (profile {cfg.profile}, {cfg.data.dataset}, "
            f"{cfg.model.backbone.name} {cfg.model.backbone.mode}, {cfg.data.num_frames} frames "
            f"x {self.views} views, {cfg.model.decoder.num_layers} decoder layers)",
            f"  device       {self.device}: {self.device_name}, amp {amp_label(cfg, self.device)}"
            f", load average {self.load_average:.2f} at the end",
            f"  {'':<13}{'measured':>12}  {'paper':>8}  how",
            f"  {'GFLOPs/video':<13}{self.gflops_per_video:>12.4g}  "
            f"{paper['gflops_per_video']:>8.4g}  model_info: {self.gflops_per_view:.4g} per view "
            f"x {self.views} views (multiply-accumulates)",
            f"  {'latency ms':<13}{self.latency_ms:>12.2f}  {paper['latency_ms']:>8.2f}  "
            f"batch 1 video ({self.views} clips), median of {self.iters} after {self.warmup} "
            f"warm-up (fastest {min(self.latency_times_ms):.2f})",
            f"  {'videos/s':<13}{self.throughput_videos_per_s:>12.2f}  "
            f"{paper['throughput_videos_per_s']:>8.2f}  batch {self.throughput_batch} videos "
            f"({self.throughput_batch_source})",
            f"  {'max batch':<13}{self.max_batch.label:>12}  {'':>8}  {self.max_batch.method}, "
            f"{self.max_batch.per_sample_bytes / MIB:.1f} MiB per video",
            "  paper: EVL ViT-B/16, 8 frames x 3 views, Kinetics-400, V100-32G, mixed precision",
        ]
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])

    def params(self) -> dict[str, object]:
        """MLflow params of the benchmark's own settings."""
        return {
            "bench.iters": self.iters,
            "bench.warmup": self.warmup,
            "bench.device": self.device,
            "bench.memory_gib": self.memory_gib,
            "bench.throughput_batch": self.throughput_batch,
        }


def predict(
    model: nn.Module, clips: torch.Tensor, *, views: int, device: torch.device, amp: str
) -> torch.Tensor:
    """Class scores of ``len(clips) // views`` videos, softmax averaged over their views.

    Args:
        model: the EVL model.
        clips: (B * views, 3, T, H, W), the views of each video consecutive.
    """
    with torch.inference_mode(), autocast(device, amp):
        scores = model(clips).float().softmax(-1)  # (B * views, classes)
    return scores.unflatten(0, (-1, views)).mean(1)  # (B, classes)


def find_max_batch(
    model: nn.Module, cfg: ExperimentConfig, *, device: torch.device, memory_gib: float, cap: int
) -> MaxBatch:
    """Largest batch of videos: CUDA out-of-memory search, or the CPU estimate."""
    views = cfg.data.test_views.total
    size = model.image_size

    def run(videos: int) -> None:
        clips = fake_clips(
            videos * views, num_frames=cfg.data.num_frames, image_size=size, device=device
        )
        predict(model, clips, views=views, device=device, amp=cfg.train.amp)

    if device.type == "cuda":
        with cuda_memory_budget(device, memory_gib):
            return search_max_batch(
                lambda videos: cuda_peak_bytes(lambda: run(videos), device),
                budget_gib=memory_gib,
                cap=cap,
            )
    params = tensor_bytes(list(model.parameters()))

    def measure(videos: int) -> float:
        with LiveBytes(exclude=storage_keys(model)) as live:
            run(videos)
        return params + live.peak

    what = "parameters + peak of the live tensors of one forward, inputs included"
    return estimate_max_batch(measure, budget_gib=memory_gib, cap=cap, what=what)


def bench_infer(
    cfg: ExperimentConfig,
    *,
    batch: int | None = None,
    iters: int = 10,
    warmup: int = 2,
    device: str | None = None,
    memory_gib: float = 32.0,
    cap: int = DEFAULT_CAP,
    threads: int | None = None,
    progress: Progress | None = None,
) -> InferBench:
    """Measures latency (batch 1), throughput and the largest batch of one experiment's model.

    Args:
        cfg: the experiment; its model, frames, test views and ``train.amp`` are used.
        batch: videos per forward for the throughput (default: the largest that fits on
            CUDA, 4 on CPU).
        iters: timed forwards for each figure (the median is reported).
        warmup: untimed forwards before them.
        device: ``cuda`` or ``cpu`` (default: CUDA when available).
        memory_gib: memory size the largest batch must fit in (paper: V100-32G).
        cap: largest batch the search tries.
        threads: CPU intra-op threads while measuring (default: torch's setting).
        progress: called with a line before each measurement (default: stderr).
    """
    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    target = resolve_device(device)
    info = model_info(cfg)
    variant, notes = with_backbone(cfg, device=target)
    model = create_model(variant, load_weights=False).to(target).eval()
    timing = dict(device=target, iters=iters, warmup=warmup)
    with cpu_threads(threads):
        device_name = device_description(target)
        progress(f"bench infer: {cfg.name}: largest batch ({target.type})")
        max_batch = find_max_batch(model, variant, device=target, memory_gib=memory_gib, cap=cap)
        throughput_batch, source = _throughput_batch(batch, max_batch, target)
        progress("bench infer: latency, batch 1 video")
        latency = time_videos(model, variant, 1, **timing)
        progress(f"bench infer: throughput, batch {throughput_batch} videos")
        throughput = time_videos(model, variant, throughput_batch, **timing)
    return InferBench(
        cfg=cfg,
        device=target.type,
        device_name=device_name,
        load_average=load_average(),
        views=cfg.data.test_views.total,
        iters=iters,
        warmup=warmup,
        memory_gib=memory_gib,
        gflops_per_view=info["gflops_per_view"],
        gflops_per_video=info["gflops_total"],
        latency_ms=1000 * statistics.median(latency),
        latency_times_ms=[1000 * t for t in latency],
        throughput_videos_per_s=throughput_batch / statistics.median(throughput),
        throughput_batch=throughput_batch,
        throughput_batch_source=source,
        max_batch=max_batch,
        notes=notes,
    )


def time_videos(
    model: nn.Module,
    cfg: ExperimentConfig,
    videos: int,
    *,
    device: torch.device,
    iters: int,
    warmup: int,
) -> list[float]:
    """Wall times of :func:`predict` on ``videos`` fake videos already on the device."""
    views = cfg.data.test_views.total
    size = model.image_size
    clips = fake_clips(
        videos * views, num_frames=cfg.data.num_frames, image_size=size, device=device
    )
    return timed_runs(
        lambda: predict(model, clips, views=views, device=device, amp=cfg.train.amp),
        iters=iters,
        warmup=warmup,
        device=device,
    )


def _throughput_batch(
    batch: int | None, max_batch: MaxBatch, device: torch.device
) -> tuple[int, str]:
    """The throughput batch and where it comes from, in words."""
    if batch is not None:
        return batch, "--batch"
    if device.type == "cuda":
        if max_batch.value < 1:
            raise ValueError(f"bench infer: not even one video fits in {max_batch.method}")
        return max_batch.value, "largest that fits" + (" (search cap)" if max_batch.capped else "")
    return CPU_THROUGHPUT_BATCH, (
        f"CPU default, not the estimated largest batch {max_batch.label}: no allocator to "
        "confirm it"
    )

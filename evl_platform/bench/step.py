"""``evl-platform bench step``: the paper's Table 5 (idealised training step time) here.

Four models share one batch size: a frozen or open (finetuned) CLIP backbone, under either a
global-average-pool head (per-frame CLIP embeddings averaged over frames, then a linear
classifier) or the EVL decoder head. One step is forward + backward + AdamW update on fake
data (random normalised clips, random labels), with AMP per ``train.amp`` on CUDA: the
training loop's own :func:`~evl_platform.train.loop.train_step`, optimizer, schedule and loss
scaler. A batch larger than the largest that fits runs as equal chunks with gradient
accumulation. The paper's figures come from its Table 5 (:mod:`evl_platform.bench.paper`).
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from evl_platform.bench.common import (
    DEFAULT_CAP,
    MIB,
    MaxBatch,
    Progress,
    amp_label,
    cpu_threads,
    cuda_memory_budget,
    cuda_peak_bytes,
    device_description,
    estimate_max_batch,
    fake_clips,
    load_average,
    release_memory,
    resolve_device,
    saved_tensor_bytes,
    search_max_batch,
    tensor_bytes,
    timed_runs,
    with_backbone,
)
from evl_platform.bench.heads import create_bench_model
from evl_platform.bench.paper import paper_ratio, paper_step
from evl_platform.config import ExperimentConfig
from evl_platform.train.loop import (
    EVLForward,
    InputBatch,
    amp_dtype,
    create_optimizer,
    create_scaler,
    create_schedule,
    train_step,
)

COMBINATIONS = (("frozen", "gap"), ("open", "gap"), ("frozen", "evl"), ("open", "evl"))
HEAD_NAMES = {"gap": "global average pool", "evl": "EVL"}
# A modest initial loss scale, so that float16 steps are not skipped for overflow while the
# scaler settles: every timed step includes the AdamW update.
LOSS_SCALE = 2.0**8


@dataclass
class StepResult:
    """One backbone x head combination.

    Attributes:
        backbone: ``frozen`` or ``open`` (finetuned).
        head: ``gap`` or ``evl``.
        max_batch: the largest batch that fits.
        chunks: gradient-accumulation chunks the benchmark batch ran as.
        step_time_s: median step time (``None``: not even one sample fits).
        step_times_s: every timed step, in order.
        backbone_params: backbone parameter tensors.
        backbone_grads: backbone parameter tensors holding a ``.grad`` after the last step.
    """

    backbone: str
    head: str
    max_batch: MaxBatch
    chunks: int
    step_time_s: float | None
    step_times_s: list[float]
    backbone_params: int
    backbone_grads: int

    @property
    def key(self) -> str:
        """``frozen_evl``-style name used in metric names."""
        return f"{self.backbone}_{self.head}"

    def to_dict(self) -> dict:
        """JSON-ready fields, with the paper's figures."""
        paper_batch, paper_time = paper_step(self.backbone, self.head)
        return {
            **{k: v for k, v in self.__dict__.items() if k != "max_batch"},
            "max_batch": self.max_batch.to_dict(),
            "paper_max_batch": paper_batch,
            "paper_step_time_s": paper_time,
        }


@dataclass
class StepBench:
    """Results of one ``bench step`` run."""

    cfg: ExperimentConfig
    device: str
    device_name: str
    load_average: float
    batch: int
    iters: int
    warmup: int
    memory_gib: float
    results: list[StepResult]
    notes: list[str] = field(default_factory=list)
    run_id: str | None = None

    def result(self, backbone: str, head: str) -> StepResult:
        """The result of one combination."""
        return next(r for r in self.results if (r.backbone, r.head) == (backbone, head))

    def ratio(self, head: str, *, fastest: bool = False) -> float | None:
        """Open over frozen median (or fastest) step time (the paper's: :func:`paper_ratio`)."""
        frozen, opened = self.result("frozen", head), self.result("open", head)
        if not frozen.step_times_s or not opened.step_times_s:
            return None
        if fastest:
            return min(opened.step_times_s) / min(frozen.step_times_s)
        return opened.step_time_s / frozen.step_time_s

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: ``step_time_s/<combo>``, ``max_batch/<combo>``, ratios."""
        metrics: dict[str, float] = {}
        for r in self.results:
            if r.step_time_s is not None:
                metrics[f"step_time_s/{r.key}"] = r.step_time_s
                metrics[f"fastest_step_time_s/{r.key}"] = min(r.step_times_s)
            metrics[f"max_batch/{r.key}"] = r.max_batch.value
            metrics[f"max_batch_capped/{r.key}"] = float(r.max_batch.capped)
            metrics[f"memory_mib_per_sample/{r.key}"] = r.max_batch.per_sample_bytes / MIB
            metrics[f"backbone_grads/{r.key}"] = r.backbone_grads
        for head in ("gap", "evl"):
            if (ratio := self.ratio(head)) is not None:
                metrics[f"frozen_open_ratio/{head}"] = ratio
        return metrics

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        fields = {k: v for k, v in self.__dict__.items() if k not in ("cfg", "results")}
        return {
            "experiment": self.cfg.name,
            "profile": self.cfg.profile,
            "backbone": self.cfg.model.backbone.name,
            **fields,
            "results": [r.to_dict() for r in self.results],
            "frozen_open_ratio": {head: self.ratio(head) for head in ("gap", "evl")},
            "paper_frozen_open_ratio": {head: paper_ratio(head) for head in ("gap", "evl")},
        }

    def render(self) -> str:
        """The printed table and notes."""
        return render_step(self)

    def params(self) -> dict[str, object]:
        """MLflow params of the benchmark's own settings."""
        return {
            "bench.batch": self.batch,
            "bench.iters": self.iters,
            "bench.warmup": self.warmup,
            "bench.device": self.device,
            "bench.memory_gib": self.memory_gib,
        }


def render_step(bench: StepBench) -> str:
    """The paper-style table, the ratio line and the notes."""
    cfg = bench.cfg
    header = (
        f"bench step: {cfg.name} (profile {cfg.profile}, {cfg.data.dataset}, "
        f"{cfg.model.backbone.name}, {cfg.data.num_frames} frames, "
        f"{cfg.model.decoder.num_layers} decoder layers)"
    )
    lines = [
        header,
        f"  device     {bench.device}: {bench.device_name}, load average "
        f"{bench.load_average:.2f} at the end",
        f"  step       batch {bench.batch}, median of {bench.iters} steps after {bench.warmup} "
        f"warm-up; forward + backward + AdamW, amp {amp_label(cfg, bench.device)}",
        f"  max batch  {bench.results[0].max_batch.method}; >=N: still fits at the search cap "
        "(the paper's inf.)",
        "",
        f"  {'backbone':<14}{'head':<21}{'max batch':>10}{'MiB/sample':>12}{'chunks':>8}"
        f"{'step (s)':>10}{'fastest':>9}{'paper batch':>13}{'paper (s)':>11}  backbone grads",
    ]
    for r in bench.results:
        paper_batch, paper_time = paper_step(r.backbone, r.head)
        step, fastest = (
            ("n/a", "n/a")
            if r.step_time_s is None
            else (f"{r.step_time_s:.3f}", f"{min(r.step_times_s):.3f}")
        )
        grads = "none" if r.backbone_grads == 0 else f"{r.backbone_grads}/{r.backbone_params}"
        lines.append(
            f"  {'CLIP (' + r.backbone + ')':<14}{HEAD_NAMES[r.head]:<21}{r.max_batch.label:>10}"
            f"{r.max_batch.per_sample_bytes / MIB:>12.1f}{r.chunks:>8}{step:>10}{fastest:>9}"
            f"{paper_batch:>13}{paper_time:>11.2f}  {grads}"
        )
    lines += ["", _ratio_line(bench)]
    return "\n".join(lines + [f"  note: {note}" for note in bench.notes])


def _ratio_line(bench: StepBench) -> str:
    parts = []
    for head in ("evl", "gap"):
        paper = paper_ratio(head)
        ratio, fastest = bench.ratio(head), bench.ratio(head, fastest=True)
        shown = "n/a" if ratio is None else f"{ratio:.2f}x (fastest steps {fastest:.2f}x)"
        parts.append(f"{HEAD_NAMES[head]} {shown}, paper {paper:.2f}x")
    return "  open/frozen step time: " + "; ".join(parts)


def make_step(
    model: nn.Module, cfg: ExperimentConfig, *, batch: int, micro: int, device: torch.device
) -> Callable[[], None]:
    """One :func:`~evl_platform.train.loop.train_step` on fixed fake data: ``batch`` samples
    in chunks of at most ``micro`` (``train.amp`` autocast and loss scaling on CUDA)."""
    optimizer = create_optimizer(model, cfg.train)
    scheduler = create_schedule(optimizer, cfg.train)
    amp = amp_dtype(cfg.train, device)
    scaler = create_scaler(device, amp, init_scale=LOSS_SCALE)
    size = model.backbone.image_size
    clips = fake_clips(batch, num_frames=cfg.data.num_frames, image_size=size, device=device)
    labels = torch.randint(cfg.data.num_classes, (batch,), device=device)
    fake = InputBatch(clips, labels, torch.arange(batch))
    net = EVLForward(model)

    def step() -> None:
        train_step(
            net,
            fake,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            device=device,
            amp=amp,
            batch_split=math.ceil(batch / micro),
        )

    return step


def _fixed_train_bytes(model: nn.Module) -> int:
    """Parameters + gradients + AdamW's two moments of the trainable parameters."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return tensor_bytes(list(model.parameters())) + 3 * tensor_bytes(trainable)


def find_max_batch(
    model: nn.Module, cfg: ExperimentConfig, *, device: torch.device, memory_gib: float, cap: int
) -> MaxBatch:
    """Largest training batch: CUDA out-of-memory search, or the CPU estimate."""
    size = model.backbone.image_size
    if device.type == "cuda":

        def two_steps(batch: int) -> None:
            # Built inside the measured call, as its fake batch may not fit either; the second
            # step holds the AdamW state through its forward and backward (the steady state).
            step = make_step(model, cfg, batch=batch, micro=batch, device=device)
            step()
            step()

        def peak_at(batch: int) -> int | None:
            model.zero_grad(set_to_none=True)
            return cuda_peak_bytes(lambda: two_steps(batch), device)

        with cuda_memory_budget(device, memory_gib):
            found = search_max_batch(peak_at, budget_gib=memory_gib, cap=cap)
        model.zero_grad(set_to_none=True)
        return found
    fixed = _fixed_train_bytes(model)

    def measure(batch: int) -> float:
        clips = fake_clips(batch, num_frames=cfg.data.num_frames, image_size=size, device=device)
        return fixed + saved_tensor_bytes(model, clips)

    what = "parameters + gradients + AdamW state + tensors saved for backward"
    return estimate_max_batch(measure, budget_gib=memory_gib, cap=cap, what=what)


def run_combination(
    cfg: ExperimentConfig,
    *,
    head: str,
    batch: int,
    iters: int,
    warmup: int,
    device: torch.device,
    memory_gib: float,
    cap: int,
) -> StepResult:
    """Builds one model, finds its largest batch, and times its training step."""
    model = create_bench_model(cfg, head).to(device).train()
    max_batch = find_max_batch(model, cfg, device=device, memory_gib=memory_gib, cap=cap)
    micro = max_batch.value if device.type == "cuda" else max(1, max_batch.value)
    times = []
    if micro > 0:
        chunks = math.ceil(batch / micro)
        step = make_step(model, cfg, batch=batch, micro=math.ceil(batch / chunks), device=device)
        times = timed_runs(step, iters=iters, warmup=warmup, device=device)
    backbone = list(model.backbone.parameters())
    return StepResult(
        backbone="open" if cfg.model.backbone.mode == "finetune" else "frozen",
        head=head,
        max_batch=max_batch,
        chunks=math.ceil(batch / micro) if micro else 0,
        step_time_s=statistics.median(times) if times else None,
        step_times_s=times,
        backbone_params=len(backbone),
        backbone_grads=sum(p.grad is not None for p in backbone),
    )


def bench_step(
    cfg: ExperimentConfig,
    *,
    batch: int | None = None,
    iters: int = 10,
    warmup: int = 2,
    device: str | None = None,
    memory_gib: float = 16.0,
    cap: int = DEFAULT_CAP,
    threads: int | None = None,
    progress: Progress | None = None,
) -> StepBench:
    """Times the training step of frozen/open backbone x GAP/EVL head at one batch size.

    Args:
        cfg: the experiment; its backbone, decoder, data shape and ``train`` recipe are used.
        batch: samples per step (default 64 on CUDA, 16 on CPU).
        iters: timed steps per combination (the median is reported).
        warmup: untimed steps before them.
        device: ``cuda`` or ``cpu`` (default: CUDA when available).
        memory_gib: memory size the largest batch must fit in (paper: V100-16G).
        cap: largest batch the search tries.
        threads: CPU intra-op threads while measuring (default: torch's setting).
        progress: called with a line before each combination (default: stderr).
    """
    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    target = resolve_device(device)
    batch = batch or (64 if target.type == "cuda" else 16)
    settings = dict(
        batch=batch, iters=iters, warmup=warmup, device=target, memory_gib=memory_gib, cap=cap
    )
    results, notes = [], []
    with cpu_threads(threads):
        device_name = device_description(target)
        for backbone, head in COMBINATIONS:
            variant, changed = with_backbone(
                cfg, device=target, mode="finetune" if backbone == "open" else "frozen"
            )
            notes += [note for note in changed if note not in notes]
            progress(f"bench step: CLIP ({backbone}) + {HEAD_NAMES[head]}, batch {batch}")
            results.append(run_combination(variant, head=head, **settings))
            release_memory()
    return StepBench(
        cfg=cfg,
        device=target.type,
        device_name=device_name,
        load_average=load_average(),
        batch=batch,
        iters=iters,
        warmup=warmup,
        memory_gib=memory_gib,
        results=results,
        notes=notes + _result_notes(results, batch),
    )


def _result_notes(results: list[StepResult], batch: int) -> list[str]:
    """Accumulation, capped searches, missing/unexpected gradients, in words."""
    notes = []
    for r in results:
        name = f"{r.backbone}+{r.head}"
        if r.chunks > 1:
            notes.append(
                f"{name}: batch {batch} ran as {r.chunks} chunks with gradient accumulation "
                f"(largest batch that fits: {r.max_batch.value})"
            )
        if r.step_time_s is None:
            notes.append(f"{name}: not even one sample fits; not timed")
    frozen = [r for r in results if r.backbone == "frozen"]
    if all(r.backbone_grads == 0 for r in frozen):
        notes.append("frozen backbones: no backbone parameter holds a .grad after the step")
    else:
        notes.append("WARNING: a frozen backbone ended the step with parameter gradients")
    return notes

"""``evl-platform bench data``: the full loader against raw decoding of the same frames.

Both sides get the same worker processes (one decoding thread each) and the same clips: the
same videos and frame indices, drawn with the dataset's own per-item seeds, decoded by the same
decoder at the same size. The raw side only opens each video and fetches those frames; the
loader side also samples, crops, augments (unless ``data.augment.on`` is ``device``: then the
batches carry their augmentation plans), collates and ships batches to the main process.
Both are timed over all the clips, from the first request to the last result, with their
worker processes already started and the files in the page cache, in three interleaved rounds
whose best clips/s counts on each side; the ratio of those is the loader's efficiency. The
loader's clips/s per worker process is what one CPU core delivers, the figure that sizes CPUs
per GPU. A loader epoch has a fixed start-up (its workers are told to begin), so time a few
hundred clips for a steady figure. RandAugment and the flip are also timed on their own, per
clip: the loader's numpy kernels on one core, and the batched torch kernels on the training
device (CUDA when present, the CPU otherwise), so the output says what moving them off the
loader saves and costs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch

from evl_platform.config import ExperimentConfig
from evl_platform.data.augment_device import apply_plans
from evl_platform.data.dataset import VideoDataset, VideoLoader
from evl_platform.data.decode import (
    DECODER_MODULES,
    VideoError,
    check_decoder,
    decode_views,
    open_video,
)
from evl_platform.data.errors import DataSourceError
from evl_platform.data.rand_augment import apply_plan
from evl_platform.data.source import create_dataset, read_splits

TARGET_RATIO = 0.9
ROUNDS = 3  # timed rounds of each side


@dataclass
class DataBench:
    """Results of one ``bench data`` run."""

    experiment: str
    dataset: str
    split: str
    clips: int
    clip_shape: tuple[int, ...]
    workers: int
    decoder: str
    decode_short_side: int | None
    raw_clips_per_s: float
    loader_clips_per_s: float
    decode_ms: float
    transform_ms: float
    machine: str
    augment_on: str = "loader"
    augment_loader_ms: float | None = None  # numpy kernels, one core, per clip
    augment_device_ms: float | None = None  # batched torch kernels, per clip
    augment_device: str = ""
    batch: int = 1  # clips per loader batch
    skipped: int = 0  # the split's videos left out: they do not open with enough frames

    @property
    def ratio(self) -> float:
        """Loader clips/s over raw decode clips/s."""
        return self.loader_clips_per_s / self.raw_clips_per_s

    @property
    def clips_per_s_per_core(self) -> float:
        """Full-loader clips/s per loader worker process (one core each)."""
        return self.loader_clips_per_s / self.workers

    def to_dict(self) -> dict:
        """JSON-ready fields, including the ratio, the target and the per-core rate."""
        return {
            **self.__dict__,
            "ratio": self.ratio,
            "target_ratio": TARGET_RATIO,
            "clips_per_s_per_core": self.clips_per_s_per_core,
        }

    def render(self) -> str:
        """The printed table."""
        verdict = "meets" if self.ratio >= TARGET_RATIO else "below"
        shape = "x".join(map(str, self.clip_shape))
        size = (
            "native size"
            if self.decode_short_side is None
            else (f"short side {self.decode_short_side}")
        )
        return "\n".join(
            [
                f"bench data: {self.experiment} ({self.dataset}, {self.split} split, "
                f"{self.clips} clips of {shape}, {self.workers} worker(s), batches of "
                f"{self.batch}, {self.decoder} "
                f"at {size})",
                f"  machine          {self.machine}",
                f"  raw decode       {self.raw_clips_per_s:8.1f} clips/s  "
                f"({self.decoder}, same frames, same size, same processes)",
                f"  full loader      {self.loader_clips_per_s:8.1f} clips/s  "
                f"({self._loader_work()})",
                f"  per core         {self.clips_per_s_per_core:8.1f} clips/s  "
                "(full loader / worker processes)",
                f"  ratio            {self.ratio:8.2f}  ({verdict} the {TARGET_RATIO} target)",
                f"  per clip, 1 core decode {self.decode_ms:.2f} ms, "
                f"sample + transform {self.transform_ms:.2f} ms (CPU time)",
                *self._augment_lines(),
                *(
                    [f"  skipped          {self.skipped} unusable video(s) of the split"]
                    if self.skipped
                    else []
                ),
            ]
        )

    def _loader_work(self) -> str:
        if self.split != "train":
            return "decode + sample + resize + crops + collate"
        if self.augment_on == "device":
            return "decode + sample + crop + collate; RandAugment and flip on the device"
        return "decode + sample + crop + RandAugment + flip + collate"

    def _augment_lines(self) -> list[str]:
        if self.augment_loader_ms is None:
            return []
        line = (
            f"  RandAugment+flip loader kernels {self.augment_loader_ms:.2f} ms/clip (numpy, 1 "
            f"core)"
        )
        if self.augment_device_ms is not None:
            line += (
                f"; batched torch kernels {self.augment_device_ms:.2f} ms/clip on "
                f"{self.augment_device}"
            )
        return [line, f"  augmentation runs on the {self.augment_on} (data.augment.on)"]


def machine_description() -> str:
    """CPU model, core count and platform, for benchmark records."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _raw_decode(task: tuple[str, int, int, tuple]) -> int:
    """Decodes one clip's frames with the dataset's sampling draw; returns the frame count."""
    path, index, epoch, (sampler, seed, decoder, short_side) = task
    rng = np.random.default_rng([seed, epoch, index])
    views = decode_views(
        path, lambda length: sampler(length, rng), decoder=decoder, short_side=short_side
    )
    return sum(len(v) for v in views)


def _usable_records(dataset: VideoDataset) -> tuple[list[int], int]:
    """The split's records that open with enough frames (both sides time the same good
    clips; the loader's replacement of bad videos is not what is measured), and how many did
    not.

    Raises:
        DataSourceError: none of them does.
    """
    usable = []
    for index, record in enumerate(dataset.records):
        try:
            with open_video(record.path, dataset.decoder) as reader:
                if reader.num_frames >= dataset.min_frames:
                    usable.append(index)
        except VideoError:
            pass
    if not usable:
        raise DataSourceError(f"{dataset.annotations.source}: no usable video to time")
    return usable, len(dataset.records) - len(usable)


def _one_thread() -> None:
    torch.set_num_threads(1)


def _raw_rate(dataset: VideoDataset, indices: list[int], workers: int, epoch: int) -> float:
    context = (dataset.sampler, dataset.seed, dataset.decoder, dataset.short_side)
    tasks = [(str(dataset.records[i].path), i, epoch, context) for i in indices]
    # one intra-op thread per process, as in loader workers (and no OpenMP pool inherited
    # through fork: torch ops in a forked child would wait on the parent's threads)
    with concurrent.futures.ProcessPoolExecutor(workers, initializer=_one_thread) as pool:
        list(pool.map(_raw_decode, tasks[: workers * 2]))  # start the processes
        start = time.perf_counter()
        # chunks small enough that every process gets an equal share of them
        list(pool.map(_raw_decode, tasks, chunksize=max(1, min(8, len(tasks) // (4 * workers)))))
        return len(tasks) / (time.perf_counter() - start)


def _loader_rate(loader: VideoLoader, epoch: int) -> float:
    """Clips/s of one whole epoch of ``loader`` (its persistent workers already started):
    timed from asking for the first batch to the last, as the raw side is timed from its
    first task to its last."""
    start, clips = time.perf_counter(), 0
    for batch in loader.epoch(epoch):
        clips += len(batch.labels)
    return clips / (time.perf_counter() - start)


@dataclass
class _PerClip:
    decode_ms: float
    transform_ms: float
    augment_loader_ms: float | None
    augment_device_ms: float | None
    augment_device: str


def _device_augment_ms(clips: list[torch.Tensor], plans: list[np.ndarray]) -> tuple[float, str]:
    """Per-clip time of the batched torch kernels on CUDA when present, else the CPU (one
    thread), best of 3 over the clips as one batch."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, stacked = torch.stack(clips).to(device), np.stack(plans)
    best = math.inf
    for _ in range(3):
        work = batch.clone()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        apply_plans(work, stacked, kernels="torch")
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU, 1 thread"
    return 1000 * best / len(clips), name


def _per_clip_ms(dataset: VideoDataset, indices: list[int]) -> _PerClip:
    """Single-process decode, transform and augmentation CPU time per clip (CPU time rather
    than wall time, so that other jobs on the machine do not inflate it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    decode = transform = augment = 0.0
    cropped, plans = [], []
    for index in indices:
        rng = np.random.default_rng([dataset.seed, 0, index])
        t0 = time.process_time()
        views = decode_views(
            dataset.records[index].path,
            lambda n, rng=rng: dataset.sampler(n, rng),
            decoder=dataset.decoder,
            short_side=dataset.short_side,
        )
        t1 = time.process_time()
        plan = None
        if dataset.train:
            clip, plan = dataset.transform(views[0], rng)
        else:
            [dataset.transform(v) for v in views]
        t2 = time.process_time()
        decode, transform = decode + t1 - t0, transform + t2 - t1
        if plan is not None:
            apply_plan(clip.transpose(0, 1), plan)
            augment += time.process_time() - t2
            cropped.append(clip)
            plans.append(plan)
    device_ms, device = _device_augment_ms(cropped, plans) if plans else (None, "")
    torch.set_num_threads(threads)
    n = len(indices)
    return _PerClip(
        1000 * decode / n,
        1000 * transform / n,
        1000 * augment / n if plans else None,
        device_ms,
        device,
    )


def bench_data(
    cfg: ExperimentConfig,
    *,
    workers: int,
    clips: int = 512,
    split: str = "train",
    decoder: str | None = None,
    native_size: bool = False,
    batch: int | None = None,
) -> DataBench:
    """Measures loader and raw-decode clips/s on ``clips`` clips of ``split``.

    Args:
        cfg: the experiment.
        workers: loader worker processes, and raw-decode processes.
        clips: clips timed on each side.
        split: ``train`` (random clip + augmentation) or ``val`` (all test views).
        decoder: a ``data.decoder`` to use instead of the config's.
        native_size: decode at each video's own size instead of the short side the
            transforms need (the loader's behaviour before decoder-side scaling).
        batch: clips per loader batch (default ``train.batch_size``, at most
            ``clips / (4 x workers)`` so that every worker delivers several batches).
    """
    if decoder is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"decoder": decoder})})
    annotations = read_splits(cfg.data)[split]
    dataset = create_dataset(cfg, annotations, train=split == "train")
    usable, bad = _usable_records(dataset)
    indices = [usable[i % len(usable)] for i in range(clips)]
    subset = VideoDataset(
        dataclasses.replace(annotations, records=tuple(dataset.records[i] for i in indices)),
        data=cfg.data,
        image_size=dataset.transform.size,
        train=dataset.train,
        seed=dataset.seed,
    )
    if native_size:
        subset.short_side = None
    per_clip = _per_clip_ms(subset, list(range(min(64, clips))))
    if batch is None:
        batch = max(1, min(cfg.train.batch_size, clips // (4 * workers) or 1))
    video_loader = VideoLoader(
        subset, batch_size=batch, num_workers=workers, shuffle=False, max_bad_fraction=1.0
    )
    next(video_loader.epoch(1))  # start the persistent workers
    loader = raw = 0.0
    for _ in range(ROUNDS):  # interleaved, best of each: a busy moment hits both sides alike
        loader = max(loader, _loader_rate(video_loader, epoch=1))
        raw = max(raw, _raw_rate(subset, list(range(clips)), workers, epoch=1))
    del video_loader  # its worker processes end
    sample = subset[0].clip
    return DataBench(
        experiment=cfg.name,
        dataset=cfg.data.dataset,
        split=split,
        clips=clips,
        clip_shape=tuple(sample.shape),
        workers=workers,
        batch=batch,
        skipped=bad,
        decoder=cfg.data.decoder,
        decode_short_side=subset.short_side,
        raw_clips_per_s=raw,
        loader_clips_per_s=loader,
        decode_ms=per_clip.decode_ms,
        transform_ms=per_clip.transform_ms,
        machine=machine_description(),
        augment_on=cfg.data.augment.on if subset.train else "loader",
        augment_loader_ms=per_clip.augment_loader_ms,
        augment_device_ms=per_clip.augment_device_ms,
        augment_device=per_clip.augment_device,
    )


@dataclass
class DecoderTable:
    """``bench data --decoder all``: one :class:`DataBench` per usable decoder."""

    results: list[DataBench]
    unusable: dict[str, str]  # decoder -> why it could not run

    def to_dict(self) -> dict:
        """JSON-ready: every result and every decoder that could not run."""
        return {"results": [r.to_dict() for r in self.results], "unusable": self.unusable}

    def render(self) -> str:
        """The printed comparison."""
        first = self.results[0]
        shape = "x".join(map(str, first.clip_shape))
        size = first.decode_short_side or "native"
        lines = [
            f"bench data: {first.experiment} ({first.dataset}, {first.split} split, "
            f"{first.clips} clips of {shape}, {first.workers} worker(s), decoded at short side "
            f"{size})",
            f"  machine     {first.machine}",
            "  decoder       raw clips/s  loader clips/s  ratio  per core  decode CPU ms/clip",
        ]
        for r in self.results:
            lines.append(
                f"  {r.decoder:<12} {r.raw_clips_per_s:12.1f} {r.loader_clips_per_s:15.1f} "
                f"{r.ratio:6.2f} {r.clips_per_s_per_core:9.1f} {r.decode_ms:15.1f}"
            )
        lines += [f"  {name:<12} not run: {why}" for name, why in self.unusable.items()]
        return "\n".join(lines)


def bench_decoders(cfg: ExperimentConfig, **options: object) -> DecoderTable:
    """:func:`bench_data` with every decoder whose library imports here, on the same clips."""
    results, unusable = [], {}
    for name in DECODER_MODULES:
        try:
            check_decoder(name)
        except DataSourceError as err:
            unusable[name] = str(err)
            continue
        results.append(bench_data(cfg, decoder=name, **options))
    return DecoderTable(results, unusable)

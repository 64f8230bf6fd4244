"""Synthetic stand-in datasets: seeded H.264 mp4 (or VP9 webm) clips with annotations in the
real formats.

``synthetic-motion`` stands in for Something-Something-v2 (SSv2 JSON): the class is a motion,
in time-reversal pairs whose clips are the same frames in opposite order, so an order-blind
model sits at exactly 50% within each pair. ``synthetic-appearance`` stands in for
Kinetics-400 (Kinetics CSV): the class is a static look and the motion is random.

:func:`ensure_synthetic` generates a dataset once into a cache directory keyed by its
parameters and the generator version, atomically, and reuses it afterwards.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from evl_platform.data.synth_datasets import (
    SYNTHETIC_DATASETS,
    ClipEntry,
    ClipJob,
    SyntheticDataset,
    write_atomic,
)
from evl_platform.data.synth_encode import CODECS, Codec, write_video

__all__ = [
    "GENERATOR_VERSION",
    "SYNTHETIC_DATASETS",
    "ClipEntry",
    "ClipJob",
    "CODECS",
    "Codec",
    "SynthParams",
    "SyntheticDataset",
    "SyntheticLayout",
    "default_cache_dir",
    "ensure_synthetic",
    "generate",
    "synthetic_dir",
    "write_video",
]

GENERATOR_VERSION = 7  # bump whenever synth_render or synth_datasets change the output
MANIFEST = "manifest.json"  # written last: its presence marks a complete dataset


@dataclass(frozen=True)
class SynthParams:
    """Size and seed of a generated stand-in; every field is part of the cache key.

    Attributes:
        clips_per_class / val_clips_per_class: training / validation clips per class.
        num_frames: frames per video.
        width / height: frame size in pixels (even numbers, for yuv420p).
        fps: frame rate written into the files.
        codec: ``h264`` (mp4 files) or ``vp9`` (webm files), see :data:`CODECS`.
        keyframe_interval: frames between keyframes; ``None`` keeps the encoder's default.
        seed: generation seed; the same parameters give byte-identical files.
    """

    clips_per_class: int = 40
    val_clips_per_class: int = 10
    num_frames: int = 32
    width: int = 128
    height: int = 96
    fps: int = 12
    codec: str = "h264"
    keyframe_interval: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clips_per_class < 1 or self.val_clips_per_class < 0:
            raise ValueError("need clips_per_class >= 1 and val_clips_per_class >= 0")
        if self.num_frames < 2 or self.fps < 1:
            raise ValueError("need num_frames >= 2 and fps >= 1")
        if self.width < 16 or self.height < 16 or self.width % 2 or self.height % 2:
            raise ValueError(
                f"width and height must be even and >= 16, got {self.width}x{self.height}"
            )
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.keyframe_interval is not None and self.keyframe_interval < 1:
            raise ValueError(f"keyframe_interval must be >= 1, got {self.keyframe_interval}")

    @property
    def extension(self) -> str:
        """Suffix of the video files (``.mp4`` or ``.webm``)."""
        return CODECS[self.codec].extension

    def cache_key(self) -> dict[str, object]:
        """The parameters that name the cache directory: every field, except that the fields
        added after generator version 7 (``codec``, ``keyframe_interval``) enter only when they
        differ from their defaults, so the stand-ins cached before they existed stay valid."""
        key = asdict(self)
        for name, default in _LATE_DEFAULTS.items():
            if key[name] == default:
                del key[name]
        return key


_LATE_DEFAULTS = {"codec": "h264", "keyframe_interval": None}


@dataclass(frozen=True)
class SyntheticLayout:
    """Where a generated stand-in lives and how to read it (maps onto ``DataConfig``).

    Attributes:
        dataset: ``synthetic-motion`` or ``synthetic-appearance``.
        directory: the dataset directory.
        root: the videos directory (``directory / "videos"``).
        format: annotation format, a config ``AnnotationFormat`` literal.
        train_annotations / val_annotations: the split files.
        label_map: SSv2 ``labels.json``, or ``None`` for the Kinetics CSV format.
        video_extension: suffix of the video files.
        class_names: class names in index order.
    """

    dataset: str
    directory: Path
    root: Path
    format: str
    train_annotations: Path
    val_annotations: Path
    label_map: Path | None
    video_extension: str
    class_names: tuple[str, ...]


def generate(
    dataset: str,
    out_dir: Path,
    params: SynthParams = SynthParams(),
    *,
    workers: int | None = None,
    progress: bool = True,
) -> SyntheticLayout:
    """Renders and encodes a stand-in into ``out_dir`` and writes its annotation files.

    The output is the same whatever ``workers`` is: every clip draws from its own generator,
    seeded by ``(seed, class, split, clip index)``.

    Args:
        dataset: a registered name (``synthetic-motion``, ``synthetic-appearance``).
        out_dir: dataset directory; videos go to ``out_dir / "videos"``.
        params: sizes and seed.
        workers: encoding processes (default: the usable CPUs; 1 encodes in this process).
            With more than one, worker processes start by ``forkserver``, so a script calling
            this needs the usual ``if __name__ == "__main__":`` guard.
        progress: show a tqdm bar on stderr.

    Returns:
        The layout of the written dataset.
    """
    spec = SYNTHETIC_DATASETS.get(dataset)
    out_dir = Path(out_dir)
    videos = out_dir / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    jobs = spec.plan(params)
    placeholders = _run_jobs(dataset, params, jobs, videos, workers=workers, progress=progress)
    spec.write_annotations(out_dir, spec.class_names, list(zip(jobs, placeholders, strict=True)))
    manifest = {
        "dataset": dataset,
        "generator_version": GENERATOR_VERSION,
        "params": asdict(params),
        "num_videos": sum(len(job.entries) for job in jobs),
    }
    write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return _layout(dataset, out_dir, params)


def default_cache_dir() -> Path:
    """``$EVL_PLATFORM_CACHE``, else ``$XDG_CACHE_HOME/evl-platform``, else ``~/.cache/...``."""
    if env := os.environ.get("EVL_PLATFORM_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "evl-platform"


def synthetic_dir(dataset: str, params: SynthParams, cache_dir: Path | None = None) -> Path:
    """The cache directory of one stand-in: ``cache_dir/synthetic/{dataset}-{key}``.

    ``key`` hashes the dataset name, every parameter and :data:`GENERATOR_VERSION`.
    """
    SYNTHETIC_DATASETS.get(dataset)
    blob = json.dumps([dataset, params.cache_key(), GENERATOR_VERSION], sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return Path(cache_dir or default_cache_dir()) / "synthetic" / f"{dataset}-{key}"


_ANNOUNCED: set[Path] = set()


def ensure_synthetic(
    dataset: str,
    params: SynthParams = SynthParams(),
    *,
    cache_dir: Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> SyntheticLayout:
    """Returns a cached stand-in, generating it first if needed.

    Generation goes to a temporary sibling directory that is renamed into place when complete,
    so concurrent callers (several processes or machines on shared storage) never see a
    half-written dataset; when two generate at once, the first rename wins and the others
    discard their copy.

    Args:
        dataset: a registered name.
        params: sizes and seed.
        cache_dir: cache root (default :func:`default_cache_dir`).
        workers: encoding processes when generating (see :func:`generate`).
        progress: show a tqdm bar while generating.

    Returns:
        The layout of the cached dataset.
    """
    target = synthetic_dir(dataset, params, cache_dir)
    if _is_complete(target):
        if target not in _ANNOUNCED:  # once per process, not on every lookup
            _ANNOUNCED.add(target)
            _say(f"using cached {dataset} stand-in at {target}")
        return _layout(dataset, target, params)
    count = len(SYNTHETIC_DATASETS.get(dataset).class_names) * (
        params.clips_per_class + params.val_clips_per_class
    )
    _say(f"generating {dataset} stand-in into {target} ({count} clips)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    )
    staging.chmod(target.parent.stat().st_mode & 0o777)  # mkdtemp's 0700 would stick
    try:
        generate(dataset, staging, params, workers=workers, progress=progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        os.rename(staging, target)
    except OSError as err:  # another process renamed its copy into place first
        shutil.rmtree(staging, ignore_errors=True)
        if not _is_complete(target):
            raise RuntimeError(f"{target} exists but has no {MANIFEST}; delete it") from err
        _say(f"another process finished {target} first; using it")
    return _layout(dataset, target, params)


# --- generation machinery ----------------------------------------------------------------------


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _is_complete(directory: Path) -> bool:
    try:
        return json.loads((directory / MANIFEST).read_text())["generator_version"] == (
            GENERATOR_VERSION
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _layout(dataset: str, directory: Path, params: SynthParams) -> SyntheticLayout:
    spec = SYNTHETIC_DATASETS.get(dataset)
    return SyntheticLayout(
        dataset=dataset,
        directory=directory,
        root=directory / "videos",
        format=spec.format,
        train_annotations=directory / spec.train_file,
        val_annotations=directory / spec.val_file,
        label_map=directory / spec.label_map_file if spec.label_map_file else None,
        video_extension=params.extension,
        class_names=spec.class_names,
    )


def _render_job(dataset: str, params: SynthParams, job: ClipJob, videos: Path) -> tuple[str, ...]:
    """Renders one job and writes its video(s); returns the placeholders (runs in a worker)."""
    spec = SYNTHETIC_DATASETS.get(dataset)
    frames, placeholders = spec.render(job, np.random.default_rng(job.seed), params)
    encoding = {
        "fps": params.fps,
        "codec": params.codec,
        "keyframe_interval": params.keyframe_interval,
    }
    write_video(videos / job.entry.file_name, frames, **encoding)
    if job.twin is not None:
        write_video(videos / job.twin.file_name, frames[::-1], **encoding)
    return tuple(placeholders)


def _run_jobs(
    dataset: str,
    params: SynthParams,
    jobs: list[ClipJob],
    videos: Path,
    *,
    workers: int | None,
    progress: bool,
) -> list[tuple[str, ...]]:
    workers = max(1, min(workers or _usable_cpus(), len(jobs)))
    total = sum(len(job.entries) for job in jobs)
    results: list[tuple[str, ...]] = [()] * len(jobs)
    with tqdm(total=total, desc=dataset, unit="clip", file=sys.stderr, disable=not progress) as bar:
        if workers == 1:
            for k, job in enumerate(jobs):
                results[k] = _render_job(dataset, params, job, videos)
                bar.update(len(job.entries))
            return results
        # forkserver: forking a parent that runs torch/Ray threads can deadlock the children
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {
                pool.submit(_render_job, dataset, params, job, videos): k
                for k, job in enumerate(jobs)
            }
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update(len(jobs[futures[future]].entries))
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
    return results


def _usable_cpus() -> int:
    """CPUs this process may run on (respects affinity masks, unlike ``os.cpu_count``)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1

"""``evl-platform data prepare``: re-encode a dataset once for fast decoding, with Ray tasks.

:func:`prepare_dataset` runs on the driver. It reads both splits as ``data check`` does, maps
every video to ``<out>/<name>.mp4`` (:func:`~evl_platform.data.prepare_annotations.prepared_name`),
skips those already there, and runs one Ray task per small chunk of the rest
(:func:`~evl_platform.data.prepare_encode.encode_video`), as many at once as the cluster has
CPUs, with a progress bar and an ETA. Each file appears under its name only once complete
(atomic rename), so after Ctrl-C, a SIGKILL or a lost node a rerun redoes only what is missing.
A bad input never stops the run: it is counted, listed in ``<out>/prepare_problems.csv``
(``data check``'s columns) and left out of the annotation files written for the prepared root.
On a cluster, ``<out>`` and the input videos must be on storage every node shares.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from evl_platform.config import ExperimentConfig
from evl_platform.data.annotations import Annotations
from evl_platform.data.check import Probe
from evl_platform.data.decode import BAD_KINDS, VideoError
from evl_platform.data.errors import DataSourceError
from evl_platform.data.prepare_annotations import (
    PREPARED_EXTENSION,
    prepared_name,
    write_label_map,
    write_split,
)
from evl_platform.data.prepare_encode import (
    TMP_MARKER,
    EncodeResult,
    EncodeSettings,
    encode_video,
)
from evl_platform.data.source import read_splits, resolve_files

MANIFEST = "prepare.json"
PROBLEMS_CSV = "prepare_problems.csv"
UNIFORM_KEYFRAME_INTERVAL = 16
"""Keyframe interval for uniform sampling, whose frame gaps depend on each video's length:
mmaction2's choice for re-encoded Kinetics; a sampled frame then costs at most 15 decoded
frames before it."""
MAX_CHUNK = 8
"""Upper bound on the videos of one task."""
_SETTINGS_KEYS = ("short_side", "keyframe_interval", "crf", "preset")


def default_short_side(cfg: ExperimentConfig) -> int:
    """The smallest even short side >= 8/7 of the model's input size (256 for 224-pixel
    crops, 384 for 336): the test resize needs the input size, and the margin keeps the
    training crops' detail (mmaction2's and the EVL recipe's 256 for 224)."""
    from evl_platform.data.source import image_size

    return 2 * math.ceil(image_size(cfg) * 8 / 7 / 2)


def default_keyframe_interval(cfg: ExperimentConfig) -> int:
    """stride x frames / 8 for dense sampling (16 for the 8x16 K400 recipe, so a clip spans
    at most 9 GOPs), :data:`UNIFORM_KEYFRAME_INTERVAL` for uniform sampling."""
    if cfg.data.sampling == "dense":
        return max(1, cfg.data.stride * cfg.data.num_frames // 8)
    return UNIFORM_KEYFRAME_INTERVAL


def encode_settings(
    cfg: ExperimentConfig, *, short_side: int | None = None, keyframe_interval: int | None = None
) -> EncodeSettings:
    """The encoding of a prepared copy of ``cfg``'s dataset (defaults from the recipe)."""
    return EncodeSettings(
        short_side=short_side or default_short_side(cfg),
        keyframe_interval=keyframe_interval or default_keyframe_interval(cfg),
        min_frames=cfg.data.min_frames or cfg.data.num_frames,
    )


@dataclass
class PrepareReport:
    """What one :func:`prepare_dataset` call did.

    Attributes:
        out_dir: the prepared root.
        format: annotation format (the input's).
        settings: the encoding used.
        videos: distinct input files of both splits.
        reused: files already prepared by an earlier run, not encoded again.
        written: files this call encoded.
        problems: one row per bad video and split, as ``data check`` lists them.
        annotations: split -> annotation file written.
        label_map: the class order file written.
        seconds: wall-clock time of the call.
    """

    out_dir: Path
    format: str
    settings: EncodeSettings
    videos: int = 0
    reused: int = 0
    written: int = 0
    problems: list[Probe] = field(default_factory=list)
    annotations: dict[str, Path] = field(default_factory=dict)
    label_map: Path | None = None
    seconds: float = 0.0

    @property
    def bad_by_kind(self) -> dict[str, int]:
        """Distinct bad files per kind."""
        kinds = {p.path: p.status for p in self.problems}
        return dict(Counter(kinds.values()))

    def overrides(self) -> list[str]:
        """The ``--set`` values a config needs to read the prepared copy."""
        values = [
            f"data.root={self.out_dir}",
            f"data.train_annotations={self.annotations['train']}",
            f"data.val_annotations={self.annotations['val']}",
            f"data.label_map={self.label_map}",
        ]
        if self.format != "evl_list":
            values.append(f"data.video_extension={PREPARED_EXTENSION}")
        return values

    def write_csv(self, path: Path) -> None:
        """One row per bad video: split, video_id, label, path, status, detail."""
        order = {kind: i for i, kind in enumerate(BAD_KINDS)}
        rows = sorted(self.problems, key=lambda p: (order[p.status], p.split, p.path))
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["split", "video_id", "label", "path", "status", "detail"])
            for p in rows:
                writer.writerow([p.split, p.video_id, p.label, p.path, p.status, p.detail])


def prepare_dataset(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    settings: EncodeSettings,
    *,
    progress: bool = True,
    videos_per_task: int | None = None,
) -> PrepareReport:
    """Re-encodes every video of both splits of ``cfg`` into ``out_dir`` (needs Ray running).

    Args:
        cfg: the experiment whose ``data`` section names the input.
        out_dir: the prepared root (created if needed).
        settings: the encoding (:func:`encode_settings`).
        progress: show a progress bar with an ETA on stderr.
        videos_per_task: videos per Ray task (default: enough tasks to keep every CPU busy,
            at most :data:`MAX_CHUNK`).

    Returns:
        What was reused, written and found bad, and the annotation files written.

    Raises:
        RuntimeError: Ray is not initialised.
        DataSourceError: ``out_dir`` holds videos prepared with other settings, or two videos
            would be prepared into the same file.
    """
    if not ray.is_initialized():
        raise RuntimeError("prepare_dataset needs a running Ray instance: call ray.init() first")
    began = time.perf_counter()
    out = Path(out_dir).absolute()
    files = resolve_files(cfg.data, progress=progress)
    splits = read_splits(cfg.data, files=files)
    jobs = _jobs(files.format, splits, out)
    _claim(out, settings)
    report = PrepareReport(out, files.format, settings, videos=len(jobs))
    todo = {rel: src for rel, src in jobs.items() if not (out / rel).exists()}
    report.reused = len(jobs) - len(todo)
    if progress:
        print(f"preparing {len(todo)} of {len(jobs)} videos into {out}", file=sys.stderr)
    results = _run_tasks(out, todo, settings, progress, videos_per_task)
    report.written = sum(r["status"] == "ok" for r in results.values())
    _finish(report, splits, results)
    report.write_csv(out / PROBLEMS_CSV)
    report.seconds = time.perf_counter() - began
    return report


def _jobs(format: str, splits: dict[str, Annotations], out: Path) -> dict[str, str]:
    """Prepared name -> input path of every distinct video of both splits."""
    jobs: dict[str, str] = {}
    for split_records in splits.values():
        for record in split_records.records:
            rel = prepared_name(format, record.video_id)
            source = jobs.setdefault(rel, str(record.path))
            if source != str(record.path):
                raise DataSourceError(
                    f"{split_records.source}: {source} and {record.path} would both be prepared "
                    f"as {out / rel}"
                )
    return jobs


def _claim(out: Path, settings: EncodeSettings) -> None:
    """Creates ``out`` with its manifest, or checks an existing one has the same encoding, and
    deletes temporary files a killed run left behind."""
    out.mkdir(parents=True, exist_ok=True)
    wanted = {key: settings.to_dict()[key] for key in _SETTINGS_KEYS}
    manifest = out / MANIFEST
    if manifest.exists():
        found = json.loads(manifest.read_text())
        if found != wanted:
            raise DataSourceError(
                f"{out} holds videos prepared with {found}, not {wanted}: "
                "use another --out or the same settings"
            )
    else:
        manifest.write_text(json.dumps(wanted, indent=2) + "\n")
    for directory, _, names in os.walk(out):
        for name in names:
            if TMP_MARKER in name:
                os.unlink(os.path.join(directory, name))


def _run_tasks(
    out: Path,
    todo: dict[str, str],
    settings: EncodeSettings,
    progress: bool,
    videos_per_task: int | None,
) -> dict[str, dict[str, Any]]:
    """Encodes ``todo`` (name -> input) with Ray tasks; returns name -> result."""
    slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
    size = videos_per_task or max(1, min(MAX_CHUNK, math.ceil(len(todo) / (4 * slots))))
    pairs = [(rel, src) for rel, src in todo.items()]
    queue = deque(pairs[start : start + size] for start in range(0, len(pairs), size))
    plain = settings.to_dict()
    running: dict[Any, list[tuple[str, str]]] = {}
    results: dict[str, dict[str, Any]] = {}
    bar = tqdm(
        total=len(pairs), desc="prepare", unit="video", file=sys.stderr, disable=not progress
    )
    try:
        while queue or running:
            while queue and len(running) < 2 * slots:
                chunk = queue.popleft()
                jobs = [(src, str(out / rel)) for rel, src in chunk]
                running[_prepare_chunk.remote(jobs, plain)] = chunk
            [done], _ = ray.wait(list(running), num_returns=1)
            chunk = running.pop(done)
            try:
                chunk_results = ray.get(done)
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as err:
                # the decoder crashed or ran out of memory on some input (Ray retried the task
                # first): find which one by retrying the videos one per task
                if len(chunk) > 1:
                    queue.extend([pair] for pair in chunk)
                    continue
                chunk_results = [_crashed(out / chunk[0][0], chunk[0][1], err)]
            for (rel, _), result in zip(chunk, chunk_results, strict=True):
                results[rel] = result
            bar.update(len(chunk))
    except BaseException:
        for ref in running:
            ray.cancel(ref)
        raise
    finally:
        bar.close()
    return results


def _crashed(output: Path, source: str, err: Exception) -> dict[str, Any]:
    """The result of a video whose own task failed: ``unreadable``."""
    detail = f"its encoding task failed: {type(err).__name__}: {str(err).splitlines()[0]}"
    bad = VideoError(source, "unreadable", detail)
    return asdict(EncodeResult(source, str(output), bad.kind, bad.detail))


@ray.remote(num_cpus=1)
def _prepare_chunk(jobs: list[tuple[str, str]], settings: dict[str, Any]) -> list[dict]:
    """Encodes (input, output) pairs in one task; plain-dict results."""
    encode = EncodeSettings(**settings)
    results = []
    for source, output in jobs:
        os.makedirs(os.path.dirname(output), exist_ok=True)
        results.append(asdict(encode_video(source, output, encode)))
    return results


def _finish(
    report: PrepareReport, splits: dict[str, Annotations], results: dict[str, dict[str, Any]]
) -> None:
    """Lists the bad videos of each split and writes the annotation files of the good ones."""
    for split, split_records in splits.items():
        keep = set()
        for record in split_records.records:
            rel = prepared_name(report.format, record.video_id)
            result = results.get(rel, {"status": "ok", "detail": ""})
            if result["status"] == "ok":
                keep.add(record.video_id)
                continue
            label = split_records.class_names[record.label]
            probe = Probe(split, record.video_id, label, str(record.path))
            probe.status, probe.detail = result["status"], result["detail"]
            report.problems.append(probe)
        report.annotations[split] = write_split(
            report.format, split, split_records, keep, report.out_dir
        )
    report.label_map = write_label_map(splits["train"].class_names, report.out_dir)


def render_report(report: PrepareReport) -> str:
    """The summary ``data prepare`` prints: counts, bad files, and the ``--set`` lines."""
    s = report.settings
    bad = report.bad_by_kind
    lines = [
        f"data prepare: {report.videos} videos -> {report.out_dir} ({report.seconds:.1f} s)",
        f"  encoding    H.264 mp4, short side {s.short_side}, keyframe every "
        f"{s.keyframe_interval} frames, crf {s.crf}, preset {s.preset}",
        f"  written {report.written}, already prepared {report.reused}, bad {sum(bad.values())}"
        + (" (" + ", ".join(f"{k} {n}" for k, n in sorted(bad.items())) + ")" if bad else ""),
        f"  problem list: {report.out_dir / PROBLEMS_CSV}",
        "  read the prepared copy with:",
        "    " + " ".join(f"--set {shlex.quote(value)}" for value in report.overrides()),
    ]
    return "\n".join(lines)

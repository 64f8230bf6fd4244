"""``evl-platform data check``: find unusable videos before a run meets them.

Every listed video is decoded from the first to the last frame with the configured decoder
(or, with ``quick``, only its container header is read), in worker processes, each video under
``data.decode_timeout_s``. The result counts problems per split by kind, summarises frame
counts, resolutions, frame rates and classes, and lists every problem file.
"""

from __future__ import annotations

import concurrent.futures
import csv
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from evl_platform.config import ExperimentConfig
from evl_platform.data.annotations import Annotations
from evl_platform.data.decode import (
    BAD_KINDS,
    VideoError,
    call_with_timeout,
    check_file,
    open_video,
)
from evl_platform.data.source import read_splits

MISMATCH = "frame_count_mismatch"
"""A warning, not a problem: the header claims more frames than decode (decoding still works)."""

_CHUNK = 32


@dataclass
class Probe:
    """What ``data check`` learnt about one video."""

    split: str
    video_id: str
    label: str
    path: str
    status: str = "ok"  # "ok", a kind in BAD_KINDS, or MISMATCH
    detail: str = ""
    frames: int = 0
    header_frames: int = 0
    width: int = 0
    height: int = 0
    fps: float = 0.0


def read_header(path: str) -> tuple[int, int, int, float]:
    """(frames, width, height, fps) from the container header, without decoding."""
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        frames = stream.frames
        if not frames and stream.duration and stream.time_base:
            frames = round(float(stream.duration * stream.time_base) * fps)
        return int(frames), stream.codec_context.width, stream.codec_context.height, fps


def probe_video(probe: Probe, *, quick: bool, decoder: str, min_frames: int) -> Probe:
    """Fills ``probe`` for its file; a bad file sets ``status`` instead of raising."""
    try:
        if quick:
            _probe_header(probe)
        else:
            _probe_decode(probe, decoder)
    except VideoError as err:
        probe.status, probe.detail = err.kind, err.detail
        return probe
    if probe.frames < min_frames:
        probe.status = "too_short"
        probe.detail = f"{probe.frames} frames, at least {min_frames} needed"
    elif probe.header_frames > probe.frames:
        probe.status = MISMATCH
        probe.detail = f"header says {probe.header_frames} frames, {probe.frames} decode"
    return probe


def _probe_header(probe: Probe) -> None:
    path = Path(probe.path)
    check_file(path)
    try:
        probe.frames, probe.width, probe.height, probe.fps = read_header(probe.path)
    except Exception as err:
        raise VideoError(path, "unreadable", f"{type(err).__name__}: {err}") from None
    probe.header_frames = probe.frames


def _probe_decode(probe: Probe, decoder: str) -> None:
    with open_video(probe.path, decoder) as reader:
        probe.frames, probe.fps = reader.num_frames, reader.fps
        for start in range(0, reader.num_frames, _CHUNK):
            try:
                frames = reader.get_frames(range(start, min(start + _CHUNK, reader.num_frames)))
            except Exception as err:
                detail = f"frame {start}+ of {reader.num_frames}: {type(err).__name__}: {err}"
                raise VideoError(probe.path, "unreadable", detail) from None
            probe.height, probe.width = frames.shape[1:3]
    try:
        probe.header_frames = read_header(probe.path)[0]
    except Exception:  # the decoder read it; a header PyAV cannot parse is not a problem
        probe.header_frames = 0


def _probe_task(task: tuple[Probe, bool, str, int, float]) -> Probe:
    probe, quick, decoder, min_frames, timeout_s = task
    try:
        return call_with_timeout(
            lambda: probe_video(probe, quick=quick, decoder=decoder, min_frames=min_frames),
            timeout_s,
        )
    except TimeoutError:
        probe.status, probe.detail = "timeout", f"checking took longer than {timeout_s:g} s"
        return probe


def _probes(splits: dict[str, Annotations]) -> Iterator[Probe]:
    for split, split_annotations in splits.items():
        for record in split_annotations.records:
            label = split_annotations.class_names[record.label]
            yield Probe(split, record.video_id, label, str(record.path))


def run_probes(
    probes: Iterable[Probe],
    *,
    quick: bool,
    decoder: str,
    min_frames: int,
    timeout_s: float,
    workers: int,
    progress: bool = True,
    total: int | None = None,
) -> list[Probe]:
    """Probes every video, ``workers`` processes at a time, with a progress bar."""
    tasks = [(p, quick, decoder, min_frames, timeout_s) for p in probes]
    bar = tqdm(total=total or len(tasks), desc="data check", unit="video", disable=not progress)
    with bar:
        if workers <= 1:
            results = []
            for task in tasks:
                results.append(_probe_task(task))
                bar.update()
            return results
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            results = []
            for probe in pool.map(_probe_task, tasks, chunksize=4):
                results.append(probe)
                bar.update()
            return results


@dataclass
class CheckReport:
    """Outcome of ``data check`` for one experiment."""

    experiment: str
    dataset: str
    mode: str
    max_bad_fraction: float
    probes: list[Probe]
    class_names: tuple[str, ...]
    csv_path: str = ""
    splits: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in dict.fromkeys(p.split for p in self.probes):
            probes = [p for p in self.probes if p.split == split]
            kinds = Counter(p.status for p in probes if p.status in BAD_KINDS)
            self.splits[split] = {
                "videos": len(probes),
                "problems": sum(kinds.values()),
                "problem_fraction": sum(kinds.values()) / len(probes),
                **{kind: kinds.get(kind, 0) for kind in BAD_KINDS},
                MISMATCH: sum(p.status == MISMATCH for p in probes),
                "classes": dict(sorted(Counter(p.label for p in probes).items())),
            }

    @property
    def failed(self) -> bool:
        """Whether some split has more problems than ``data.max_bad_fraction`` allows."""
        return any(s["problem_fraction"] > self.max_bad_fraction for s in self.splits.values())

    def problems(self) -> list[Probe]:
        """Problem and warning rows, worst kinds first."""
        order = {kind: i for i, kind in enumerate((*BAD_KINDS, MISMATCH))}
        rows = [p for p in self.probes if p.status != "ok"]
        return sorted(rows, key=lambda p: (order[p.status], p.split, p.path))

    def write_csv(self, path: str | Path) -> None:
        """One row per problem or warning: split, video_id, label, path, status, detail."""
        self.csv_path = str(path)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["split", "video_id", "label", "path", "status", "detail"])
            for p in self.problems():
                writer.writerow([p.split, p.video_id, p.label, p.path, p.status, p.detail])

    def summary(self) -> dict:
        """Counts, spreads and classes as one JSON-serialisable dict."""
        good = [p for p in self.probes if p.status in ("ok", MISMATCH)]
        return {
            "experiment": self.experiment,
            "dataset": self.dataset,
            "mode": self.mode,
            "max_bad_fraction": self.max_bad_fraction,
            "failed": self.failed,
            "splits": self.splits,
            "frames": _spread([p.frames for p in good]),
            "fps": _spread([round(p.fps, 3) for p in good]),
            "resolutions": {
                f"{w}x{h}": n
                for (w, h), n in Counter((p.width, p.height) for p in good).most_common()
            },
            "problems_csv": self.csv_path,
            "problems": [asdict(p) for p in self.problems()[:20]],
        }


def _spread(values: list[float]) -> dict:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def check_data(
    cfg: ExperimentConfig, *, workers: int, quick: bool = False, progress: bool = True
) -> CheckReport:
    """Probes every video of both splits of ``cfg``'s dataset."""
    splits = read_splits(cfg.data, progress=progress)
    probes = run_probes(
        _probes(splits),
        quick=quick,
        decoder=cfg.data.decoder,
        min_frames=cfg.data.min_frames or cfg.data.num_frames,
        timeout_s=cfg.data.decode_timeout_s,
        workers=workers,
        progress=progress,
        total=sum(len(a.records) for a in splits.values()),
    )
    return CheckReport(
        experiment=cfg.name,
        dataset=cfg.data.dataset,
        mode="header" if quick else f"decode ({cfg.data.decoder})",
        max_bad_fraction=cfg.data.max_bad_fraction,
        probes=probes,
        class_names=splits["train"].class_names,
    )


def render_report(report: CheckReport) -> str:
    """The human-readable summary printed by ``data check``."""
    summary = report.summary()
    lines = [f"data check: {report.experiment} ({report.dataset}, {report.mode})"]
    for split, s in report.splits.items():
        kinds = "  ".join(f"{kind} {s[kind]}" for kind in BAD_KINDS)
        verdict = "too many" if s["problem_fraction"] > report.max_bad_fraction else "ok"
        lines.append(
            f"  {split:<5} {s['videos']:>7} videos  problems {s['problems']} "
            f"({s['problem_fraction']:.2%}, {verdict})  {kinds}  warnings: {MISMATCH} {s[MISMATCH]}"
        )
        counts = list(s["classes"].values())
        missing = [c for c in report.class_names if c not in s["classes"]]
        lines.append(
            f"        classes {len(counts)} of {len(report.class_names)}, "
            f"{min(counts)}-{max(counts)} videos per class"
            + (
                f"; none for: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
                if missing
                else ""
            )
        )
    frames, fps = summary["frames"], summary["fps"]
    if frames["min"] is not None:
        lines.append(
            f"  frames      min {frames['min']}  median {frames['median']:g}  max {frames['max']}"
        )
        lines.append(
            f"  fps         min {fps['min']:g}  median {fps['median']:g}  max {fps['max']:g}"
        )
        top = list(summary["resolutions"].items())
        shown = ", ".join(f"{res} ({n})" for res, n in top[:5])
        lines.append(
            f"  resolution  {shown}" + (f" and {len(top) - 5} more" if len(top) > 5 else "")
        )
    limit = f"data.max_bad_fraction {report.max_bad_fraction:.2%}"
    lines.append(f"  result      {'FAILED' if report.failed else 'passed'} ({limit})")
    if report.csv_path:
        lines.append(f"  problem list: {report.csv_path}")
    return "\n".join(lines)

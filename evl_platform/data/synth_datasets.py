"""The two synthetic stand-ins: what to render for each clip and how to annotate it.

Each :class:`SyntheticDataset` plans its clips (ids, labels, splits, seeds), renders one clip
from its generator (pixels live in :mod:`evl_platform.data.synth_render`), and writes the
annotation files in the format of the dataset it stands in for.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evl_platform.data import synth_render as render
from evl_platform.registry import Registry

if TYPE_CHECKING:
    from evl_platform.data.synth import SynthParams


@dataclass(frozen=True)
class ClipEntry:
    """One video and its annotation fields.

    Attributes:
        video_id: SSv2 id, or Kinetics ``youtube_id``.
        file_name: file name under ``videos/``.
        label: class index.
        split: 0 for train, 1 for validation.
        span: Kinetics ``(time_start, time_end)``.
    """

    video_id: str
    file_name: str
    label: int
    split: int
    span: tuple[int, int] = (0, 10)


@dataclass(frozen=True)
class ClipJob:
    """One rendering: ``entry`` gets the frames, ``twin`` (if any) the same frames reversed.

    Attributes:
        seed: seeds the clip's generator.
        entry / twin: the video(s) written.
        index: the clip's number among the clips of its class in its split.
    """

    seed: tuple[int, ...]
    entry: ClipEntry
    twin: ClipEntry | None = None
    index: int = 0

    @property
    def entries(self) -> tuple[ClipEntry, ...]:
        """The videos this job writes."""
        return (self.entry,) if self.twin is None else (self.entry, self.twin)


Rendered = tuple[np.ndarray, Sequence[str]]  # frames (T, H, W, 3) uint8, placeholders


@dataclass(frozen=True)
class SyntheticDataset:
    """How one stand-in is planned, rendered and annotated.

    Attributes:
        format: annotation format, a config ``AnnotationFormat`` literal.
        class_names: class names in index order.
        train_file / val_file / label_map_file: annotation file names in the dataset directory.
        plan: parameters -> every rendering job, in annotation order.
        render: (job, the job's generator, parameters) -> (frames, placeholders); the frames
            are those of the job's first clip.
        write_annotations: (directory, class names, [(job, placeholders)]) -> None.
    """

    format: str
    class_names: tuple[str, ...]
    train_file: str
    val_file: str
    label_map_file: str | None
    plan: Callable[[SynthParams], list[ClipJob]]
    render: Callable[[ClipJob, np.random.Generator, SynthParams], Rendered]
    write_annotations: Callable[[Path, tuple[str, ...], list[tuple[ClipJob, Sequence[str]]]], None]


SYNTHETIC_DATASETS: Registry[SyntheticDataset] = Registry("synthetic dataset")


def write_atomic(path: Path, text: str) -> None:
    """Writes ``path`` atomically (temporary file in the same directory, then rename)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8", newline="")
    os.replace(partial, path)


def _write_json(path: Path, data: dict[str, str] | list[dict[str, Any]]) -> None:
    """Writes a JSON object or list with one item per line."""
    if isinstance(data, dict):
        items, brackets = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in data.items()], "{}"
    else:
        items, brackets = [json.dumps(item) for item in data], "[]"
    body = ",\n".join(f" {item}" for item in items)
    write_atomic(path, f"{brackets[0]}\n{body}\n{brackets[1]}\n" if items else brackets + "\n")


# --- synthetic-motion: Something-Something-v2 JSON ---------------------------------------------

# (motion rendered, SSv2 template of that class, template of its time reversal)
_MOTION_PAIRS = (
    (
        "horizontal",
        "Moving [something] from left to right",
        "Moving [something] from right to left",
    ),
    ("vertical", "Moving [something] up", "Moving [something] down"),
    (
        "scale",
        "Approaching [something] with your camera",
        "Moving away from [something] with your camera",
    ),
    ("rotation", "Rotating [something] clockwise", "Rotating [something] anticlockwise"),
    (
        "two_objects",
        "Moving [something] and [something] closer to each other",
        "Moving [something] and [something] away from each other",
    ),
)
MOTION_TEMPLATES: tuple[str, ...] = tuple(t for _, a, b in _MOTION_PAIRS for t in (a, b))


def _fill(template: str, placeholders: Sequence[str]) -> str:
    """SSv2 ``label``: the template with its placeholders filled in, lower-case first letter."""
    parts = template.split("[something]")
    text = parts[0] + "".join(p + rest for p, rest in zip(placeholders, parts[1:], strict=True))
    return text[0].lower() + text[1:]


def _plan_motion(params: SynthParams) -> list[ClipJob]:
    """One job per pair clip; the pair's two videos get consecutive ids."""
    jobs, next_id = [], 1
    for split, count in enumerate((params.clips_per_class, params.val_clips_per_class)):
        for pair in range(len(_MOTION_PAIRS)):
            for index in range(count):
                first, second = (
                    ClipEntry(str(i), f"{i}{params.extension}", 2 * pair + k, split)
                    for k, i in enumerate((next_id, next_id + 1))
                )
                seed = (params.seed, 2 * pair, split, index)
                jobs.append(ClipJob(seed, first, second, index))
                next_id += 2
    return jobs


def _render_motion(job: ClipJob, rng: np.random.Generator, params: SynthParams) -> Rendered:
    """Every other clip of a translation class is fast, so each split holds half of each."""
    kind = _MOTION_PAIRS[job.entry.label // 2][0]
    size = (params.num_frames, params.height, params.width)
    return render.motion_clip(kind, rng, *size, fast=job.index % 2 == 1)


def _write_ssv2(
    directory: Path, class_names: tuple[str, ...], results: list[tuple[ClipJob, Sequence[str]]]
) -> None:
    splits: tuple[list[dict[str, Any]], ...] = ([], [])
    for job, placeholders in results:
        for entry in job.entries:
            template = MOTION_TEMPLATES[entry.label]
            splits[entry.split].append(
                {
                    "id": entry.video_id,
                    "label": _fill(template, placeholders),
                    "template": template,
                    "placeholders": list(placeholders),
                }
            )
    _write_json(directory / "labels.json", {name: str(i) for i, name in enumerate(class_names)})
    _write_json(directory / "train.json", splits[0])
    _write_json(directory / "validation.json", splits[1])


SYNTHETIC_DATASETS.add(
    "synthetic-motion",
    SyntheticDataset(
        format="ssv2_json",
        class_names=tuple(t.replace("[", "").replace("]", "") for t in MOTION_TEMPLATES),
        train_file="train.json",
        val_file="validation.json",
        label_map_file="labels.json",
        plan=_plan_motion,
        render=_render_motion,
        write_annotations=_write_ssv2,
    ),
)


# --- synthetic-appearance: Kinetics-400 CSV ----------------------------------------------------

_KINETICS_SPLITS = ("train", "validate")


def _kinetics_id(seed: int, label: int, split: int, index: int) -> tuple[str, int]:
    """A deterministic 11-character ``youtube_id`` and a ``time_start`` for one clip."""
    digest = hashlib.sha256(
        f"synthetic-appearance/{seed}/{label}/{split}/{index}".encode()
    ).digest()
    return base64.urlsafe_b64encode(digest).decode()[:11], int.from_bytes(digest[-2:]) % 300


def _plan_appearance(params: SynthParams) -> list[ClipJob]:
    jobs = []
    for split, count in enumerate((params.clips_per_class, params.val_clips_per_class)):
        for label in range(len(render.APPEARANCE_CLASSES)):
            for index in range(count):
                youtube_id, start = _kinetics_id(params.seed, label, split, index)
                name = f"{youtube_id}_{start:06d}_{start + 10:06d}{params.extension}"
                entry = ClipEntry(youtube_id, name, label, split, (start, start + 10))
                jobs.append(ClipJob((params.seed, label, split, index), entry, index=index))
    return jobs


def _render_appearance(job: ClipJob, rng: np.random.Generator, params: SynthParams) -> Rendered:
    size = (params.num_frames, params.height, params.width)
    frames = render.appearance_clip(job.entry.label, rng, *size)
    return frames, ()


def _write_kinetics(
    directory: Path, class_names: tuple[str, ...], results: list[tuple[ClipJob, Sequence[str]]]
) -> None:
    for split, file_name in enumerate(("train.csv", "validate.csv")):
        path = directory / file_name
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
            for job, _ in results:
                e = job.entry
                if e.split == split:
                    row = [class_names[e.label], e.video_id, *e.span, _KINETICS_SPLITS[split]]
                    writer.writerow(row)


SYNTHETIC_DATASETS.add(
    "synthetic-appearance",
    SyntheticDataset(
        format="kinetics_csv",
        class_names=tuple(c.name for c in render.APPEARANCE_CLASSES),
        train_file="train.csv",
        val_file="validate.csv",
        label_map_file=None,
        plan=_plan_appearance,
        render=_render_appearance,
        write_annotations=_write_kinetics,
    ),
)

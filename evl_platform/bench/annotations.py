"""``evl-platform bench annotations``: what a Kinetics-size annotation file costs at start.

Writes (once, into ``--dir``) a Kinetics-400 CSV and a Something-Something-v2 JSON of the
paper's sizes whose entries name placeholder files (hard links to a few empty files, in
class folders for Kinetics and flat for SSv2: no decoding is involved), plus one experiment
file per dataset (the paper profile pointed at them) and an ablation of two variants over
both. Then it times, each in a fresh process so that nothing is remembered between them:

- reading the training split (``read_annotations``) and the memory the process holds for it;
- the start of a trial: both splits read and their dataset identity (the feature cache's key
  input), first with nothing cached and then as every later trial and worker sees it;
- a loader worker: one forked ``DataLoader`` worker touches every record of the training set
  (its path, label and id) and reports how much of its memory became private (copied from
  the parent) while doing so;
- ``evl-platform sweep ABLATION --dry-run`` on the generated ablation.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
KINETICS_ENTRIES = 240_000
SSV2_ENTRIES = 220_000
TARGET_START_S = 10.0
TARGET_WORKER_MIB = 100.0
LINKS_PER_FILE = 50_000  # below ext4's 65,000 links per inode


@dataclass
class DatasetFigures:
    """The figures of one generated dataset (seconds and MiB)."""

    dataset: str
    entries: int
    read_s: float = 0.0
    held_mib: float = 0.0
    trial_start_first_s: float = 0.0
    trial_start_s: float = 0.0
    identity_first_s: float = 0.0
    identity_s: float = 0.0
    worker_private_mib: float = 0.0


@dataclass
class AnnotationsBench:
    """Results of one ``bench annotations`` run."""

    datasets: list[DatasetFigures] = field(default_factory=list)
    dry_run_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        """One line per dataset and the dry run, against the issue's targets."""
        lines = []
        for d in self.datasets:
            lines.append(
                f"{d.dataset} ({d.entries} train entries): read {d.read_s:.2f} s holding "
                f"{d.held_mib:.0f} MiB; trial start {d.trial_start_first_s:.2f} s first, "
                f"{d.trial_start_s:.2f} s after (identity {d.identity_first_s:.2f} s / "
                f"{d.identity_s:.2f} s; target <= {TARGET_START_S:g} s); loader worker "
                f"+{d.worker_private_mib:.1f} MiB private after touching every record "
                f"(target <= {TARGET_WORKER_MIB:g} MiB)"
            )
        lines.append(f"sweep --dry-run: {self.dry_run_s:.2f} s")
        return "\n".join(lines)


def _placeholders(root: Path, names: list[str]) -> None:
    """Hard links to a few empty files at every ``root/name`` (folders created)."""
    for folder in {os.path.dirname(name) for name in ["", *names]}:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        blank = root / f".placeholder{i // LINKS_PER_FILE}"
        if i % LINKS_PER_FILE == 0:
            blank.touch()
        os.link(blank, root / name)


def write_kinetics(out: Path, train: int, val: int, *, classes: int = 400) -> Path:
    """A Kinetics-400-like CSV pair under ``out`` (videos in class folders), and the
    experiment file reading it."""
    labels = [f"class {c:03d} (doing things)" for c in range(classes)]
    rows = {"train": [], "val": []}
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            rows[split].append((labels[i % classes], f"{split[0]}{i:010d}", 10 * (i % 9)))
        lines = ["label,youtube_id,time_start,time_end,split"] + [
            f'"{label}",{vid},{start},{start + 10},{split}' for label, vid, start in rows[split]
        ]
        (out / f"{split}.csv").write_text("\n".join(lines) + "\n")
    names = [
        f"{label}/{vid}_{start:06d}_{start + 10:06d}.mp4"
        for split in rows
        for label, vid, start in rows[split]
    ]
    _placeholders(out / "videos", names)
    return _experiment(out, "k400_vitb16_8f.yaml", {"train_annotations": "train.csv"})


def write_ssv2(out: Path, train: int, val: int, *, classes: int = 174) -> Path:
    """A Something-Something-v2-like JSON pair and ``labels.json`` under ``out`` (videos
    flat), and the experiment file reading it."""
    templates = [f"Moving [something] in direction {c}" for c in range(classes)]
    plain = {t.replace("[", "").replace("]", ""): str(i) for i, t in enumerate(templates)}
    (out / "labels.json").write_text(json.dumps(plain))
    ids = []
    for split, count, first in (("train", train, 1), ("val", val, train + 1)):
        entries = [
            {"id": str(first + i), "label": "x", "template": templates[i % classes]}
            for i in range(count)
        ]
        ids += [e["id"] for e in entries]
        (out / f"{split}.json").write_text(json.dumps(entries))
    _placeholders(out / "videos", [f"{vid}.webm" for vid in ids])
    extra = {"train_annotations": "train.json", "label_map": "labels.json"}
    return _experiment(out, "ssv2_vitb16_8f.yaml", extra)


def _experiment(out: Path, base: str, data: dict[str, str]) -> Path:
    """An experiment file: the repository's ``base`` (paper profile) reading ``out``."""
    val = data["train_annotations"].replace("train", "val")
    lines = [
        f"base: [{REPO_EXPERIMENTS / base}]",
        "profile: paper",
        "data:",
        "  root: videos",
        f"  val_annotations: {val}",
        "  augment: {random_resized_crop: null, rand_augment: null, horizontal_flip: false}",
        *(f"  {key}: {value}" for key, value in data.items()),
        "features: {reuse: true, cache_dir: cache}",
    ]
    path = out / "experiment.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_ablation(out: Path, experiments: dict[str, Path]) -> Path:
    """An ablation of two variants (T-Conv off/on) over the generated experiments."""
    spec = {
        "name": "annotations_bench",
        "table": {"paper": "8a", "title": "bench", "metric": "val/acc1"},
        "experiments": {name: str(path) for name, path in experiments.items()},
        "variants": {
            "off": {"set": {"model.decoder.temporal_conv": False}},
            "on": {"set": {"model.decoder.temporal_conv": True}},
        },
        "seeds": 1,
    }
    path = out / "ablation.yaml"
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return path


def _private_mib() -> float:
    """This process's private memory (``Private_Clean + Private_Dirty``), MiB."""
    total = 0
    with open("/proc/self/smaps_rollup") as handle:
        for line in handle:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024


def _rss_mib() -> float:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _read_train(experiment: str) -> dict[str, float]:
    """Seconds to read the training split, and the RSS held for it."""
    from evl_platform.config import load_config
    from evl_platform.data.source import read_split, resolve_files

    files = resolve_files(load_config(experiment).data, progress=False)
    before, began = _rss_mib(), time.perf_counter()
    annotations = read_split(files, "train")
    seconds = time.perf_counter() - began
    return {"read_s": seconds, "held_mib": _rss_mib() - before, "n": len(annotations)}


def _trial_start(experiment: str) -> dict[str, float]:
    """A trial's annotation work: both splits read, each split's dataset identity."""
    from evl_platform.config import load_config
    from evl_platform.data.source import read_splits, resolve_files
    from evl_platform.features.key import split_inputs

    cfg = load_config(experiment)
    began = time.perf_counter()
    files = resolve_files(cfg.data, progress=False)
    splits = read_splits(cfg.data, files=files)
    identity_began = time.perf_counter()
    for split, listed in splits.items():
        split_inputs(cfg, split, listed, files)
    done = time.perf_counter()
    return {"start_s": done - began, "identity_s": done - identity_began}


class _Toucher:
    """A dataset of one item: the worker's private memory growth while it touches every
    record of ``dataset`` (path, label, id)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> float:
        before = _private_mib()
        records = self.dataset.records
        for i in range(len(records)):
            record = records[i]
            str(record.path), record.label, record.video_id  # noqa: B018
        return _private_mib() - before


def _worker_private(experiment: str) -> dict[str, float]:
    """Private MiB a forked loader worker gains by touching every training record."""
    from torch.utils.data import DataLoader

    from evl_platform.config import load_config
    from evl_platform.data.source import create_dataset, read_splits

    cfg = load_config(experiment)
    dataset = create_dataset(cfg, read_splits(cfg.data, progress=False)["train"], train=True)
    loader = DataLoader(
        _Toucher(dataset),
        batch_size=None,
        num_workers=1,
        multiprocessing_context=multiprocessing.get_context("fork"),
    )
    return {"private_mib": float(next(iter(loader)))}


def _run_and_send(connection: Any, cache: str, function: Any, args: tuple[Any, ...]) -> None:
    os.environ["EVL_PLATFORM_CACHE"] = cache
    connection.send(function(*args))


def _fresh(cache: Path, function: Any, *args: Any) -> dict[str, float]:
    """``function(*args)`` in a fresh (spawned) interpreter, that may fork workers itself, with
    ``cache`` as its platform cache."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_run_and_send, args=(send, str(cache), function, args))
    process.start()
    send.close()  # a child that dies then ends the wait below
    try:
        return receive.recv()
    except EOFError:
        raise RuntimeError(f"{function.__name__} failed (its traceback is above)") from None
    finally:
        process.join()


def _dry_run(ablation: Path) -> float:
    """Wall seconds of ``evl-platform sweep ABLATION --dry-run``."""
    command = [sys.executable, "-m", "evl_platform.cli", "sweep", str(ablation), "--dry-run"]
    began = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    return time.perf_counter() - began


def _measure(name: str, experiment: Path) -> DatasetFigures:
    cache = experiment.parent / "cache"  # the features and the dataset-identity sidecars
    read = _fresh(cache, _read_train, str(experiment))
    shutil.rmtree(cache, ignore_errors=True)
    first = _fresh(cache, _trial_start, str(experiment))
    later = _fresh(cache, _trial_start, str(experiment))
    worker = _fresh(cache, _worker_private, str(experiment))
    return DatasetFigures(
        dataset=name,
        entries=int(read["n"]),
        read_s=read["read_s"],
        held_mib=read["held_mib"],
        trial_start_first_s=first["start_s"],
        trial_start_s=later["start_s"],
        identity_first_s=first["identity_s"],
        identity_s=later["identity_s"],
        worker_private_mib=worker["private_mib"],
    )


def bench_annotations(
    out: Path, *, kinetics: int = KINETICS_ENTRIES, ssv2: int = SSV2_ENTRIES
) -> AnnotationsBench:
    """Generates the datasets under ``out`` (reused when their sizes match) and measures them.

    Args:
        out: working directory (a few MiB of annotations, one directory entry per video).
        kinetics / ssv2: training entries; validation gets a tenth.
    """
    experiments = {}
    for name, count, write in (("k400", kinetics, write_kinetics), ("ssv2", ssv2, write_ssv2)):
        folder = out / f"{name}-{count}"
        if not (folder / "experiment.yaml").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            write(folder, count, count // 10)
        experiments[name] = folder / "experiment.yaml"
    result = AnnotationsBench()
    for name, experiment in experiments.items():
        result.datasets.append(_measure(name, experiment))
    result.dry_run_s = _dry_run(write_ablation(out, experiments))
    return result


def add_parser(actions: argparse._SubParsersAction) -> None:
    """Adds ``bench annotations`` to the ``bench`` subcommands (``actions``)."""
    parser = actions.add_parser(
        "annotations",
        help="start-up cost of Kinetics-size annotation files (read, identity, fork, plan)",
        description=__doc__.split("\n\n", 1)[1].replace("``", "`"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dir", type=Path, required=True, help="working directory")
    for name, default in (("kinetics", KINETICS_ENTRIES), ("ssv2", SSV2_ENTRIES)):
        parser.add_argument(
            f"--{name}",
            type=int,
            default=default,
            metavar="N",
            help=f"training entries (default {default}; validation gets a tenth)",
        )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_bench_annotations)


def _bench_annotations(args: argparse.Namespace) -> int:
    result = bench_annotations(args.dir, kinetics=args.kinetics, ssv2=args.ssv2)
    print(json.dumps(result.to_dict()) if args.json else result.render())
    return 0


if __name__ == "__main__":  # the same figures from an older checkout: python <this file> DIR
    print(json.dumps(bench_annotations(Path(sys.argv[1])).to_dict(), indent=2))

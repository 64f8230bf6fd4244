"""Ray's run storage: a local directory or a bucket, and the run record in it.

A run lives under ``<storage>/<run name>/``: Ray Train's checkpoints plus ``evl_run.json``
(:class:`RunRecord`: MLflow run id, resolved config), which is what ``--resume`` continues. A
pack (one Ray Train run training several variants' decoders, each its own MLflow run) lives
under ``<storage>/<pack name>/`` with ``evl_pack.json`` (:class:`PackRecord`: one run record
per member).
Records are read and written through pyarrow filesystems, the ones Ray Train writes with, so a
run in a bucket resumes like a local one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evl_platform.config import ExperimentConfig

DEFAULT_STORAGE = "ray_results"
RUN_RECORD = "evl_run.json"
PACK_RECORD = "evl_pack.json"


def resolve_storage(path: str | None) -> str:
    """Absolute local directory or a URI (``s3://``, ``gs://``...) for Ray's run storage."""
    path = path or os.environ.get("EVL_PLATFORM_STORAGE") or DEFAULT_STORAGE
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def local_storage(storage: str) -> Path | None:
    """The directory of a local storage location; ``None`` for a bucket URI."""
    return None if "://" in storage else Path(storage)


def storage_files(storage: str) -> tuple[Any, str]:
    """The pyarrow filesystem and base path of a storage location: a local directory or a
    bucket URI (``s3://``, ``gs://``...), the same filesystems Ray Train writes with."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(storage)


@dataclass
class RunRecord:
    """``evl_run.json``: ties a Ray run directory to its MLflow run."""

    run_name: str
    run_id: str
    experiment: str
    mlflow_experiment: str
    config: str
    created: str

    def write(self, storage: str) -> None:
        files, base = storage_files(storage)
        files.create_dir(f"{base}/{self.run_name}", recursive=True)
        with files.open_output_stream(f"{base}/{self.run_name}/{RUN_RECORD}") as out:
            out.write(json.dumps(self.__dict__, indent=2).encode())

    @staticmethod
    def read(storage: str, run_name: str) -> RunRecord | None:
        """The record of ``run_name`` under ``storage``; ``None`` when it has none."""
        files, base = storage_files(storage)
        try:
            with files.open_input_stream(f"{base}/{run_name}/{RUN_RECORD}") as record:
                return RunRecord(**json.loads(record.read()))
        except FileNotFoundError:
            return None

    @staticmethod
    def read_all(storage: str) -> list[RunRecord]:
        """Every run record directly under ``storage``."""
        import pyarrow.fs

        files, base = storage_files(storage)
        listed = files.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
        records = [
            RunRecord.read(storage, i.base_name) for i in listed if i.type.name == "Directory"
        ]
        return [r for r in records if r is not None]


@dataclass
class PackRecord:
    """``evl_pack.json``: ties a pack's Ray run directory to its members' MLflow runs.

    Attributes:
        name: the pack's Ray run name (its directory under the storage).
        members: member key -> its run record (``run_name`` is the member's MLflow run name).
        created: ISO time the pack was first launched.
    """

    name: str
    members: dict[str, RunRecord]
    created: str

    def write(self, storage: str) -> None:
        files, base = storage_files(storage)
        files.create_dir(f"{base}/{self.name}", recursive=True)
        data = {
            "name": self.name,
            "created": self.created,
            "members": {k: r.__dict__ for k, r in self.members.items()},
        }
        with files.open_output_stream(f"{base}/{self.name}/{PACK_RECORD}") as out:
            out.write(json.dumps(data, indent=2).encode())

    @staticmethod
    def read(storage: str, name: str) -> PackRecord | None:
        """The record of pack ``name`` under ``storage``; ``None`` when it has none."""
        files, base = storage_files(storage)
        try:
            with files.open_input_stream(f"{base}/{name}/{PACK_RECORD}") as record:
                data = json.loads(record.read())
        except FileNotFoundError:
            return None
        members = {k: RunRecord(**r) for k, r in data["members"].items()}
        return PackRecord(data["name"], members, data["created"])


def shared_locations(cfg: ExperimentConfig, storage: str, tracking_uri: str) -> dict[str, str]:
    """Where every node of a cluster writes, named as the user sets each one."""
    locations = {"--storage-path": storage, "the MLflow store (--tracking-uri)": tracking_uri}
    if cfg.features.reuse:
        from evl_platform.features.store import features_root

        locations["the feature cache (features.cache_dir)"] = str(features_root(cfg))
    return locations

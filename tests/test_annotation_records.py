"""Annotation records in compact arrays: a sequence of ``VideoRecord`` to every reader, cheap to
pickle and shared (not copied) by forked loader workers."""

from __future__ import annotations

import gc
import multiprocessing
import pickle
from pathlib import Path

import numpy as np
import pytest

from evl_platform.data.annotations import Annotations, RecordTable, VideoRecord, read_annotations

MANY = 50_000


def _listing(tmp_path: Path, count: int) -> Path:
    """An EVL list of ``count`` videos (not written: nothing here opens them)."""
    path = tmp_path / "list.txt"
    lines = (f"class{i % 400}/video {i:07d}.mp4 {i % 400}" for i in range(count))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_records_read_like_a_tuple_of_video_records(tmp_path: Path) -> None:
    ann = read_annotations(_listing(tmp_path, 5), format="evl_list", root=tmp_path / "videos")
    records = ann.records
    expected = tuple(
        VideoRecord(
            f"class{i}/video {i:07d}", tmp_path / "videos" / f"class{i}/video {i:07d}.mp4", i
        )
        for i in range(5)
    )
    assert isinstance(records, RecordTable) and len(records) == len(ann) == 5
    assert records == expected and tuple(records) == expected
    assert records[-1] == expected[4] and type(records[0].label) is int
    assert list(records[1:4]) == list(expected[1:4]) and list(records[::-2]) == list(expected[::-2])
    assert records.labels.dtype == np.int32 and records.path(2) == str(expected[2].path)
    with pytest.raises(IndexError):
        records[5]
    # records given as a tuple (a prediction listing) are stored the same way
    listing = Annotations(Path("<predict>"), expected, ann.class_names)
    assert isinstance(listing.records, RecordTable) and listing.records == expected
    assert pickle.loads(pickle.dumps(ann)) == ann


def test_many_records_pickle_small(tmp_path: Path) -> None:
    ann = read_annotations(_listing(tmp_path, MANY), format="evl_list")
    blob = pickle.dumps(ann, protocol=pickle.HIGHEST_PROTOCOL)
    # ids and relative paths (~24 + 28 bytes), 2 offsets and a label: ~72 bytes a video
    assert len(blob) < 80 * MANY
    again = pickle.loads(blob)
    assert again.records[MANY - 1] == ann.records[MANY - 1]


def _private_kib() -> int:
    with open("/proc/self/smaps_rollup") as handle:
        return sum(
            int(line.split()[1])
            for line in handle
            if line.startswith(("Private_Clean:", "Private_Dirty:"))
        )


def _touch_all(ann: Annotations, send: multiprocessing.connection.Connection) -> None:
    # a full garbage collection would touch every object of this process (torch, Ray: none
    # of them the annotations') and copy its pages, whatever the records are held in
    gc.disable()
    before = _private_kib()
    for record in ann.records:
        str(record.path), record.label, record.video_id  # noqa: B018
    send.send(_private_kib() - before)


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")
def test_a_forked_worker_reading_every_record_copies_almost_nothing(tmp_path: Path) -> None:
    """A loader worker is forked from the process holding the annotations; reading a record
    must not write to the pages holding it (as reference counts of per-video objects do)."""
    ann = read_annotations(_listing(tmp_path, MANY), format="evl_list")
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    worker = context.Process(target=_touch_all, args=(ann, send))
    worker.start()
    copied_kib = receive.recv()
    worker.join()
    # per-video Python objects (a record, its id, a Path) copied 28 MiB here (measured)
    assert copied_kib < 8 * 1024, f"{copied_kib} KiB became private in the worker"

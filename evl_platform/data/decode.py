"""Video decoding behind one small interface: decord (default) and PyAV (fallback).

A reader turns frame indices into uint8 RGB frames. Readers are context managers and are closed
as soon as a clip is read (decord keeps file handles and buffers alive otherwise). Every failure
becomes a :class:`VideoError` whose ``kind`` says what was wrong with the file, and
:func:`read_clip` puts a wall-clock limit on the whole open-and-decode of one video.
"""

from __future__ import annotations

import abc
import concurrent.futures
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, TypeVar

import numpy as np

from evl_platform.config.schema import VideoDecoder
from evl_platform.registry import Registry

T = TypeVar("T")

BAD_KINDS = ("missing", "empty", "unreadable", "too_short", "timeout")
"""What can be wrong with a video, as reported by the loader and ``data check``."""


class VideoError(Exception):
    """A video that cannot be used.

    Args:
        path: the video file.
        kind: one of :data:`BAD_KINDS`.
        detail: what the decoder said, one line.
    """

    def __init__(self, path: str | Path, kind: str, detail: str) -> None:
        self.path = str(path)
        self.kind = kind
        self.detail = " ".join(str(detail).split())[:300]
        super().__init__(f"{self.path}: {kind}: {self.detail}")


class VideoReader(Protocol):
    """What every decoding backend provides."""

    num_frames: int
    fps: float

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        """Frames at ``indices`` (each in ``[0, num_frames)``) as (len, H, W, 3) uint8 RGB."""
        ...

    def close(self) -> None:
        """Releases the file and decoder buffers."""
        ...

    def __enter__(self) -> VideoReader: ...

    def __exit__(self, *exc: object) -> None: ...


DECODERS: Registry[Callable[[Path], VideoReader]] = Registry("video decoder")
"""Reader class of each ``data.decoder``; the names are ``VideoDecoder``'s (checked below)."""


class _Closing(abc.ABC):
    """Context-manager plumbing shared by the readers: leaving the block closes the reader."""

    def __enter__(self) -> _Closing:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @abc.abstractmethod
    def close(self) -> None:
        """Releases the file and decoder buffers."""


@DECODERS.register("decord")
class DecordReader(_Closing):
    """decord reader with one decoding thread (loader workers supply the parallelism).

    decord builds its frame index from the packets it reads, so ``num_frames`` counts frames
    that exist even when the container header claims more.
    """

    def __init__(self, path: Path) -> None:
        import decord

        self._reader = decord.VideoReader(str(path), num_threads=1)
        self.num_frames = len(self._reader)
        self.fps = float(self._reader.get_avg_fps())

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        return self._reader.get_batch(list(indices)).asnumpy()

    def close(self) -> None:
        self._reader = None


@DECODERS.register("pyav")
class PyAVReader(_Closing):
    """PyAV reader: decodes the stream once, in presentation order, like the official EVL code.

    ``num_frames`` is the number of frames actually decoded, never the header's claim. Frames
    stay in the decoder's pixel format until selected, so only the sampled ones are converted.
    """

    def __init__(self, path: Path) -> None:
        import av

        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else 0.0
            frames = {frame.pts: frame for frame in container.decode(stream)}
        self._frames = [frames[pts] for pts in sorted(frames, key=lambda p: (p is None, p or 0))]
        self.num_frames = len(self._frames)

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        return np.stack([self._frames[i].to_ndarray(format="rgb24") for i in indices])

    def close(self) -> None:
        self._frames = []


DECODERS.check_names(VideoDecoder, literal_name="VideoDecoder", module=__name__)


def check_file(path: Path) -> None:
    """Raises a ``missing``, ``empty`` or ``unreadable`` :class:`VideoError` before any decoding."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise VideoError(path, "missing", "file not found") from None
    except OSError as err:
        raise VideoError(path, "unreadable", err) from None
    if size == 0:
        raise VideoError(path, "empty", "file is 0 bytes")


def open_video(path: str | Path, decoder: str = "decord") -> VideoReader:
    """Opens ``path`` with the named backend; file problems become :class:`VideoError`."""
    path = Path(path)
    factory = DECODERS.get(decoder)
    check_file(path)
    try:
        reader = factory(path)
    except Exception as err:  # decoders raise RuntimeError, DECORDError, av.FFmpegError, ...
        raise VideoError(path, "unreadable", f"{type(err).__name__}: {err}") from None
    if reader.num_frames == 0:
        reader.close()
        raise VideoError(path, "unreadable", "no decodable frames")
    return reader


def decode_views(
    path: str | Path,
    choose: Callable[[int], Sequence[np.ndarray]],
    *,
    decoder: str = "decord",
    min_frames: int = 1,
) -> list[np.ndarray]:
    """Decodes the frames of one or more views of a video in one pass.

    Args:
        path: video file.
        choose: maps the video's frame count to one index array per view.
        decoder: backend name in :data:`DECODERS`.
        min_frames: fewer decodable frames than this is a ``too_short`` video.

    Returns:
        One (T, H, W, 3) uint8 array per view.
    """
    with open_video(path, decoder) as reader:
        if reader.num_frames < min_frames:
            raise VideoError(
                path, "too_short", f"{reader.num_frames} frames, at least {min_frames} needed"
            )
        views = [np.asarray(v, dtype=np.int64) for v in choose(reader.num_frames)]
        wanted = np.unique(np.concatenate(views))
        try:
            frames = reader.get_frames(wanted.tolist())
        except Exception as err:
            raise VideoError(path, "unreadable", f"{type(err).__name__}: {err}") from None
    position = {int(index): row for row, index in enumerate(wanted)}
    return [frames[[position[int(i)] for i in view]] for view in views]


class _DecodeThread:
    """One background thread per process that runs decodes under a time limit.

    A decode that overruns is abandoned: its thread is left to finish on its own and a fresh
    one takes over, so a hung file costs one stuck thread, never the epoch.
    """

    def __init__(self) -> None:
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def run(self, fn: Callable[[], T], timeout_s: float) -> T:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, "evl-decode")
            executor = self._executor
        future = executor.submit(fn)
        try:
            return future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            with self._lock:
                if self._executor is executor:
                    self._executor = None
            executor.shutdown(wait=False, cancel_futures=True)
            raise

    def reset(self) -> None:
        """Forgets the executor; called in a forked child, where its thread does not exist."""
        self._executor = None
        self._lock = threading.Lock()


_DECODE_THREAD = _DecodeThread()
os.register_at_fork(after_in_child=_DECODE_THREAD.reset)


def call_with_timeout(fn: Callable[[], T], timeout_s: float | None) -> T:
    """Runs ``fn`` on the decode thread; raises ``TimeoutError`` after ``timeout_s`` seconds."""
    if timeout_s is None:
        return fn()
    try:
        return _DECODE_THREAD.run(fn, timeout_s)
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"took longer than {timeout_s:g} s") from None


def read_clip(
    path: str | Path,
    choose: Callable[[int], Sequence[np.ndarray]],
    *,
    decoder: str = "decord",
    min_frames: int = 1,
    timeout_s: float | None = None,
) -> list[np.ndarray]:
    """:func:`decode_views` with a wall-clock limit; overrunning raises a ``timeout`` error."""
    try:
        return call_with_timeout(
            lambda: decode_views(path, choose, decoder=decoder, min_frames=min_frames), timeout_s
        )
    except TimeoutError:
        raise VideoError(path, "timeout", f"decoding took longer than {timeout_s:g} s") from None

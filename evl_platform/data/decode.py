"""Video decoding behind one small interface: decord (default), PyAV and torchcodec.

A reader turns frame indices into uint8 RGB frames, optionally scaled by the decoder itself to
a smaller size (:func:`scaled_size`: the short side the transforms need, so a 1280x720 video is
never converted and resized at full size for a 224 px model). Readers are context managers and
are closed as soon as a clip is read (decord keeps file handles and buffers alive otherwise).
Every failure becomes a :class:`VideoError` whose ``kind`` says what was wrong with the file, and
:func:`read_clip` puts a wall-clock limit on the whole open-and-decode of one video.
"""

from __future__ import annotations

import abc
import concurrent.futures
import importlib
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, TypeVar

import numpy as np

from evl_platform.config.schema import VideoDecoder
from evl_platform.data.errors import DataSourceError
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


Size = tuple[int, int]
"""A frame size as (height, width) in pixels."""

DECODERS: Registry[Callable[[Path, Size | None], VideoReader]] = Registry("video decoder")
"""Reader class of each ``data.decoder``, called as ``reader(path, size)`` (``size``: frames
scaled to (height, width) by the decoder, ``None`` for the native size); the names are
``VideoDecoder``'s (checked below)."""


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
    that exist even when the container header claims more. A ``size`` is applied by FFmpeg's
    scaler inside decord, before the RGB frames are copied out.
    """

    def __init__(self, path: Path, size: Size | None = None) -> None:
        import decord

        height, width = size or (-1, -1)
        self._reader = decord.VideoReader(str(path), num_threads=1, width=width, height=height)
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
    stay in the decoder's pixel format until selected, so only the sampled ones are converted
    (and scaled to ``size``, bilinear, by FFmpeg's scaler).
    """

    def __init__(self, path: Path, size: Size | None = None) -> None:
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
        self._scale = {} if size is None else {"height": size[0], "width": size[1]}

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        return np.stack(
            [self._frames[i].to_ndarray(format="rgb24", **self._scale) for i in indices]
        )

    def close(self) -> None:
        self._frames = []


@DECODERS.register("torchcodec")
class TorchCodecReader(_Closing):
    """torchcodec reader (PyTorch's maintained decoder) on the CPU, one FFmpeg thread.

    ``seek_mode="exact"`` scans the file's packets when opening, so ``num_frames`` counts the
    frames that exist and ``get_frames_at`` seeks to the keyframe before each wanted frame. A
    ``size`` is applied by torchcodec's own resize (bilinear, antialiased) while decoding.
    """

    def __init__(self, path: Path, size: Size | None = None) -> None:
        from torchcodec.decoders import VideoDecoder
        from torchcodec.transforms import Resize

        self._decoder = VideoDecoder(
            str(path),
            dimension_order="NHWC",
            device="cpu",
            num_ffmpeg_threads=1,
            seek_mode="exact",
            transforms=None if size is None else [Resize(size)],
        )
        metadata = self._decoder.metadata
        self.num_frames = int(metadata.num_frames or 0)
        self.fps = float(metadata.average_fps or 0.0)

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        return self._decoder.get_frames_at(list(indices)).data.numpy()

    def close(self) -> None:
        self._decoder = None


DECODERS.check_names(VideoDecoder, literal_name="VideoDecoder", module=__name__)

DECODER_MODULES = {"decord": "decord", "pyav": "av", "torchcodec": "torchcodec.decoders"}
"""The Python module each decoder needs."""


def check_decoder(decoder: str) -> None:
    """Raises :class:`DataSourceError` naming ``data.decoder`` when its library cannot be
    imported (not installed, or FFmpeg's shared libraries missing for torchcodec), so a
    missing decoder is one clear error instead of every video reported unreadable."""
    DECODERS.get(decoder)
    try:
        importlib.import_module(DECODER_MODULES[decoder])
    except (ImportError, OSError, RuntimeError) as err:
        detail = " ".join(str(err).split())[:300]
        raise DataSourceError(
            f"data.decoder: {decoder} cannot be used here ({type(err).__name__}: {detail})"
        ) from None


def scaled_size(height: int, width: int, short_side: int | None) -> Size | None:
    """The (height, width) of a ``height`` x ``width`` frame scaled to ``short_side`` on its
    shorter side, aspect kept and rounded as the test transform's short-side resize does;
    ``None`` (native size) when that would not shrink the frame: decoders never upsample."""
    if short_side is None or min(height, width) <= short_side:
        return None
    if height <= width:
        return short_side, max(short_side, round(width * short_side / height))
    return max(short_side, round(height * short_side / width)), short_side


def frame_size(path: Path) -> Size:
    """The (height, width) of the first video stream, read from the container header."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        context = container.streams.video[0].codec_context
        return context.height, context.width


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


def open_video(
    path: str | Path, decoder: str = "decord", *, short_side: int | None = None
) -> VideoReader:
    """Opens ``path`` with the named backend; file problems become :class:`VideoError`.

    Args:
        path: video file.
        decoder: backend name in :data:`DECODERS`.
        short_side: frames come out scaled to this short side when the video is larger
            (:func:`scaled_size`); ``None`` decodes at the native size.
    """
    path = Path(path)
    factory = DECODERS.get(decoder)
    check_file(path)
    try:
        size = None if short_side is None else scaled_size(*frame_size(path), short_side)
        reader = factory(path, size)
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
    short_side: int | None = None,
) -> list[np.ndarray]:
    """Decodes the frames of one or more views of a video in one pass: the wanted frames of
    all views are read as one sorted batch of unique indices, then dealt back to the views.

    Args:
        path: video file.
        choose: maps the video's frame count to one index array per view.
        decoder: backend name in :data:`DECODERS`.
        min_frames: fewer decodable frames than this is a ``too_short`` video.
        short_side: decode scaled to this short side (see :func:`open_video`).

    Returns:
        One (T, H, W, 3) uint8 array per view.
    """
    with open_video(path, decoder, short_side=short_side) as reader:
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
    short_side: int | None = None,
    timeout_s: float | None = None,
) -> list[np.ndarray]:
    """:func:`decode_views` with a wall-clock limit; overrunning raises a ``timeout`` error."""
    try:
        return call_with_timeout(
            lambda: decode_views(
                path, choose, decoder=decoder, min_frames=min_frames, short_side=short_side
            ),
            timeout_s,
        )
    except TimeoutError:
        raise VideoError(path, "timeout", f"decoding took longer than {timeout_s:g} s") from None

"""Re-encoding one video for ``data prepare``: H.264 mp4, a smaller short side, short GOPs.

:func:`encode_video` decodes every frame of the input with PyAV (any container and codec
FFmpeg reads: H.264 mp4, SSv2's VP9 webm, ...), scales it so the short side is at most
:attr:`EncodeSettings.short_side` (never up; both sides even, as yuv420p needs), and encodes it
with libx264 into an mp4 without audio, at the input's frame rate, with an IDR keyframe every
:attr:`EncodeSettings.keyframe_interval` frames exactly (``keyint`` = ``min-keyint``, no scene-cut
keyframes). The output appears under its final name only after ``os.replace`` of a temporary
file in the same directory, so an interrupted run never leaves a half-written file there.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from evl_platform.data.decode import VideoError, check_file

TMP_MARKER = ".prepare-tmp-"
"""Part of every temporary file name; a rerun deletes leftovers of a killed run."""

DEFAULT_FPS = Fraction(30)
"""Frame rate written when the input's header gives none."""


@dataclass(frozen=True)
class EncodeSettings:
    """How every prepared video is encoded.

    Attributes:
        short_side: the short side of the output in pixels (smaller inputs keep theirs).
        keyframe_interval: frames between IDR keyframes.
        crf: x264 constant rate factor (23: x264's default, visually close to the input at
            these sizes).
        preset: x264 speed preset.
        min_frames: inputs with fewer decodable frames are ``too_short`` and not written.
    """

    short_side: int
    keyframe_interval: int
    crf: int = 23
    preset: str = "veryfast"
    min_frames: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Plain form, for Ray tasks and the ``prepare.json`` manifest."""
        return asdict(self)


@dataclass
class EncodeResult:
    """What happened to one input: ``ok`` (written), or a kind of ``BAD_KINDS``."""

    source: str
    output: str
    status: str = "ok"
    detail: str = ""
    frames: int = 0
    width: int = 0
    height: int = 0
    seconds: float = 0.0


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side ``min(short_side, input's)``, both even (>= 2)."""
    short, long = sorted((width, height))
    new_short = max(2, min(short, short_side) // 2 * 2)
    new_long = max(2, round(long * new_short / short / 2) * 2)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def encode_video(source: str, output: str, settings: EncodeSettings) -> EncodeResult:
    """Writes the prepared copy of ``source`` to ``output``; never raises for a bad input.

    Returns:
        The result; a status other than ``ok`` names the kind of problem and nothing is written.
    """
    began = time.perf_counter()
    result = EncodeResult(source, output)
    tmp = os.path.join(os.path.dirname(output), f".{os.path.basename(output)}{TMP_MARKER}")
    tmp += uuid.uuid4().hex[:8]
    try:
        check_file(Path(source))
        result.frames, result.width, result.height = _transcode(source, tmp, settings)
        if result.frames < settings.min_frames:
            detail = f"{result.frames} frames, at least {settings.min_frames} needed"
            raise VideoError(source, "too_short", detail)
        os.replace(tmp, output)
    except VideoError as err:
        result.status, result.detail = err.kind, err.detail
    except Exception as err:  # an encoder or container error: still this input's problem
        bad = VideoError(source, "unreadable", f"{type(err).__name__}: {err}")
        result.status, result.detail = bad.kind, bad.detail
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    result.seconds = time.perf_counter() - began
    return result


def _transcode(source: str, tmp: str, settings: EncodeSettings) -> tuple[int, int, int]:
    """Encodes ``source`` into ``tmp``; returns (frames, width, height) written."""
    import av

    try:
        container = av.open(source)
    except Exception as err:
        raise VideoError(source, "unreadable", f"{type(err).__name__}: {err}") from None
    with container:
        if not container.streams.video:
            raise VideoError(source, "unreadable", "no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # one task per core does the parallelism
        rate = stream.average_rate or stream.guessed_rate or DEFAULT_FPS
        with av.open(tmp, mode="w", format="mp4") as out:
            return _encode_frames(_decoded(container, stream, source), out, rate, settings)


def _decoded(container: Any, stream: Any, source: str) -> Iterator[Any]:
    """The input's frames in order; a decoding error becomes an ``unreadable`` VideoError."""
    count = 0
    try:
        for frame in container.decode(stream):
            yield frame
            count += 1
    except Exception as err:
        detail = f"frame {count}: {type(err).__name__}: {err}"
        raise VideoError(source, "unreadable", detail) from None


def _encode_frames(
    frames: Iterator[Any], out: Any, rate: Fraction, settings: EncodeSettings
) -> tuple[int, int, int]:
    """Scales and encodes ``frames`` into the open output container ``out``."""
    import av

    stream, size, count = None, (0, 0), 0
    for frame in frames:
        if stream is None:
            size = output_size(frame.width, frame.height, settings.short_side)
            stream = _add_stream(out, rate, size, settings)
        image = frame.reformat(*size, format="yuv420p", interpolation="AREA")
        image.pts, image.time_base = count, 1 / rate
        # a decoded frame keeps its input picture type, and libx264 makes an I frame of every
        # frame marked I: the input's keyframes would fall between ours
        image.pict_type = av.video.frame.PictureType.NONE
        out.mux(stream.encode(image))
        count += 1
    if stream is not None:
        out.mux(stream.encode())  # flush
    return count, *size


def _add_stream(out: Any, rate: Fraction, size: tuple[int, int], settings: EncodeSettings) -> Any:
    """The libx264 stream: yuv420p, CRF, and a keyframe every ``keyframe_interval`` frames."""
    stream = out.add_stream("libx264", rate=rate)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    stream.codec_context.thread_count = 1
    stream.codec_context.gop_size = settings.keyframe_interval
    interval = settings.keyframe_interval
    stream.options = {
        "crf": str(settings.crf),
        "preset": settings.preset,
        "x264-params": f"keyint={interval}:min-keyint={interval}:scenecut=0",
    }
    return stream

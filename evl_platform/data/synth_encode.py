"""Encoding the synthetic stand-ins' frames: H.264 mp4 (Kinetics-like) or VP9 webm
(Something-Something-v2-like), byte-deterministic."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np


@dataclass(frozen=True)
class Codec:
    """How one codec is written.

    Attributes:
        encoder: the FFmpeg encoder PyAV opens.
        container: the FFmpeg muxer.
        extension: file suffix.
        options: encoder options (byte-deterministic with one thread).
    """

    encoder: str
    container: str
    extension: str
    options: tuple[tuple[str, str], ...]


CODECS: dict[str, Codec] = {
    # x264's mb-tree gave different bytes (and pixels) for about one clip in ten when the same
    # frames were encoded twice, even with one thread
    "h264": Codec("libx264", "mp4", ".mp4", (("crf", "18"), ("x264-params", "no-mbtree=1"))),
    # constant quality (b:v 0), libvpx's fastest "good" speed; SSv2's webm files are VP9 at
    # about this quality
    "vp9": Codec(
        "libvpx-vp9",
        "webm",
        ".webm",
        (("crf", "32"), ("b:v", "0"), ("deadline", "good"), ("cpu-used", "5")),
    ),
}


def write_video(
    path: Path,
    frames: np.ndarray,
    *,
    fps: int,
    crf: int | None = None,
    faststart: bool = False,
    codec: str = "h264",
    keyframe_interval: int | None = None,
) -> None:
    """Encodes RGB frames as an H.264 mp4 or a VP9 webm (yuv420p, one encoder thread:
    byte-deterministic).

    Args:
        path: output file.
        frames: (T, H, W, 3) uint8 RGB, H and W even.
        fps: frame rate.
        crf: constant rate factor (lower is better quality); ``None`` keeps the codec's
            (18 for H.264, 32 for VP9).
        faststart: put the moov atom at the front of an mp4 file.
        codec: a :data:`CODECS` key.
        keyframe_interval: frames between keyframes (GOP size); ``None`` keeps the encoder's.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs an even frame size, got {width}x{height}")
    spec = CODECS[codec]
    options = {"movflags": "faststart"} if faststart and spec.container == "mp4" else {}
    if spec.container == "webm":
        options["fflags"] = "+bitexact"  # else the muxer writes a random segment UID
    encoder_options = dict(spec.options)
    if crf is not None:
        encoder_options["crf"] = str(crf)
    if keyframe_interval is not None:
        encoder_options["g"] = str(keyframe_interval)
    with av.open(str(path), mode="w", format=spec.container, options=options) as container:
        stream = container.add_stream(spec.encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = encoder_options
        stream.codec_context.thread_count = 1  # threaded encoder output depends on timing
        for frame in frames:
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode())  # flush

"""Writes stand-ins for raw Kinetics downloads: the input ``data prepare`` is measured on.

Each clip is 1280x720 H.264 (libx264, preset fast, crf 23, B-frames), 30 fps, 10 s, a keyframe
every 250 frames (x264's and YouTube's usual GOP), no audio. The content compresses like
natural video rather than noise: a camera panning over a smooth gradient with low-frequency
structure and mild fixed texture, and soft-edged shapes moving across it. A few bad files
(empty, truncated, too short) are listed among the good ones. The annotations are a Kinetics CSV
per split (``label,youtube_id,time_start,time_end,split``), files ``<id>_<start>_<end>.mp4``.

Usage::

    python scripts/make_raw_standins.py OUT [--clips 12] [--val-clips 2] [--seconds 10]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import string
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as tnf

WIDTH, HEIGHT, FPS, GOP = 1280, 720, 30, 250
CLASSES = ("abseiling", "bowling", "juggling", "surfing")
_PAD = 160  # canvas margin the camera pans over


def _canvas(rng: np.random.Generator) -> np.ndarray:
    """A (H + 2 pad, W + 2 pad, 3) uint8 scene: gradient, smooth blobs, mild fixed texture."""
    h, w = HEIGHT + 2 * _PAD, WIDTH + 2 * _PAD
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, 3).astype(np.float32)
    tilt = rng.uniform(-60, 60, (2, 3)).astype(np.float32)
    scene = base + xs[..., None] / w * tilt[0] + ys[..., None] / h * tilt[1]
    coarse = torch.from_numpy(rng.normal(0, 25, (1, 3, h // 48, w // 48)).astype(np.float32))
    smooth = tnf.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    scene += smooth[0].permute(1, 2, 0).numpy()
    scene += rng.normal(0, 4, (h, w, 1)).astype(np.float32)  # fine grain, fixed to the scene
    return np.clip(scene, 0, 255).astype(np.uint8)


def _blobs(rng: np.random.Generator) -> list[dict]:
    """Soft ellipses: position, velocity, radii and colour of each."""
    return [
        {
            "pos": rng.uniform((0, 0), (WIDTH, HEIGHT)),
            "vel": rng.uniform(-9, 9, 2),
            "radii": rng.uniform(40, 140, 2),
            "colour": rng.uniform(0, 255, 3).astype(np.float32),
        }
        for _ in range(int(rng.integers(2, 5)))
    ]


def _draw(frame: np.ndarray, blob: dict, t: int) -> None:
    """Blends one ellipse into ``frame`` (in place), touching only its bounding box."""
    cx, cy = (blob["pos"] + blob["vel"] * t) % (WIDTH, HEIGHT)
    rx, ry = blob["radii"]
    x0, x1 = int(max(0, cx - rx - 2)), int(min(WIDTH, cx + rx + 2))
    y0, y1 = int(max(0, cy - ry - 2)), int(min(HEIGHT, cy + ry + 2))
    if x0 >= x1 or y0 >= y1:
        return
    ys, xs = np.ogrid[y0:y1, x0:x1]
    dist = np.sqrt(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2)
    alpha = np.clip((1 - dist) * min(rx, ry) / 3, 0, 1)[..., None].astype(np.float32)
    box = frame[y0:y1, x0:x1].astype(np.float32)
    frame[y0:y1, x0:x1] = (box + alpha * (blob["colour"] - box)).astype(np.uint8)


def write_clip(path: Path, seed: int, frames: int) -> None:
    """Renders and encodes one clip."""
    rng = np.random.default_rng(seed)
    canvas, blobs = _canvas(rng), _blobs(rng)
    pan = rng.uniform(-1.5, 1.5, 2)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.gop_size = GOP
        stream.options = {"crf": "23", "preset": "fast", "x264-params": f"keyint={GOP}"}
        for t in range(frames):
            x = int(_PAD + pan[0] * t + 40 * np.sin(t / 45)) % (2 * _PAD)
            y = int(_PAD + pan[1] * t) % (2 * _PAD)
            frame = np.ascontiguousarray(canvas[y : y + HEIGHT, x : x + WIDTH])
            for blob in blobs:
                _draw(frame, blob, t)
            image = av.VideoFrame.from_ndarray(frame, format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode())


def _youtube_id(rng: np.random.Generator) -> str:
    alphabet = string.ascii_letters + string.digits + "-_"
    return "".join(rng.choice(list(alphabet), 11))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--clips", type=int, default=12, help="good clips in all (default 12)")
    parser.add_argument("--val-clips", type=int, default=2, help="of which validation")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    videos = args.out / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []  # (split, label, youtube id, start, end)
    for i in range(args.clips + 3):
        split = "val" if i < args.val_clips else "train"
        start = int(rng.integers(0, 300))
        rows.append((split, CLASSES[i % len(CLASSES)], _youtube_id(rng), start, start + 10))
    name = {row: f"{row[2]}_{row[3]:06d}_{row[4]:06d}.mp4" for row in rows}
    good, (empty, truncated, short) = rows[: args.clips], rows[args.clips :]
    with concurrent.futures.ProcessPoolExecutor(args.workers) as pool:
        jobs = [(videos / name[row], i, FPS * args.seconds) for i, row in enumerate(good)]
        jobs.append((videos / name[short], len(good), 4))  # fewer frames than a clip needs
        list(pool.map(write_clip, *zip(*jobs, strict=True)))
    (videos / name[empty]).write_bytes(b"")
    whole = (videos / name[good[-1]]).read_bytes()
    (videos / name[truncated]).write_bytes(whole[: len(whole) // 2])
    for split in ("train", "val"):
        with open(args.out / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
            writer.writerows([r[1:] + (r[0],) for r in rows if r[0] == split])
    print(f"{len(good)} clips + 3 bad files in {videos}; annotations {args.out}/train.csv, val.csv")


if __name__ == "__main__":
    main()

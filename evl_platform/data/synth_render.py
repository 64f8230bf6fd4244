"""Vectorised numpy rendering of the synthetic stand-in clips: shapes, backgrounds, motions.

Every clip is a static background plus one or two sprites (a filled shape with a pose per
frame). Masks are computed for all frames at once from pixel-coordinate grids, rotated into
each sprite's frame of reference, so there is no per-pixel or per-frame Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Colour = tuple[int, int, int]

# Saturated object colours; their names become SSv2 placeholders ("red square").
PALETTE: dict[str, Colour] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (150, 60, 200),
    "cyan": (40, 210, 220),
    "pink": (245, 120, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
MOTION_SHAPES = ("square", "disc", "triangle", "cross", "L-shape", "bar", "diamond", "ring")
MOTION_BACKGROUNDS = ("solid",)

# Half-size of each shape's bounding circle in units of the sprite radius (keeps it in frame).
_EXTENT = 1.2
# Marker dot centre (u, v) per shape, off-centre and inside the shape, so rotation shows.
_MARKERS: dict[str, tuple[float, float]] = {
    "square": (0.4, -0.4),
    "disc": (0.45, -0.35),
    "triangle": (0.25, 0.35),
    "cross": (0.0, -0.6),
    "L-shape": (-0.5, -0.5),
    "bar": (0.6, 0.0),
    "diamond": (0.0, -0.45),
    "ring": (0.0, -0.8),
}
_MARKER_RADIUS = 0.22


@dataclass(frozen=True, eq=False)
class Sprite:
    """One object over a clip: a shape, its colours and its pose in every frame.

    Attributes:
        shape: a shape name understood by :func:`shape_mask`.
        colour: fill colour (RGB).
        cx / cy / radius / angle: (T,) pose arrays in pixels and radians; a larger ``angle``
            is turned further clockwise on screen.
        marker: draw a small contrasting dot off-centre (makes the rotation of a disc visible).
        stripe_colour: second colour of a striped texture that moves with the sprite.
    """

    shape: str
    colour: Colour
    cx: np.ndarray
    cy: np.ndarray
    radius: np.ndarray
    angle: np.ndarray
    marker: bool = True
    stripe_colour: Colour | None = None


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` in sprite coordinates (unit radius, v pointing down)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "square":
        return np.maximum(au, av) <= 0.8
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.36)
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "triangle":  # apex up, base at v = 0.7
        return (v <= 0.7) & (au <= (v + 0.9) * (0.9 / 1.6))
    if shape == "cross":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "bar":
        return (au <= 0.95) & (av <= 0.35)
    if shape == "L-shape":
        stem = (u >= -0.8) & (u <= -0.2) & (av <= 0.9)
        foot = (au <= 0.8) & (v >= 0.3) & (v <= 0.9)
        return stem | foot
    raise ValueError(f"unknown shape {shape!r}")


def pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(y, x)``, each of shape (H, W), float32."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    return y, x


def _contrast(colour: Colour) -> Colour:
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    return (15, 15, 15) if luminance > 140 else (240, 240, 240)


def draw_sprite(frames: np.ndarray, sprite: Sprite, grid: tuple[np.ndarray, np.ndarray]) -> None:
    """Paints ``sprite`` into ``frames`` (T, H, W, 3) uint8, in place."""
    y, x = grid
    cos = np.cos(sprite.angle).astype(np.float32)[:, None, None]  # (T, 1, 1)
    sin = np.sin(sprite.angle).astype(np.float32)[:, None, None]
    inv_r = (1.0 / sprite.radius).astype(np.float32)[:, None, None]
    dx = x - sprite.cx.astype(np.float32)[:, None, None]  # (T, H, W)
    dy = y - sprite.cy.astype(np.float32)[:, None, None]
    u = (cos * dx + sin * dy) * inv_r  # rotate the grid by -angle into sprite coordinates
    v = (cos * dy - sin * dx) * inv_r
    body = shape_mask(sprite.shape, u, v)
    frames[body] = sprite.colour
    if sprite.stripe_colour is not None:
        frames[body & (np.floor(u * 2.5) % 2 == 0)] = sprite.stripe_colour
    if sprite.marker:
        mu, mv = _MARKERS[sprite.shape]
        dot = (u - mu) ** 2 + (v - mv) ** 2 <= _MARKER_RADIUS**2
        frames[body & dot] = _contrast(sprite.colour)


def render_background(
    kind: str, c0: Colour, c1: Colour, rng: np.random.Generator, height: int, width: int
) -> np.ndarray:
    """A static (H, W, 3) uint8 background mixing colours ``c0`` and ``c1`` in a pattern.

    Args:
        kind: ``solid``/``plain``, ``gradient``, ``stripes``, ``checker`` or ``noise``.
        c0 / c1: the two colours of the pattern (``solid`` uses ``c0`` only).
        rng: draws the pattern's orientation, period and phase.
        height / width: size in pixels.
    """
    y, x = pixel_grid(height, width)
    theta = rng.uniform(0.0, np.pi)
    proj = x * np.cos(theta) + y * np.sin(theta)  # (H, W) distance along a random direction
    if kind in ("solid", "plain"):
        mix = np.zeros_like(x)
    elif kind == "gradient":
        mix = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    elif kind == "stripes":
        period = rng.uniform(8.0, 20.0)
        mix = (np.floor(proj / period * 2.0 + rng.uniform(0.0, 2.0)) % 2).astype(np.float32)
    elif kind == "checker":
        cell = int(rng.integers(8, 17))
        ox, oy = rng.integers(0, cell, size=2)
        mix = (((x + ox) // cell + (y + oy) // cell) % 2).astype(np.float32)
    elif kind == "noise":
        block = 8
        coarse = rng.random((height // block + 1, width // block + 1)).astype(np.float32)
        mix = np.kron(coarse, np.ones((block, block), np.float32))[:height, :width]
    else:
        raise ValueError(f"unknown background {kind!r}")
    a, b = np.asarray(c0, np.float32), np.asarray(c1, np.float32)
    return np.rint(a + mix[..., None] * (b - a)).astype(np.uint8)


def compose(background: np.ndarray, sprites: list[Sprite], num_frames: int) -> np.ndarray:
    """Stacks ``background`` ``num_frames`` times and paints ``sprites`` on top, in order."""
    frames = np.repeat(background[None], num_frames, axis=0)  # (T, H, W, 3)
    grid = pixel_grid(*background.shape[:2])
    for sprite in sprites:
        draw_sprite(frames, sprite, grid)
    return frames


# --- synthetic-motion: the class is a motion, appearance is random ----------------------------

MOTION_KINDS = ("horizontal", "vertical", "scale", "rotation", "two_objects")


# The look of each motion pair: its objects' colour, shared by a motion and its time reversal.
# One frame tells the pair, as one SSv2 frame shows the objects of an action, but only the
# order of the frames tells its direction. The cue sits on the objects, not the background, so
# a decoder that finds the pair attends to the objects, whose motion the temporal modules read.
MOTION_COLOURS: dict[str, str] = {
    "horizontal": "red",
    "vertical": "green",
    "scale": "blue",
    "rotation": "yellow",
    "two_objects": "purple",
}


def _dark_colour(rng: np.random.Generator) -> Colour:
    """A dark grey background colour: the objects are always the salient thing."""
    level = rng.uniform(20.0, 50.0)
    rgb = np.clip(level + rng.normal(0.0, 4.0, 3), 0, 255)
    return tuple(int(c) for c in np.rint(rgb))


def _ramp(start: float, end: float, num_frames: int) -> np.ndarray:
    return np.linspace(start, end, num_frames)


# A translation is slow or fast (the dataset makes every other clip of a class fast). Slow: the
# object stays in view and covers SLOW_TRAVEL of the frame over the whole clip, a few pixels per
# sampled frame, which a temporal convolution reads at every patch it crosses. Fast: a small
# object crosses the whole frame, from out of view to out of view, in FAST_FRAMES of the clip,
# starting at a random time. At the local recipe's 64 px, 8 of 32 frames, it jumps further
# than its own size plus a patch between two sampled frames, so no patch sees it in two sampled
# frames in a row, and only modules that relate frames across the image (T-PE, T-CA) can see
# which way it went.
SLOW_TRAVEL = (0.85, 1.0)
FAST_FRAMES = (0.35, 0.5)
FAST_RADIUS = (0.08, 0.1)
SLOW_RADIUS = (0.13, 0.2)


def _travel(rng: np.random.Generator, lo: float, hi: float, num_frames: int) -> np.ndarray:
    """A straight path over ``SLOW_TRAVEL`` of ``[lo, hi]``, increasing, at constant speed."""
    span = max(hi - lo, 0.0)
    length = rng.uniform(*SLOW_TRAVEL) * span
    start = lo + rng.uniform(0.0, span - length)
    return _ramp(start, start + length, num_frames)


def _crossing(rng: np.random.Generator, lo: float, hi: float, num_frames: int) -> np.ndarray:
    """A fast straight path from ``lo`` to ``hi``, held at either end outside its time window."""
    duration = max(2, int(round(rng.uniform(*FAST_FRAMES) * num_frames)))
    first = int(rng.integers(0, num_frames - duration + 1))
    path = np.full(num_frames, lo, np.float64)
    path[first : first + duration] = _ramp(lo, hi, duration)
    path[first + duration :] = hi
    return path


def _translation(
    rng: np.random.Generator, along: int, across: int, t: int, fast: bool
) -> tuple[np.ndarray, np.ndarray, float]:
    """A slow or fast translation along an axis ``along`` pixels long, increasing.

    Returns:
        ``(position along, position across, radius)``, positions (T,) in pixels.
    """
    short = min(along, across)
    radius = rng.uniform(*(FAST_RADIUS if fast else SLOW_RADIUS)) * short
    margin = _EXTENT * radius
    if fast:  # from just out of view to just out of view
        path = _crossing(rng, -margin, along + margin, t)
    else:
        path = _travel(rng, margin, along - margin, t)
    drift = rng.uniform(-0.08, 0.08) * short * np.linspace(0.0, 1.0, t)
    side = np.clip(rng.uniform(margin, across - margin) + drift, margin, across - margin)
    return path, side, radius


def _sprite(shape: str, colour: str, **pose: np.ndarray | float) -> Sprite:
    num_frames = max(np.size(p) for p in pose.values())
    arrays = {k: np.broadcast_to(np.asarray(p, np.float64), (num_frames,)) for k, p in pose.items()}
    return Sprite(shape=shape, colour=PALETTE[colour], **arrays)


def motion_clip(
    kind: str,
    rng: np.random.Generator,
    num_frames: int,
    height: int,
    width: int,
    fast: bool = False,
) -> tuple[np.ndarray, list[str]]:
    """Renders the first class of a motion pair; its time reversal is the second class.

    Args:
        kind: one of :data:`MOTION_KINDS`: ``horizontal`` (left to right), ``vertical``
            (upwards), ``scale`` (approaching, growing), ``rotation`` (clockwise),
            ``two_objects`` (converging).
        rng: the clip's generator; draws background, shapes, sizes, path, start (and a
            fast crossing's timing).
        num_frames / height / width: clip size.
        fast: a ``horizontal`` or ``vertical`` clip is a fast crossing instead of a slow sweep
            (see :data:`SLOW_TRAVEL`); the other kinds ignore it.

    Returns:
        ``(frames, placeholders)``: (T, H, W, 3) uint8 RGB frames and the SSv2 placeholder
        text of each object ("red square").
    """
    c0 = c1 = _dark_colour(rng)
    background = render_background(str(rng.choice(MOTION_BACKGROUNDS)), c0, c1, rng, height, width)
    count = 2 if kind == "two_objects" else 1
    looks = [(str(rng.choice(MOTION_SHAPES)), MOTION_COLOURS[kind]) for _ in range(count)]
    poses = _motion_poses(kind, rng, num_frames, height, width, fast)
    sprites = [_sprite(s, c, **pose) for (s, c), pose in zip(looks, poses, strict=True)]
    return compose(background, sprites, num_frames), [f"{c} {s}" for s, c in looks]


def _motion_poses(
    kind: str, rng: np.random.Generator, t: int, height: int, width: int, fast: bool
) -> list[dict[str, np.ndarray | float]]:
    short = min(height, width)
    angle = rng.uniform(0.0, 2 * np.pi)
    if kind == "two_objects":
        return _converging_poses(rng, t, height, width, angle)
    if kind == "horizontal":
        cx, cy, radius = _translation(rng, width, height, t, fast)
        return [{"cx": cx, "cy": cy, "radius": radius, "angle": angle}]
    if kind == "vertical":  # upwards: y decreases
        cy, cx, radius = _translation(rng, height, width, t, fast)
        return [{"cx": cx, "cy": cy[::-1], "radius": radius, "angle": angle}]
    drift = rng.uniform(-0.08, 0.08) * short * np.linspace(0.0, 1.0, t)
    if kind == "scale":  # approaching: grows 3-4x
        r0, r1 = rng.uniform(0.08, 0.1) * short, rng.uniform(0.28, 0.34) * short
        m = _EXTENT * r1
        cx = np.clip(rng.uniform(m, width - m) + drift, m, width - m)
        cy = rng.uniform(m, height - m)
        return [
            {"cx": cx, "cy": cy, "radius": r0 * (r1 / r0) ** np.linspace(0, 1, t), "angle": angle}
        ]
    if kind == "rotation":  # clockwise on screen, half a turn to a full turn
        turns = rng.uniform(0.5, 1.0)
        radius = rng.uniform(0.16, 0.22) * short
        m = _EXTENT * radius
        cx, cy = rng.uniform(m, width - m), rng.uniform(m, height - m)
        spin = _ramp(angle, angle + 2 * np.pi * turns, t)
        return [{"cx": cx, "cy": cy, "radius": radius, "angle": spin}]
    raise ValueError(f"unknown motion {kind!r}")


def _converging_poses(
    rng: np.random.Generator, t: int, height: int, width: int, angle: float
) -> list[dict[str, np.ndarray | float]]:
    """Two objects on a diagonal axis, starting far apart and meeting near the centre.

    The axis is diagonal (45 degrees, +-0.2 rad, either way) so that the path of the pair does
    not look like the path of one object moving horizontally or vertically.
    """
    short = min(height, width)
    r1, r2 = rng.uniform(0.1, 0.15, size=2) * short
    margin = max(r1, r2)  # may clip a corner at the start, for a longer approach
    centre = np.array([width, height]) / 2 + rng.uniform(-0.05, 0.05, 2) * short
    theta = rng.choice([-1.0, 1.0]) * rng.uniform(np.pi / 4 - 0.2, np.pi / 4 + 0.2)
    axis = np.array([np.cos(theta), np.sin(theta)])
    room = np.minimum(centre - margin, np.array([width, height]) - margin - centre)
    with np.errstate(divide="ignore"):
        reach = float(np.min(np.where(np.abs(axis) > 1e-6, room / np.abs(axis), np.inf)))
    end = (r1 + r2) / 2 + 1.0  # (half) distance at which the two shapes (nearly) touch
    start = max(rng.uniform(0.85, 1.0) * reach, end + 0.2 * short)
    half = _ramp(start, end, t)[:, None] * axis  # (T, 2)
    p1, p2 = centre - half, centre + half
    return [
        {"cx": p1[:, 0], "cy": p1[:, 1], "radius": r1, "angle": angle},
        {"cx": p2[:, 0], "cy": p2[:, 1], "radius": r2, "angle": rng.uniform(0, 2 * np.pi)},
    ]


# --- synthetic-appearance: the class is a look, motion is random ------------------------------


@dataclass(frozen=True)
class AppearanceClass:
    """A static look: shape, colour, optional striped texture and background pattern."""

    shape: str
    colour: str
    background: str
    striped: bool = False

    @property
    def name(self) -> str:
        """Kinetics-style label, e.g. ``red disc on stripes``."""
        texture = "striped " if self.striped else ""
        return f"{texture}{self.colour} {self.shape} on {self.background}"


# Each background pattern has fixed colours (jittered per clip), so it is part of the look. Every
# pattern is the background of two classes, which only their objects tell apart.
APPEARANCE_BACKGROUNDS: dict[str, tuple[Colour, Colour]] = {
    "plain": ((128, 128, 128), (128, 128, 128)),
    "stripes": ((205, 190, 155), (115, 95, 75)),
    "checker": ((210, 210, 210), (85, 85, 85)),
    "gradient": ((25, 25, 55), (200, 200, 225)),
    "noise": ((55, 85, 55), (150, 170, 135)),
}
APPEARANCE_CLASSES: tuple[AppearanceClass, ...] = tuple(
    sorted(
        (
            AppearanceClass("disc", "red", "stripes"),
            AppearanceClass("square", "red", "checker"),
            AppearanceClass("triangle", "green", "gradient"),
            AppearanceClass("cross", "green", "plain"),
            AppearanceClass("bar", "blue", "checker"),
            AppearanceClass("ring", "blue", "noise"),
            AppearanceClass("diamond", "yellow", "stripes"),
            AppearanceClass("cross", "orange", "noise"),
            AppearanceClass("disc", "purple", "plain", striped=True),
            AppearanceClass("bar", "cyan", "gradient", striped=True),
        ),
        key=lambda c: c.name,  # Kinetics convention: class index = position in sorted names
    )
)


APPEARANCE_CONFUSION = 0.1
"""Share of the clips that show the object of the other class on their background, as a
Kinetics clip may show mostly what another class is about: about this share of any model's
validation answers are wrong, whatever it learns, so the stand-in sits off the ceiling."""


def _bounce(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Folds an unbounded path into ``[lo, hi]`` as if it bounced off the walls."""
    span = max(hi - lo, 1e-6)
    q = (p - lo) % (2 * span)
    return lo + np.where(q > span, 2 * span - q, q)


def _jitter(colour: Colour, rng: np.random.Generator, amount: float) -> Colour:
    rgb = np.clip(np.asarray(colour) + rng.uniform(-amount, amount, 3), 0, 255)
    return tuple(int(c) for c in np.rint(rgb))


def appearance_clip(
    label: int, rng: np.random.Generator, num_frames: int, height: int, width: int
) -> np.ndarray:
    """Renders one clip of appearance class ``label`` with a random, class-blind motion.

    Returns:
        (T, H, W, 3) uint8 RGB frames.
    """
    look = APPEARANCE_CLASSES[label]
    if rng.random() < APPEARANCE_CONFUSION:
        [look] = [c for c in APPEARANCE_CLASSES if c.background == look.background and c != look]
    short, t = min(height, width), num_frames
    shift = rng.uniform(-12.0, 12.0)  # brightness jitter of the background
    c0, c1 = (_jitter(c, rng, 6.0) for c in APPEARANCE_BACKGROUNDS[look.background])
    c0, c1 = (tuple(int(np.clip(v + shift, 0, 255)) for v in c) for c in (c0, c1))
    background = render_background(look.background, c0, c1, rng, height, width)
    radius = rng.uniform(0.13, 0.19) * short * (1 + rng.uniform(-0.1, 0.1) * np.linspace(0, 1, t))
    margin = _EXTENT * float(radius.max())
    heading = rng.uniform(0.0, 2 * np.pi)
    path = rng.uniform(0.0, 1.5) * short * np.linspace(0.0, 1.0, t)  # (T,) distance travelled
    cx = _bounce(
        rng.uniform(margin, width - margin) + path * np.cos(heading), margin, width - margin
    )
    cy = _bounce(
        rng.uniform(margin, height - margin) + path * np.sin(heading), margin, height - margin
    )
    angle = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.5, 0.5) * 2 * np.pi * np.linspace(0, 1, t)
    colour = _jitter(PALETTE[look.colour], rng, 15.0)
    stripe = tuple(int(c * 0.45) for c in colour) if look.striped else None
    sprite = Sprite(look.shape, colour, cx, cy, radius, angle, marker=False, stripe_colour=stripe)
    return compose(background, [sprite], t)

"""EVL's local temporal modules (paper section 3.2): T-Conv, T-PE and T-CA, and their registry.

Each takes the spatiotemporal feature volume of one backbone layer, (N, T, L, C) with the cls
token at ``L = 0``, and returns a term of the same shape that the decoder layer adds to it.

``TEMPORAL_MODULES`` is the one place the decoder, model info and the feature cache learn which
temporal modules exist. Adding one takes three files:

1. here: a :class:`TemporalModule` subclass (``label``, ``reads``, ``create``, ``term``),
   registered with ``@TEMPORAL_MODULES.register("<switch>")``;
2. ``evl_platform/config/schema.py``: the switch ``<switch>: TemporalModuleSwitch = False`` in
   ``DecoderConfig`` (the YAML key ``model.decoder.<switch>``); importing this module fails,
   naming the field to add, while the two disagree;
3. its test.

:func:`create_temporal_modules` builds the enabled ones for each decoder layer, in
registration order (the order their terms are added), under their registered names, so the
names are the parameter names in checkpoints (``decoder.layers.0.temporal_conv.conv.weight``).
A module whose ``reads`` names ``attn`` makes the backbone return each block's attention queries
and keys, and the feature cache store T-CA's maps between adjacent frames
(``evl_platform.features.key.tensor_kinds``). A module that needs a backbone tensor other than
``out`` and ``attn`` also needs that tensor in ``BlockFeatures`` (``models/backbone.py``) and in
the feature cache (``features/key.py``, ``features/shard.py``).
"""

from __future__ import annotations

import abc
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from evl_platform.config.schema import DecoderConfig
from evl_platform.models.backbone import BlockFeatures
from evl_platform.registry import Registry


@dataclass(frozen=True)
class TemporalGeometry:
    """The sizes a temporal module is built for.

    Attributes:
        width: channels C of the decoder layer's features.
        num_frames: frames T per clip (``data.num_frames``).
        grid: patch grid (H, W) of the backbone.
    """

    width: int
    num_frames: int
    grid: tuple[int, int]


class TemporalModule(nn.Module, abc.ABC):
    """A local temporal module of a decoder layer, as the registry knows it.

    Attributes:
        label: short name in model info and reports (``T-Conv``).
        reads: backbone tensors it reads besides the block output, as the feature cache names
            them: ``attn`` for the attention between adjacent frames (live: the block's
            queries and keys; cached: the maps of :func:`adjacent_attention`).
    """

    label: ClassVar[str]
    reads: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abc.abstractmethod
    def create(cls, geometry: TemporalGeometry) -> TemporalModule:
        """The module of one decoder layer."""

    @abc.abstractmethod
    def term(self, features: BlockFeatures) -> torch.Tensor:
        """What the decoder layer adds to ``features.out`` (N, T, L, C); may broadcast."""


TEMPORAL_MODULES: Registry[type[TemporalModule]] = Registry("temporal module")
"""Temporal modules by the name of their ``DecoderConfig`` switch, in the order they apply."""


@TEMPORAL_MODULES.register("temporal_conv")
class TemporalConv(TemporalModule):
    """T-Conv (eq. 5): depthwise Conv1d over time, kernel 3, applied to every token.

    Args:
        width: channels C.
    """

    label = "T-Conv"

    def __init__(self, *, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(width, width, kernel_size=3, padding=1, groups=width)

    @classmethod
    def create(cls, geometry: TemporalGeometry) -> TemporalConv:
        return cls(width=geometry.width)

    def term(self, features: BlockFeatures) -> torch.Tensor:
        return self(features.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, length, c = x.shape
        y = x.permute(0, 2, 3, 1).reshape(n * length, c, t)  # (N*L, C, T)
        y = self.conv(y)
        return y.view(n, length, c, t).permute(0, 3, 1, 2)  # (N, T, L, C)


@TEMPORAL_MODULES.register("temporal_pos_embed")
class TemporalPositionalEmbedding(TemporalModule):
    """T-PE (eq. 6): one learned C-vector per frame position, zero-initialised.

    Args:
        num_frames: frames T the embedding is learned for.
        width: channels C.
    """

    label = "T-PE"

    def __init__(self, *, num_frames: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(num_frames, width))  # (T, C)

    @classmethod
    def create(cls, geometry: TemporalGeometry) -> TemporalPositionalEmbedding:
        return cls(num_frames=geometry.num_frames, width=geometry.width)

    def term(self, features: BlockFeatures) -> torch.Tensor:
        return self(features.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[1]
        if frames != self.embedding.shape[0]:
            raise ValueError(
                f"clip has {frames} frames but the temporal position embedding was built for "
                f"{self.embedding.shape[0]} (data.num_frames)"
            )
        return self.embedding.view(1, frames, 1, -1)  # (1, T, 1, C)


def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """Index of the (2H-1)(2W-1) relative-offset table for every (query, key) patch pair.

    Returns:
        (P, P) long tensor, P = H*W, with ``index[q, k]`` the row of offset ``q - k``.
    """
    h, w = grid
    rows = torch.arange(h).repeat_interleave(w)  # (P,)
    cols = torch.arange(w).repeat(h)  # (P,)
    d_row = rows[:, None] - rows[None, :] + h - 1  # (P, P) in [0, 2H-2]
    d_col = cols[:, None] - cols[None, :] + w - 1  # (P, P) in [0, 2W-2]
    return d_row * (2 * w - 1) + d_col


def window_table_index(grid: tuple[int, int]) -> torch.Tensor:
    """Table rows of the per-query-column weight windows that :class:`TemporalCrossAttention` uses.

    Returns:
        (W, (2H-1)*W) long tensor: entry ``[qc, e*W + kc]`` is the table row of offset
        ``(e - (H-1), qc - kc)``. The (H*W, C) weights of query (qr, qc) are then the contiguous
        rows ``[qr*W, qr*W + H*W)`` of column qc's window, keys ordered by (H-1-kr, kc).
    """
    h, w = grid
    q_col = torch.arange(w)[:, None, None]
    row = torch.arange(2 * h - 1)[None, :, None]
    k_col = torch.arange(w)[None, None, :]
    return (row * (2 * w - 1) + q_col - k_col + w - 1).reshape(w, -1)


def _query_windows(windows: torch.Tensor, column: int, rows: int) -> torch.Tensor:
    """Overlapping views (H, H*W, C) into column ``column``'s ((2H-1)*W, C) weight window."""
    width, c = windows.shape[0], windows.shape[2]
    return windows[column].as_strided((rows, rows * width, c), (width * c, c, 1))


class _WindowedProjection(torch.autograd.Function):
    """``y[qc, qr] = maps[qc, qr] @ windows[qc, qr*W : qr*W + H*W]`` for every query (qr, qc).

    maps: (W, H, M, H*W) attention of each query to its keys, keys ordered (H-1-kr, kc);
    windows: (W, (2H-1)*W, C) from :func:`window_table_index`. Returns (W, H, M, C). The
    forward is one batched matmul per query column on overlapping views of the windows (the
    multiply-adds of the direct sum, nothing copied); the weight gradient is one batched
    matmul against the maps skewed onto the window rows, with no overlap-add.
    """

    @staticmethod
    def forward(ctx, maps: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        cols, rows = maps.shape[:2]
        ctx.save_for_backward(
            maps if ctx.needs_input_grad[1] else None,
            windows if ctx.needs_input_grad[0] else None,
        )
        ys = [torch.bmm(maps[qc], _query_windows(windows, qc, rows)) for qc in range(cols)]
        return torch.stack(ys)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        maps, windows = ctx.saved_tensors
        grad = grad.contiguous()
        grad_maps = grad_windows = None
        if ctx.needs_input_grad[0]:
            cols, rows = grad.shape[:2]
            grad_maps = torch.stack(
                [
                    torch.bmm(grad[qc], _query_windows(windows, qc, rows).transpose(1, 2))
                    for qc in range(cols)
                ]
            )
        if ctx.needs_input_grad[1]:
            cols, rows, m, keys = maps.shape
            width = keys // rows
            # skewed[qc, qr, m, qr + kr', kc] = maps[qc, qr, m, (kr', kc)]: window rows
            skewed = maps.new_zeros(cols, rows, m, 2 * rows - 1, width)
            s = skewed.stride()
            if skewed.numel():
                skewed.as_strided(maps.shape, (s[0], s[1] + width, s[2], 1)).copy_(maps)
            skewed = skewed.view(cols, rows * m, (2 * rows - 1) * width)
            grad = grad.view(cols, rows * m, grad.shape[-1])
            grad_windows = torch.bmm(skewed.transpose(1, 2), grad)
        return grad_maps, grad_windows


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The lower-precision dtype autocast gives matmuls on ``device``, or None when it is off."""
    kind = device.type
    if not (torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)):
        return None
    return torch.get_autocast_dtype(kind)


@TEMPORAL_MODULES.register("temporal_cross_attn")
class TemporalCrossAttention(TemporalModule):
    """T-CA (eqs. 7-8): attention maps between adjacent frames, projected to C channels.

    For patch tokens only (the cls token gets no term), frame t's queries attend to frame t-1's
    keys (prev) and frame t+1's keys (next) with the backbone's own q/k; softmax over keys,
    averaged over heads. Each map is projected by a relative-position weight table of shape
    ((2H-1)(2W-1), C), one for prev and one for next, zero-initialised so the module starts as a
    no-op. The first frame has no prev term and the last no next term:
    ``out[t, q] = sum_k attn[t, q, k] * table[offset(q - k)]``.

    The projection never builds the (P, P, C) tensor ``table[offset(q - k)]`` (118 MB per call
    for ViT-B/16) nor scatters its gradient back. For a query column qc the weights of all keys
    of query row qr, ordered by (H-1-kr, kc), are H*W consecutive rows of one
    ((2H-1)*W, C) window gathered from the table (:func:`window_table_index`), starting at row
    qr*W. So each query column is one batched matmul over query rows on overlapping views of its
    window: the multiply-adds of the direct sum, with (W, (2H-1)*W, C) gathered weights. Its
    backward is a batched matmul against the maps skewed onto the window rows plus an
    ``index_add`` into the table; the maps themselves get a gradient only when q/k require one
    (finetune mode), never from a frozen backbone. Under autocast the maps and the gathered
    windows are cast once, as the matmul would cast them.

    With a frozen backbone the maps depend on the backbone alone, so the feature cache stores
    them (:func:`adjacent_attention`) and training calls :meth:`forward_maps`: the q.k products
    and softmaxes, about half of the module's time on the tiny backbone, run once per clip.

    Args:
        grid: patch grid (H, W) of the backbone.
        width: channels C.
    """

    label = "T-CA"
    reads = ("attn",)

    def __init__(self, *, grid: tuple[int, int], width: int) -> None:
        super().__init__()
        offsets = (2 * grid[0] - 1) * (2 * grid[1] - 1)
        self.grid = grid
        self.w_prev = nn.Parameter(torch.zeros(offsets, width))
        self.w_next = nn.Parameter(torch.zeros(offsets, width))
        self.register_buffer("window_index", window_table_index(grid).flatten(), persistent=False)
        self.register_buffer(
            "key_rows_reversed", torch.arange(grid[0] - 1, -1, -1), persistent=False
        )

    @classmethod
    def create(cls, geometry: TemporalGeometry) -> TemporalCrossAttention:
        return cls(grid=geometry.grid, width=geometry.width)

    def term(self, features: BlockFeatures) -> torch.Tensor:
        """From the cached maps when the features carry them, else from the queries and keys."""
        if features.attn is not None:
            return self.forward_maps(features.attn)
        return self(features.q, features.k)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Maps per-head queries and keys (N, T, L, H, D) to the T-CA term (N, T, L, C)."""
        self._check_tokens(q.shape[2])
        prev, nxt = _adjacent_maps(q, k)
        return self._combine(self._project(prev, self.w_prev), self._project(nxt, self.w_next))

    def forward_maps(self, attn: torch.Tensor) -> torch.Tensor:
        """The T-CA term (N, T, L, C) from precomputed maps (N, 2, T-1, P, P) of
        :func:`adjacent_attention` (what the feature cache holds for a frozen backbone)."""
        self._check_tokens(attn.shape[-1] + 1)
        return self._combine(
            self._project(attn[:, 0], self.w_prev), self._project(attn[:, 1], self.w_next)
        )

    def _check_tokens(self, length: int) -> None:
        h, w = self.grid
        if length != h * w + 1:
            raise ValueError(f"expected {h * w} patch tokens + cls, got {length} tokens")

    def _combine(self, prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        """Places the projected prev (frames 1..T-1) and next (frames 0..T-2) terms, both
        (grid columns, grid rows, N, T-1, C), into a zero (N, T, L, C) volume."""
        h, w = self.grid
        n, frames = prev.shape[2], prev.shape[3] + 1
        out = prev.new_zeros(n, frames, h * w + 1, prev.shape[-1])  # zero cls rows and edges
        patches = out[:, :, 1:].unflatten(2, (h, w))  # a view: (N, T, H, W, C)
        patches[:, 1:] += prev.permute(2, 3, 1, 0, 4)
        patches[:, :-1] += nxt.permute(2, 3, 1, 0, 4)
        return out

    def _project(self, attn: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Projects head-mean attention maps (N, T', P, P) with a weight table.

        Returns:
            (grid columns, grid rows, N, T', C).
        """
        h, w = self.grid
        n, frames = attn.shape[:2]
        attn = attn.to(table.dtype)
        maps = attn.unflatten(3, (h, w)).unflatten(2, (h, w))  # (N, T', qr, qc, kr, kc)
        maps = maps.permute(3, 2, 0, 1, 4, 5)  # (qc, qr, N, T', kr, kc)
        maps = maps.index_select(4, self.key_rows_reversed).reshape(w, h, n * frames, h * w)
        windows = table.index_select(0, self.window_index).view(w, (2 * h - 1) * w, -1)
        dtype = _autocast_dtype(windows.device)
        if windows.dtype == torch.float64:  # autocast leaves float64 alone
            dtype = None
        if dtype is not None:  # cast once here rather than per overlapping view in each matmul
            maps, windows = maps.to(dtype), windows.to(dtype)
        with torch.autocast(windows.device.type, enabled=False) if dtype else nullcontext():
            out = _WindowedProjection.apply(maps, windows)  # (qc, qr, M, C)
        return out.view(w, h, n, frames, table.shape[1])


def adjacent_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The attention maps T-CA reads, as the feature cache stores them.

    Args:
        q, k: per-head queries and keys (N, T, L, H, D) of one block, cls token first.

    Returns:
        (N, 2, T-1, P, P): ``[:, 0]`` frames 1..T-1 attending to their previous frame's
        patches, ``[:, 1]`` frames 0..T-2 attending to their next frame's; softmax over keys,
        mean over heads.
    """
    return torch.stack(_adjacent_maps(q, k), dim=1)


def _adjacent_maps(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = q[:, :, 1:], k[:, :, 1:]  # drop cls: (N, T, P, H, D)
    return _attention(q[:, 1:], k[:, :-1]), _attention(q[:, :-1], k[:, 1:])


def _attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Head-mean softmax attention (N, T', P, P) of q to k, both (N, T', P, heads, D)."""
    scale = q.shape[-1] ** -0.5
    logits = torch.matmul((q * scale).transpose(2, 3), k.permute(0, 1, 3, 4, 2))
    return logits.softmax(dim=-1).mean(dim=2)


def enabled_temporal_modules(cfg: DecoderConfig) -> list[tuple[str, type[TemporalModule]]]:
    """The registered temporal modules whose switch is on in ``cfg``, in registration order."""
    return [(name, module) for name, module in TEMPORAL_MODULES.items() if getattr(cfg, name)]


def create_temporal_modules(
    cfg: DecoderConfig, geometry: TemporalGeometry
) -> dict[str, TemporalModule | None]:
    """One decoder layer's temporal modules: every registered name, in registration order, with
    ``None`` for a module ``cfg`` switches off."""
    return {
        name: module.create(geometry) if getattr(cfg, name) else None
        for name, module in TEMPORAL_MODULES.items()
    }


def check_temporal_switches() -> None:
    """Checks that every registered temporal module has a switch in ``DecoderConfig`` and every
    switch a module.

    Raises:
        RuntimeError: naming each name without its counterpart and the file to edit.
    """
    switches = DecoderConfig.temporal_module_switches()
    here, schema = "evl_platform/models/temporal.py", "evl_platform/config/schema.py"
    problems = [
        f"temporal module {name!r} is registered in {here} but DecoderConfig has no switch for "
        f"it: add `{name}: TemporalModuleSwitch = False` to DecoderConfig in {schema}"
        for name, _ in TEMPORAL_MODULES.items()
        if name not in switches
    ] + [
        f"DecoderConfig.{name} in {schema} is a TemporalModuleSwitch but no temporal module is "
        f"registered under {name!r}: register one in {here} or make the field a plain bool"
        for name in switches
        if name not in TEMPORAL_MODULES
    ]
    if problems:
        raise RuntimeError("; ".join(problems))


check_temporal_switches()

"""EVL's local temporal modules (paper section 3.2): T-Conv, T-PE and T-CA.

Each takes the spatiotemporal feature volume of one backbone layer, (N, T, L, C) with the cls
token at ``L = 0``, and returns a term of the same shape that the decoder layer adds to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TemporalConv(nn.Module):
    """T-Conv (eq. 5): depthwise Conv1d over time, kernel 3, applied to every token.

    Args:
        width: channels C.
    """

    def __init__(self, *, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(width, width, kernel_size=3, padding=1, groups=width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, length, c = x.shape
        y = x.permute(0, 2, 3, 1).reshape(n * length, c, t)  # (N*L, C, T)
        y = self.conv(y)
        return y.view(n, length, c, t).permute(0, 3, 1, 2)  # (N, T, L, C)


class TemporalPositionalEmbedding(nn.Module):
    """T-PE (eq. 6): one learned C-vector per frame position, zero-initialised.

    Args:
        num_frames: frames T the embedding is learned for.
        width: channels C.
    """

    def __init__(self, *, num_frames: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(num_frames, width))  # (T, C)

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


class TemporalCrossAttention(nn.Module):
    """T-CA (eqs. 7-8): attention maps between adjacent frames, projected to C channels.

    For patch tokens only (the cls token gets no term), frame t's queries attend to frame t-1's
    keys (prev) and frame t+1's keys (next) with the backbone's own q/k; softmax over keys,
    averaged over heads. Each map is projected by a relative-position weight table of shape
    ((2H-1)(2W-1), C), one for prev and one for next, zero-initialised so the module starts as a
    no-op. The first frame has no prev term and the last no next term.

    Args:
        grid: patch grid (H, W) of the backbone.
        width: channels C.
    """

    def __init__(self, *, grid: tuple[int, int], width: int) -> None:
        super().__init__()
        offsets = (2 * grid[0] - 1) * (2 * grid[1] - 1)
        self.grid = grid
        self.w_prev = nn.Parameter(torch.zeros(offsets, width))
        self.w_next = nn.Parameter(torch.zeros(offsets, width))
        self.register_buffer("rel_index", relative_position_index(grid), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Maps per-head queries and keys (N, T, L, H, D) to the T-CA term (N, T, L, C)."""
        patches = self.grid[0] * self.grid[1]
        if q.shape[2] != patches + 1:
            raise ValueError(f"expected {patches} patch tokens + cls, got {q.shape[2]} tokens")
        q, k = q[:, :, 1:], k[:, :, 1:]  # drop cls: (N, T, P, H, D)
        prev = self._project(q[:, 1:], k[:, :-1], self.w_prev)  # frames 1..T-1: (N, T-1, P, C)
        nxt = self._project(q[:, :-1], k[:, 1:], self.w_next)  # frames 0..T-2: (N, T-1, P, C)
        out = F.pad(prev, (0, 0, 0, 0, 1, 0)) + F.pad(nxt, (0, 0, 0, 0, 0, 1))  # (N, T, P, C)
        return F.pad(out, (0, 0, 1, 0))  # zero row for cls: (N, T, L, C)

    def _project(self, q: torch.Tensor, k: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5
        attn = torch.einsum("ntqhd,ntkhd->ntqkh", q * scale, k)  # (N, T', P, P, H)
        attn = attn.softmax(dim=-2).mean(dim=-1)  # softmax over keys, mean over heads
        weights = table[self.rel_index]  # (P, P, C)
        return torch.einsum("ntqk,qkc->ntqc", attn.to(weights.dtype), weights)

"""Deterministic low-level init of the registered tiny random-init backbones.

A randomly initialised ViT hides an object's position and local structure under random
projections, so a decoder trained on its frozen features learns next to nothing on the
synthetic stand-ins. A pretrained CLIP starts from smooth, oriented low-frequency filters and a
position code that neighbouring patches share. The tiny backbones get a fixed stand-in for
both, and its blocks' attention compares content, while the rest of the blocks stays seeded
random:

- patch embedding: an orthonormal 2D DCT basis on an opponent-colour transform (luminance,
  red-green, yellow-blue), lowest frequencies first, luminance before colour;
- positional embedding: a 2D sin-cos code (zero for the class token), scaled so that position
  is as visible to the blocks as patch content is;
- attention queries and keys: ``QK_SCALE`` times the projection that removes the directions
  holding most of the position code (``POSITION_ENERGY`` of its variance over the patches),
  so a patch attends to the patches that look like it, wherever they are. With seeded random
  queries and keys the attention between adjacent frames, which T-CA reads, is nearly uniform
  (peak weight 0.02-0.03 against 1/64), and a zero-initialised T-CA cannot learn from it in the
  local schedule; pretrained CLIP's attention follows objects from frame to frame. Values,
  output projections and MLPs stay seeded random.
"""

from __future__ import annotations

import math

import torch
from open_clip.transformer import VisionTransformer

__all__ = [
    "DCT_SINCOS",
    "content_projection",
    "dct_patch_filters",
    "init_dct_sincos",
    "sincos_position_embedding",
]

DCT_SINCOS = "dct-sincos-v2"
"""Name of this init, part of the frozen-feature cache key (bump it when the init changes)."""

POSITION_SCALE = 3.0
"""Size of the sin-cos code relative to its unit-amplitude entries."""

QK_SCALE = 8.0
"""Scale of the content-matching query and key projections (sharpness of the attention)."""

POSITION_ENERGY = 0.9
"""Share of the position code's variance whose directions the queries and keys ignore."""

# Opponent colour axes (rows), normalised: luminance, red-green, yellow-blue.
_COLOUR_AXES = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 1.0, -2.0]])
_COLOUR_PENALTY = 2.0  # a colour component ranks with luminance components 2 frequencies higher


def dct_patch_filters(width: int, patch: int) -> torch.Tensor:
    """The ``width`` lowest-frequency orthonormal DCT-II colour filters of a square patch.

    Returns:
        (width, 3, patch, patch) conv weights, orthonormal when flattened.
    """
    n = torch.arange(patch, dtype=torch.float64)
    basis_1d = torch.stack(
        [torch.cos((2 * n + 1) * u * math.pi / (2 * patch)) for u in range(patch)]
    )  # (u, x)
    basis_1d[0] /= math.sqrt(2.0)
    basis_1d *= math.sqrt(2.0 / patch)
    axes = (_COLOUR_AXES / _COLOUR_AXES.norm(dim=1, keepdim=True)).double()
    order = sorted(
        (u + v + (_COLOUR_PENALTY if c else 0.0), c, u, v)
        for c in range(3)
        for u in range(patch)
        for v in range(patch)
    )
    if width > len(order):
        raise ValueError(f"a {patch}x{patch} colour patch has only {len(order)} DCT filters")
    filters = [
        axes[c][:, None, None] * (basis_1d[u][:, None] * basis_1d[v][None, :])[None]
        for _, c, u, v in order[:width]
    ]
    return torch.stack(filters).float()


def sincos_position_embedding(grid: tuple[int, int], width: int) -> torch.Tensor:
    """2D sin-cos position code of a ``grid`` of patches, a zero row first (class token).

    Returns:
        (1 + H*W, width): a quarter of the channels each for sin/cos of the row and column.
    """
    rows, cols = grid
    y, x = torch.meshgrid(
        torch.arange(rows, dtype=torch.float32),
        torch.arange(cols, dtype=torch.float32),
        indexing="ij",
    )
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = []
    for pos in (y.flatten(), x.flatten()):
        angle = pos[:, None] * omega[None]  # (H*W, width/4)
        parts += [angle.sin(), angle.cos()]
    code = torch.cat(parts, dim=1)
    code = torch.cat([code, code.new_zeros(code.shape[0], width - code.shape[1])], dim=1)
    return torch.cat([code.new_zeros(1, width), code])


def content_projection(code: torch.Tensor, energy: float = POSITION_ENERGY) -> torch.Tensor:
    """The orthogonal projection that removes the leading directions of a position code.

    Args:
        code: (1 + P, C) position embedding, class token first.
        energy: the share of the patches' position variance whose directions are removed
            (the fewest leading principal directions that reach it).

    Returns:
        (C, C) symmetric projection matrix.
    """
    patches = code[1:].double()
    centred = patches - patches.mean(dim=0)
    basis, singular, _ = torch.linalg.svd(centred.T, full_matrices=False)  # (C, k)
    share = (singular**2).cumsum(0) / (singular**2).sum()
    removed = int((share < energy).sum()) + 1
    position = basis[:, :removed]
    return (torch.eye(code.shape[1], dtype=torch.float64) - position @ position.T).float()


@torch.no_grad()
def init_dct_sincos(visual: VisionTransformer) -> None:
    """Overwrites ``visual``'s patch and position embeddings with the fixed DCT / sin-cos init,
    and its blocks' query and key projections with the content-matching one."""
    conv = visual.conv1
    if conv.weight.is_meta:  # shapes only (model info): there are no values to set
        return
    width, _, patch, _ = conv.weight.shape
    with torch.device("cpu"):  # whatever default device the model is being built under
        filters = dct_patch_filters(width, patch)
        code = sincos_position_embedding(tuple(visual.grid_size), width) * POSITION_SCALE
        qk = QK_SCALE * content_projection(code)
    conv.weight.copy_(filters.to(conv.weight.device))
    if conv.bias is not None:
        conv.bias.zero_()
    visual.positional_embedding.copy_(code.to(conv.weight.device))
    qk = qk.to(conv.weight.device)
    for block in visual.transformer.resblocks:
        attn = block.attn  # in_proj rows: queries, keys, values
        attn.in_proj_weight[: 2 * width] = torch.cat([qk, qk])
        attn.in_proj_bias[: 2 * width] = 0.0

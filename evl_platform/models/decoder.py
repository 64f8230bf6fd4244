"""The EVL Transformer decoder (paper eqs. 1-4): one learned query reads backbone features.

Decoder layer i modulates the features of backbone block ``feature_layers[i]`` with its
temporal modules, ``Y = X + T-Conv(X) + T-PE + T-CA(q, k)``, reduces them to key/value tokens
(Table 6c feature shape), and refines the query with a pre-norm cross-attention block.
An ablated temporal module is ``None``. The layer knows its temporal modules only through
:class:`~evl_platform.models.temporal.TemporalModule` (``term``, ``reads``), so a new one
needs no change here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from evl_platform.config.schema import FeatureShape
from evl_platform.models.backbone import BlockFeatures
from evl_platform.models.temporal import TemporalModule
from evl_platform.registry import Registry

FeatureReducer = Callable[[torch.Tensor], torch.Tensor]
FEATURE_SHAPES: Registry[FeatureReducer] = Registry("feature shape")
"""Reducers by ``model.decoder.feature_shape``; the names are ``FeatureShape``'s (checked below)."""


@FEATURE_SHAPES.register("spatiotemporal")
def spatiotemporal(y: torch.Tensor) -> torch.Tensor:
    """Every token of every frame: (N, T, L, C) -> (N, T*L, C)."""
    return y.flatten(1, 2)


@FEATURE_SHAPES.register("temporal_token")
def temporal_token(y: torch.Tensor) -> torch.Tensor:
    """Temporal only, per-frame cls token: (N, T, L, C) -> (N, T, C)."""
    return y[:, :, 0]


@FEATURE_SHAPES.register("temporal_avg")
def temporal_avg(y: torch.Tensor) -> torch.Tensor:
    """Temporal only, per-frame mean of the patch tokens: (N, T, L, C) -> (N, T, C)."""
    return y[:, :, 1:].mean(dim=2)


@FEATURE_SHAPES.register("spatial_avg")
def spatial_avg(y: torch.Tensor) -> torch.Tensor:
    """Spatial only, mean over time: (N, T, L, C) -> (N, L, C)."""
    return y.mean(dim=1)


FEATURE_SHAPES.check_names(FeatureShape, literal_name="FeatureShape", module=__name__)


class QuickGELU(nn.Module):
    """CLIP's sigmoid approximation of GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class DecoderAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections (query and key counts differ).

    The projections are the usual ``k = W_k x + b_k`` and ``v = W_v x + b_v`` of every key
    token, but they are applied on the query side, which gives the same result: per head
    ``q_h . k_j = (W_k,h^T q_h) . x_j + q_h . b_k,h``, and since a head's attention weights sum
    to one, ``sum_j a_j v_j = W_v,h (sum_j a_j x_j) + b_v,h``. The decoder has one query
    against thousands of key tokens (T x L), so this costs about ``2 Lk C H`` multiply-adds per
    query instead of ``2 Lk C^2`` and keeps no (N, Lk, C) keys or values for the backward pass.
    The parameters are those of the plain form (and of the official checkpoints). Setting
    ``query_side = False`` runs the plain form, which model info counts (the paper's GFLOPs
    are those of the plain form).

    Args:
        width: channels C of queries, keys and values.
        num_heads: attention heads.
    """

    query_side = True

    def __init__(self, *, width: int, num_heads: int) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"model.decoder.num_heads: {num_heads} does not divide width {width}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Maps queries (N, Lq, C) attending to ``context`` tokens (N, Lk, C) to (N, Lq, C)."""
        n, lq, c = query.shape
        heads = self.num_heads
        d = c // heads
        q = self.q_proj(query).view(n, lq, heads, d) * d**-0.5  # (N, Lq, H, D)
        if not self.query_side:
            k = self.k_proj(context).unflatten(-1, (heads, d))  # (N, Lk, H, D)
            v = self.v_proj(context).unflatten(-1, (heads, d))
            attn = torch.einsum("nqhd,nkhd->nqkh", q, k).softmax(dim=-2)
            mixed = torch.einsum("nqkh,nkhd->nqhd", attn, v)
            return self.out_proj(mixed.flatten(-2))
        w_k = self.k_proj.weight.view(heads, d, c)  # head h's rows of W_k: (H, D, C)
        w_v = self.v_proj.weight.view(heads, d, c)
        q_in = torch.einsum("nqhd,hdc->nqhc", q, w_k)  # the queries in input space
        bias = torch.einsum("nqhd,hd->nqh", q, self.k_proj.bias.view(heads, d))
        logits = torch.einsum("nqhc,nkc->nqkh", q_in, context) + bias.unsqueeze(2)
        attn = logits.softmax(dim=-2)  # (N, Lq, Lk, H)
        pooled = torch.einsum("nqkh,nkc->nqhc", attn, context)  # attention-weighted inputs
        mixed = torch.einsum("nqhc,hdc->nqhd", pooled, w_v) + self.v_proj.bias.view(heads, d)
        return self.out_proj(mixed.flatten(-2))  # (N, Lq, C)


class DecoderBlock(nn.Module):
    """``q = q + MHA(LN1(q), LN3(Y), LN3(Y)); q = q + MLP(LN2(q))`` (no self-attention).

    Args:
        width: channels C.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / C.
        mlp_dropout: dropout after the MLP activation.
    """

    def __init__(self, *, width: int, num_heads: int, mlp_ratio: float, mlp_dropout: float):
        super().__init__()
        hidden = round(mlp_ratio * width)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.norm3 = nn.LayerNorm(width)
        self.attn = DecoderAttention(width=width, num_heads=num_heads)
        self.mlp = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(width, hidden),
                act=QuickGELU(),
                dropout=nn.Dropout(mlp_dropout),
                fc2=nn.Linear(hidden, width),
            )
        )
        for linear in (self.mlp.fc1, self.mlp.fc2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.normal_(linear.bias, std=1e-6)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        context = self.norm3(tokens)
        query = query + self.attn(self.norm1(query), context)
        return query + self.mlp(self.norm2(query))


class EVLDecoderLayer(nn.Module):
    """Temporal modulation of one backbone layer's features, then one decoder block.

    Args:
        block: the cross-attention block.
        reduce: feature-shape reducer, (N, T, L, C) -> (N, S, C).
        **temporal: temporal modules by registered name (``temporal_conv=TemporalConv(...)``),
            their terms added in this order; an ablated module is ``None``. Each becomes the
            attribute (and parameter prefix) of its name.
    """

    def __init__(
        self, *, block: DecoderBlock, reduce: FeatureReducer, **temporal: TemporalModule | None
    ) -> None:
        super().__init__()
        self.block = block
        self.reduce = reduce
        for name, module in temporal.items():
            self.add_module(name, module)
        self.temporal_names = tuple(name for name, module in temporal.items() if module is not None)

    @property
    def reads(self) -> frozenset[str]:
        """Backbone tensors the temporal modules read besides the block output (``attn``)."""
        return frozenset(kind for name in self.temporal_names for kind in getattr(self, name).reads)

    def forward(self, query: torch.Tensor, features: BlockFeatures) -> torch.Tensor:
        y = features.out  # (N, T, L, C); summed out of place: layers may share a backbone block
        for name in self.temporal_names:
            y = y + getattr(self, name).term(features)
        return self.block(query, self.reduce(y))


class EVLDecoder(nn.Module):
    """A zero-initialised query token refined by M decoder layers.

    Args:
        layers: decoder layers, in order.
        width: channels C.
    """

    def __init__(self, *, layers: Sequence[EVLDecoderLayer], width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.query = nn.Parameter(torch.zeros(width))

    @property
    def uses_qk(self) -> bool:
        """Whether any layer's temporal modules read the attention between adjacent frames,
        which the backbone computes from its queries and keys."""
        return any("attn" in layer.reads for layer in self.layers)

    def forward(self, features: Sequence[BlockFeatures]) -> torch.Tensor:
        """Maps one :class:`BlockFeatures` (N, T, L, C) per layer to the query (N, C)."""
        if len(features) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} feature maps, got {len(features)}")
        n = features[0].out.shape[0]
        query = self.query.view(1, 1, -1).expand(n, 1, -1)  # (N, 1, C)
        for layer, feats in zip(self.layers, features, strict=True):
            query = layer(query, feats)
        return query[:, 0]

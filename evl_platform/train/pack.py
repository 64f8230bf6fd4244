"""A pack: several decoders trained on one frozen backbone in one worker loop.

A sweep packs variants whose backbone-side inputs are identical (see
:mod:`evl_platform.sweep.packs`). Their worker builds the backbone once and each member's
decoder and head around it, each initialised exactly as if it trained alone (same seed, same
RNG draws), and keeps each member's RNG state for its dropout draws. Per batch,
:class:`SharedBackbone` runs the frozen backbone once up to the deepest block any member
reads and keeps the union of what they read: block outputs and, for T-CA, the attention maps
between adjacent frames, computed once from the backbone's queries and keys for every member
that reads them (as the feature cache stores them), block by block as the backbone produces
them; on the feature cache, the source reads
that union instead. Each member then selects its own blocks
(:meth:`~evl_platform.models.EVL.select_features`) and takes its step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from evl_platform.config import ExperimentConfig, flatten_config
from evl_platform.features.key import FeatureRead, feature_reads
from evl_platform.models import (
    EVL,
    BlockFeatures,
    ClipBackbone,
    adjacent_attention,
    create_backbone,
    create_model,
    evl_on,
    extract_blocks,
)
from evl_platform.train.batch import Inputs, autocast, to_device
from evl_platform.train.loop import RngState
from evl_platform.train.step import amp_dtype


class SharedBackbone:
    """Runs the frozen backbone once per batch for every member of a pack.

    Args:
        backbone: the frozen backbone the members share.
        blocks: every block index any member reads.
        maps: the blocks whose T-CA maps a member reads (their queries and keys become
            :func:`~evl_platform.models.adjacent_attention` maps, computed once per batch).
        device: where the backbone runs.
        amp: the autocast dtype (``None``: full precision).
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        blocks: tuple[int, ...],
        *,
        maps: tuple[int, ...],
        device: torch.device,
        amp: torch.dtype | None,
    ) -> None:
        self.backbone, self.blocks, self.maps = backbone, blocks, maps
        self.device, self.amp = device, amp

    def __call__(self, inputs: Inputs) -> dict[int, BlockFeatures]:
        """Block index -> features: from clips by one backbone pass, or (feature cache) as
        read, moved to the device."""
        inputs = to_device(inputs, self.device)
        if not isinstance(inputs, torch.Tensor):
            return inputs  # the cache's union of blocks
        with torch.no_grad(), autocast(self.device, self.amp):
            return extract_blocks(
                self.backbone,
                inputs,
                self.blocks,
                with_qk=bool(self.maps),
                on_block=self.keep,
            )

    def keep(self, index: int, block: BlockFeatures) -> BlockFeatures:
        """What the pack keeps of a block as the backbone produces it: its output, and for a
        block in :attr:`maps` its T-CA maps in place of its queries and keys (so at most one
        block's queries and keys are alive during the pass)."""
        if index not in self.maps:
            return BlockFeatures(block.out)
        assert block.q is not None and block.k is not None
        return BlockFeatures(block.out, attn=adjacent_attention(block.q, block.k))


@dataclass
class BuiltPack:
    """The models of a worker and how they share the backbone.

    Attributes:
        models: member key -> its model, on the device.
        rngs: member key -> its RNG state after its initialisation (empty for one member,
            which uses the process's RNG).
        shared: the shared backbone pass (``None`` for one member).
        select: member key -> picks its decoder's inputs from ``shared``'s result.
        reads: the ``(block, kind)`` pairs the members read together from the feature cache.
    """

    models: dict[str, torch.nn.Module]
    rngs: dict[str, RngState] = field(default_factory=dict)
    shared: SharedBackbone | None = None
    select: dict[str, Callable[[Any], Inputs]] | None = None
    reads: tuple[FeatureRead, ...] = ()


def init_seed(cfg: ExperimentConfig, rank: int) -> int:
    """The torch seed a worker initialises its model(s) with."""
    return cfg.seed * 1000 + rank


def build_pack(
    cfgs: Mapping[str, ExperimentConfig], *, device: torch.device, rank: int
) -> BuiltPack:
    """The models of ``cfgs`` (one, or a pack's members, which :func:`check_packable`
    accepts), each initialised as if it trained alone."""
    lead = next(iter(cfgs.values()))
    load_weights = not lead.features.reuse
    torch.manual_seed(init_seed(lead, rank))
    if len(cfgs) == 1:
        [(key, cfg)] = cfgs.items()
        return BuiltPack({key: create_model(cfg, load_weights=load_weights).to(device)})
    check_packable(cfgs)
    backbone = create_backbone(lead.model.backbone, load_weights=load_weights).to(device)
    after_backbone = torch.get_rng_state()
    models: dict[str, EVL] = {}
    rngs = {}
    for key, cfg in cfgs.items():
        torch.set_rng_state(after_backbone)  # the draws a lone run makes after its backbone
        models[key] = evl_on(backbone, cfg).to(device)
        rngs[key] = RngState.capture(device)
    blocks = tuple(sorted({i for m in models.values() for i in m.feature_layers}))
    reads = tuple(sorted({r for cfg in cfgs.values() for r in feature_reads(cfg)}))
    shared = SharedBackbone(
        backbone,
        blocks,
        maps=tuple(
            sorted({i for m in models.values() if m.decoder.uses_qk for i in m.feature_layers})
        ),
        device=device,
        amp=amp_dtype(lead.train, device),
    )
    select = {key: model.select_features for key, model in models.items()}
    return BuiltPack(dict(models), rngs, shared, select, reads)


def check_packable(cfgs: Mapping[str, ExperimentConfig]) -> None:
    """Refuses members that cannot share one frozen backbone pass.

    Raises:
        ValueError: a member is not an EVL model on a frozen backbone, or differs from the
            first member outside the decoder, the head and its optimisation
            (:func:`pack_differences`; the message names the field).
    """
    lead_key, lead = next(iter(cfgs.items()))
    for key, cfg in cfgs.items():
        blocker = pack_blocker(cfg)
        if blocker is not None:
            raise ValueError(f"pack member {key} cannot share a backbone pass: {blocker}")
        differs = pack_differences(lead, cfg)
        if differs:
            raise ValueError(
                f"pack members {lead_key} and {key} differ in {differs[0]}, which the "
                "members of a pack share"
            )


def pack_blocker(cfg: ExperimentConfig) -> str | None:
    """Why a trial cannot share a backbone pass with others; ``None`` if it can."""
    if cfg.model.arch != "evl":
        return f"model.arch is {cfg.model.arch}"
    if cfg.model.backbone.mode != "frozen":
        return f"model.backbone.mode is {cfg.model.backbone.mode}"
    return None


def pack_differences(a: ExperimentConfig, b: ExperimentConfig) -> list[str]:
    """The backbone-side config fields (not :func:`is_member_field`) in which two configs
    differ; none: they may share a pack."""
    left, right = flatten_config(a), flatten_config(b)
    return [
        key
        for key in sorted(left.keys() | right.keys())
        if not is_member_field(key) and left.get(key) != right.get(key)
    ]


MEMBER_PREFIXES = ("model.decoder.", "model.head.")
MEMBER_KEYS = ("name", "train.lr", "train.weight_decay", "train.warmup_steps")
"""Config fields that may differ between the members of a pack: the decoder and head, their
optimisation, and the name. Everything else (backbone and weights, dtype, data, frames,
sampling, views, augmentation, batch size, steps, seed, feature cache) is shared."""


def is_member_field(key: str) -> bool:
    """Whether a flattened config key may differ within a pack."""
    return key.startswith(MEMBER_PREFIXES) or key in MEMBER_KEYS

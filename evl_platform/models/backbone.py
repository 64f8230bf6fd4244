"""CLIP image encoder adapter over open_clip's ``VisionTransformer``.

The weights and modules are open_clip's; the forward is ours, so that every block exposes its
output (before ``ln_post``) and its attention queries and keys, computed once from the block's own
``in_proj`` on ``ln_1(input)``. :meth:`ClipBackbone.forward` reproduces open_clip's ``visual(x)``.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from evl_platform.config.schema import BackboneConfig, is_weights_path
from evl_platform.models.pixels import normalize_pixels
from evl_platform.models.tiny_init import DCT_SINCOS, init_dct_sincos
from evl_platform.registry import Registry

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class BackboneSpec:
    """Architecture of a ViT image encoder in open_clip's terms.

    Attributes:
        vision_cfg: keyword arguments of open_clip's ``CLIPVisionCfg``.
        embed_dim: width of the final projection (the CLIP embedding).
        init: random init when no weights are loaded: ``open_clip`` (its own seeded init) or
            ``dct-sincos-v2`` (seeded blocks with content-matching queries and keys, fixed DCT
            patch and sin-cos position embeddings, see :mod:`evl_platform.models.tiny_init`).
            Part of the feature cache key.
    """

    vision_cfg: dict
    embed_dim: int
    init: str = "open_clip"

    @property
    def image_size(self) -> int:
        """Input size in pixels (square): the size of the clips the data pipeline makes, for
        every model family (a 3D CNN takes the size of the configured backbone too)."""
        size = self.vision_cfg["image_size"]
        return size if isinstance(size, int) else size[0]


BACKBONES: Registry[BackboneSpec] = Registry("backbone")
# Tiny random-init encoders for the CPU `local` profile and for tests: 8x8 and 4x4 patch
# grids, 4 and 2 heads of width 16. Their patch and position embeddings get a fixed DCT /
# sin-cos init (a stand-in for pretrained CLIP's low-level filters), their blocks stay random.
BACKBONES.add(
    "tiny-vit",
    BackboneSpec(
        dict(image_size=64, patch_size=8, width=64, layers=4, head_width=16),
        embed_dim=64,
        init=DCT_SINCOS,
    ),
)
BACKBONES.add(
    "micro-vit",
    BackboneSpec(
        dict(image_size=32, patch_size=8, width=32, layers=3, head_width=16),
        embed_dim=32,
        init=DCT_SINCOS,
    ),
)


def backbone_spec(name: str) -> BackboneSpec:
    """Resolves a registered backbone or any open_clip ViT model name (``ViT-B-16``)."""
    if name in BACKBONES:
        return BACKBONES.get(name)
    config = open_clip.get_model_config(name)
    vision = (config or {}).get("vision_cfg", {})
    if not config or "timm_model_name" in vision or not isinstance(vision.get("layers"), int):
        known = ", ".join(BACKBONES)
        raise ValueError(
            f"model.backbone.name: {name!r} is neither a registered backbone ({known}) "
            "nor an open_clip ViT model name such as 'ViT-B-16'"
        )
    return BackboneSpec(dict(vision), embed_dim=config["embed_dim"])


@dataclass
class BlockFeatures:
    """What one backbone block exposes for a batch of images.

    Attributes:
        out: block output, before ``ln_post``: (B, L, C).
        q: attention queries of the block, per head: (B, L, H, D), or ``None``.
        k: attention keys of the block, per head: (B, L, H, D), or ``None``.
        attn: T-CA's attention maps between adjacent frames, (N, 2, T-1, P, P) from
            :func:`~evl_platform.models.temporal.adjacent_attention`, in place of ``q``/``k``
            (cached features of a frozen backbone), or ``None``.
    """

    out: torch.Tensor
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    attn: torch.Tensor | None = None


BlockHook = Callable[[int, BlockFeatures], BlockFeatures]
"""Called with a block's index and features as the backbone produces them; returns what to
keep (see :meth:`ClipBackbone.forward_features`)."""


class ClipBackbone(nn.Module):
    """A CLIP ViT image encoder, frozen or finetuned.

    Frozen: the encoder stays in ``eval()`` whatever mode its parent is put in, holds no
    ``requires_grad`` parameters, and runs without building an autograd graph.

    ``forward_images`` counts the images this encoder has run on (frozen-feature reuse is
    checked by it staying at zero).

    Args:
        visual: an open_clip ``VisionTransformer`` with standard residual attention blocks.
        mode: ``frozen`` or ``finetune``.
        dtype: parameter and compute dtype of a frozen encoder.
    """

    def __init__(
        self, *, visual: VisionTransformer, mode: str = "frozen", dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        _check_supported(visual)
        self.visual = visual
        self.trainable = mode == "finetune"
        self.forward_images = 0
        if not self.trainable:
            self.visual.requires_grad_(False)
            self.visual.to(dtype)
        self.train(False)

    @property
    def width(self) -> int:
        return self.visual.class_embedding.shape[-1]

    @property
    def num_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def num_heads(self) -> int:
        return self.visual.transformer.resblocks[0].attn.num_heads

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.visual.grid_size)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.visual.image_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.class_embedding.dtype

    def freeze_unused(self, deepest: int) -> None:
        """Stops training what the decoder never reads: blocks after ``deepest`` and the
        CLIP head (``ln_post``, ``proj``). Without this, a finetuned backbone would hold
        parameters without gradients, which DDP rejects."""
        unused = [self.visual.ln_post, *self.visual.transformer.resblocks[deepest + 1 :]]
        for module in unused:
            module.requires_grad_(False)
        if self.visual.proj is not None:
            self.visual.proj.requires_grad_(False)

    def train(self, mode: bool = True) -> ClipBackbone:
        """Sets train mode; a frozen backbone always stays in eval mode."""
        return super().train(mode and self.trainable)

    def forward_features(
        self,
        images: torch.Tensor,
        layers: Sequence[int],
        *,
        with_qk: bool = False,
        on_block: BlockHook | None = None,
    ) -> dict[int, BlockFeatures]:
        """Runs the encoder up to the deepest requested block.

        Args:
            images: (B, 3, H, W) uint8 images (normalised here, on their device) or
                normalised float images.
            layers: non-negative block indices to return.
            with_qk: also return each requested block's attention queries and keys.
            on_block: called with each requested block's index and features as soon as the
                block has run, before the next one starts; what it returns is kept in their
                place (so a caller can turn queries and keys into something smaller while at
                most one block's are alive).

        Returns:
            Block index -> :class:`BlockFeatures` (or what ``on_block`` made of them), in the
            backbone's dtype.
        """
        wanted = set(layers)
        found: dict[int, BlockFeatures] = {}
        self.forward_images += images.shape[0]
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            pixels = normalize_pixels(images, channel_dim=-3)
            x = self.visual._embeds(pixels.to(self.dtype))  # (B, L, C)
            for index, block in enumerate(self.visual.transformer.resblocks):
                if not wanted.difference(found):
                    break
                x, q, k = _block_forward(block, x, training=self.training)
                if index in wanted:
                    features = BlockFeatures(x, q, k) if with_qk else BlockFeatures(x)
                    found[index] = features if on_block is None else on_block(index, features)
                    del features
                del q, k  # not alive while the next block runs
        return found

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The CLIP image embedding, equal to open_clip's ``visual(images)``."""
        last = self.num_layers - 1
        tokens = self.forward_features(images, [last])[last].out
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            pooled, _ = self.visual._pool(tokens)
            return pooled @ self.visual.proj if self.visual.proj is not None else pooled


def _block_forward(
    block: ResidualAttentionBlock, x: torch.Tensor, *, training: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pre-norm residual attention block, keeping the per-head q and k it computes."""
    attn = block.attn
    batch, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (B, L, 3C)
    q, k, v = qkv.view(batch, length, 3, heads, width // heads).unbind(2)  # (B, L, H, D) each
    mixed = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        dropout_p=attn.dropout if training else 0.0,
    )  # (B, H, L, D)
    mixed = attn.out_proj(mixed.transpose(1, 2).reshape(batch, length, width))
    x = x + block.ls_1(mixed)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, q, k


def _check_supported(visual: nn.Module) -> None:
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", [])
    problems = []
    if not isinstance(visual, VisionTransformer):
        problems.append(f"{type(visual).__name__} is not an open_clip VisionTransformer")
    elif not visual.transformer.batch_first:
        problems.append("its transformer is not batch-first")
    elif visual.attn_pool is not None:
        problems.append("it uses an attentional pooler")
    elif not all(isinstance(b, ResidualAttentionBlock) for b in blocks):
        problems.append("its blocks are not standard ResidualAttentionBlocks")
    elif any(hasattr(b, "ln_1_kv") for b in blocks):
        problems.append("its blocks use cross-attention")
    if problems:
        raise ValueError(f"model.backbone.name: unsupported backbone: {problems[0]}")


def create_backbone(cfg: BackboneConfig, *, load_weights: bool = True) -> ClipBackbone:
    """Builds the image encoder described by ``cfg``.

    Args:
        cfg: backbone configuration.
        load_weights: load ``cfg.pretrained``; ``False`` keeps the seeded random init (enough
            for parameter and FLOP counts).
    """
    spec = backbone_spec(cfg.name)
    pretrained = cfg.pretrained if load_weights else None
    if pretrained is not None and not is_weights_path(pretrained):
        visual = _load_open_clip_pretrained(cfg, pretrained)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            visual = _build_vision_tower(
                spec.embed_dim, CLIPVisionCfg(**spec.vision_cfg), quick_gelu=cfg.quick_gelu
            )
        if spec.init == DCT_SINCOS:
            init_dct_sincos(visual)
        if pretrained is not None:
            visual.load_state_dict(load_visual_state_dict(pretrained))
    return ClipBackbone(visual=visual, mode=cfg.mode, dtype=_DTYPES[cfg.dtype])


def _load_open_clip_pretrained(cfg: BackboneConfig, tag: str) -> VisionTransformer:
    """The image encoder of open_clip's ``cfg.name`` with its ``tag`` weights (e.g. openai)."""
    key = "model.backbone.pretrained"
    if cfg.name in BACKBONES:
        raise ValueError(
            f"{key}: {tag!r} is an open_clip weights tag, but {cfg.name!r} is a registered "
            "random-init backbone; use null or a local weights file"
        )
    tags = open_clip.list_pretrained_tags_by_model(cfg.name)
    if tag not in tags:
        raise ValueError(
            f"{key}: no open_clip weights {tag!r} for {cfg.name} "
            f"(available: {', '.join(tags) or 'none'}; or give a local weights file)"
        )
    try:
        model = open_clip.create_model(cfg.name, pretrained=tag, force_quick_gelu=cfg.quick_gelu)
    except RuntimeError as err:
        reason = str(err).split(". ")[0]
        raise ValueError(
            f"{key}: could not load open_clip weights {tag!r} for {cfg.name} ({reason}); "
            "run once with network access to fill the cache, or give a local weights file"
        ) from err
    return model.visual


def load_visual_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads the image-encoder weights from a local CLIP checkpoint.

    Accepts open_clip / OpenAI state dicts (``visual.*`` keys or the bare encoder), optionally
    wrapped in ``{"state_dict": ...}``, as ``torch.save`` files (loaded with
    ``weights_only=True``), safetensors files, or OpenAI's TorchScript archives.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.backbone.pretrained: weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif _is_torchscript(path):
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    if any(key.startswith("visual.") for key in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    return {k.removeprefix("module."): v.float() for k, v in state.items()}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())

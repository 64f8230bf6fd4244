"""The EVL video classifier: CLIP backbone -> temporal decoder -> linear head; and
``create_model``, which builds the family that ``model.arch`` names (``MODEL_BUILDERS``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from evl_platform.config.schema import DecoderConfig, ExperimentConfig, ModelArch
from evl_platform.models.backbone import BlockFeatures, BlockHook, ClipBackbone, create_backbone
from evl_platform.models.cnn3d import Cnn3d, create_cnn3d
from evl_platform.models.decoder import FEATURE_SHAPES, DecoderBlock, EVLDecoder, EVLDecoderLayer
from evl_platform.models.temporal import TemporalGeometry, create_temporal_modules
from evl_platform.registry import Registry


class ClassificationHead(nn.Module):
    """LayerNorm -> Dropout -> Linear(C, classes).

    Args:
        width: channels C.
        num_classes: output classes.
        dropout: dropout before the linear layer.
    """

    def __init__(self, *, width: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.norm(x)))


class EVL(nn.Module):
    """Frozen (or finetuned) CLIP features -> EVL decoder -> class logits.

    Args:
        backbone: the image encoder.
        decoder: the temporal Transformer decoder.
        head: the classification head.
        feature_layers: non-negative backbone block index read by each decoder layer.
    """

    def __init__(
        self,
        *,
        backbone: ClipBackbone,
        decoder: EVLDecoder,
        head: ClassificationHead,
        feature_layers: Sequence[int],
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.head = head
        self.feature_layers = tuple(feature_layers)

    def extract_features(self, video: torch.Tensor) -> list[BlockFeatures]:
        """Runs the backbone on every frame.

        Args:
            video: (N, 3, T, H, W) clips, uint8 or normalised float.

        Returns:
            One :class:`BlockFeatures` per decoder layer, in :func:`feature_dtype`: ``out``
            (N, T, L, C) and, when T-CA is used, ``q``/``k`` (N, T, L, heads, head_dim).
        """
        blocks = extract_blocks(
            self.backbone, video, self.feature_layers, with_qk=self.decoder.uses_qk
        )
        return self.select_features(blocks)

    def select_features(self, blocks: dict[int, BlockFeatures]) -> list[BlockFeatures]:
        """The features of the blocks this model's decoder layers read, in layer order, from
        features of (at least) those blocks (:func:`extract_blocks`)."""
        return [blocks[index] for index in self.feature_layers]

    def classify(self, features: Sequence[BlockFeatures]) -> torch.Tensor:
        """Decoder + head on precomputed features (see :meth:`extract_features`)."""
        return self.head(self.decoder(features))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Maps (N, 3, T, H, W) clips to (N, classes) logits."""
        return self.classify(self.extract_features(video))

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters EVL adds on top of the backbone (decoder, temporal modules, head)."""
        return [*self.decoder.parameters(), *self.head.parameters()]

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the frames the backbone takes."""
        return self.backbone.image_size

    @property
    def forward_images(self) -> int:
        """Images the backbone has run on (stays 0 while training on cached features)."""
        return self.backbone.forward_images


def extract_blocks(
    backbone: ClipBackbone,
    video: torch.Tensor,
    layers: Sequence[int],
    *,
    with_qk: bool,
    on_block: BlockHook | None = None,
) -> dict[int, BlockFeatures]:
    """Block index -> features of ``video`` (N, 3, T, H, W) for every block in ``layers``:
    ``out`` (N, T, L, C) and, with ``with_qk``, ``q``/``k`` (N, T, L, heads, head_dim), in
    :func:`feature_dtype`. One backbone pass serves every decoder that reads any of these
    blocks. ``on_block`` (see :meth:`ClipBackbone.forward_features`) gets each block's
    features in this form as soon as the block has run."""
    n, _, t = video.shape[:3]
    frames = video.transpose(1, 2).flatten(0, 1)  # (N*T, 3, H, W)
    dtype = feature_dtype(video.device)

    def unflatten(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(dtype).unflatten(0, (n, t))

    def keep(index: int, f: BlockFeatures) -> BlockFeatures:
        block = BlockFeatures(unflatten(f.out), unflatten(f.q), unflatten(f.k))
        return block if on_block is None else on_block(index, block)

    return backbone.forward_features(frames, sorted(set(layers)), with_qk=with_qk, on_block=keep)


def feature_dtype(device: torch.device) -> torch.dtype:
    """The dtype backbone features are kept in on ``device``: autocast's dtype while autocast
    is on there (a float16/bfloat16 backbone's features stay half size; a float32 backbone's
    are cast down once, as the decoder's autocast would cast them), float32 otherwise (what
    the decoder's own float32 parameters take)."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return torch.float32


def feature_block_indices(cfg: DecoderConfig, num_blocks: int) -> tuple[int, ...]:
    """The block indices (0-based, non-negative) the decoder layers read from a backbone of
    ``num_blocks`` blocks: the configured layers, checked and counted from the start."""
    resolved = []
    for index in cfg.configured_feature_layers():
        if not -num_blocks <= index < num_blocks:
            raise ValueError(
                f"model.decoder.feature_layers: index {index} is out of range for a backbone "
                f"with {num_blocks} blocks (allowed {-num_blocks}..{num_blocks - 1})"
            )
        resolved.append(index % num_blocks)
    return tuple(resolved)


def create_decoder(
    cfg: DecoderConfig,
    *,
    width: int,
    num_heads: int,
    grid: tuple[int, int],
    num_frames: int,
) -> EVLDecoder:
    """Builds the decoder with the registered temporal modules ``cfg`` switches on, leaving
    every disabled one as ``None``."""
    reduce = FEATURE_SHAPES.get(cfg.feature_shape)
    geometry = TemporalGeometry(width=width, num_frames=num_frames, grid=grid)
    layers = [
        EVLDecoderLayer(
            block=DecoderBlock(
                width=width,
                num_heads=cfg.num_heads or num_heads,
                mlp_ratio=cfg.mlp_ratio,
                mlp_dropout=cfg.mlp_dropout,
            ),
            reduce=reduce,
            **create_temporal_modules(cfg, geometry),
        )
        for _ in range(cfg.num_layers)
    ]
    return EVLDecoder(layers=layers, width=width)


def create_evl(cfg: ExperimentConfig, *, load_weights: bool = True) -> EVL:
    """Builds the EVL model of an experiment (decoder width = backbone width).

    Args:
        cfg: the resolved experiment configuration.
        load_weights: load the backbone's pretrained weights (``False``: seeded random init).
    """
    backbone = create_backbone(cfg.model.backbone, load_weights=load_weights)
    return evl_on(backbone, cfg)


def evl_on(backbone: ClipBackbone, cfg: ExperimentConfig) -> EVL:
    """The EVL model of ``cfg`` around an existing ``backbone`` (several frozen-backbone
    models of one pack share one); decoder and head are initialised from the global RNG."""
    feature_layers = feature_block_indices(cfg.model.decoder, backbone.num_layers)
    if backbone.trainable:
        backbone.freeze_unused(max(feature_layers))
    decoder = create_decoder(
        cfg.model.decoder,
        width=backbone.width,
        num_heads=backbone.num_heads,
        grid=backbone.grid_size,
        num_frames=cfg.data.num_frames,
    )
    head = ClassificationHead(
        width=backbone.width, num_classes=cfg.data.num_classes, dropout=cfg.model.head.dropout
    )
    return EVL(backbone=backbone, decoder=decoder, head=head, feature_layers=feature_layers)


MODEL_BUILDERS: Registry[Callable[..., EVL | Cnn3d]] = Registry("model architecture")
"""One builder per ``model.arch``; the names are ``ModelArch``'s (checked below)."""
MODEL_BUILDERS.add("evl", create_evl)
MODEL_BUILDERS.add("cnn3d", create_cnn3d)
MODEL_BUILDERS.check_names(ModelArch, literal_name="ModelArch", module=__name__)


def create_model(cfg: ExperimentConfig, *, load_weights: bool = True) -> EVL | Cnn3d:
    """Builds the experiment's video classifier; ``model.arch`` picks the family.

    Every family maps (N, 3, T, H, W) clips to (N, classes) logits and has ``new_parameters``,
    ``image_size`` and ``forward_images``; only EVL has ``classify`` (cached features).

    Args:
        cfg: the resolved experiment configuration.
        load_weights: load pretrained weights where the family has any (``False``: seeded
            random init).
    """
    return MODEL_BUILDERS.get(cfg.model.arch)(cfg, load_weights=load_weights)

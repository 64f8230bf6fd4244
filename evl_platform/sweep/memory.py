"""The memory plan of a pack: what one worker holds while it trains a pack's members.

One worker of a pack holds, at its peak (:func:`pack_memory_bytes`):

- every member's training state: its trainable parameters and AdamW's two moments, float32
  (and DDP's gradient buckets with several workers);
- one member's step only, the largest member's: members step one after another, and each
  step's graph and gradients are freed before the next member's (activations in the
  features' dtype, on the step's chunk of ``ceil(per-worker batch / train.batch_split)``
  clips; its gradients, float32);
- the shared backbone outputs kept for the batch: the blocks any member reads, in the dtype
  features are kept in (autocast's, else float32), and T-CA's maps for the blocks whose maps a
  member reads (float32: autocast runs the softmax in float32);
- the frozen backbone's pass: its weights (in ``model.backbone.dtype``) and the transient
  tensors of one block on the per-worker batch (queries, keys and values, the MLP's hidden
  layer, attention scores), plus the normalised pixels;
- the process itself (:data:`RUNTIME_BYTES`: its modules in memory; a GPU's CUDA context).

The activation and transient counts are estimates (tensors of a feature map's size); the
rehearsal sweep prints this estimate against each pack worker's measured peak RSS.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from evl_platform.config import ExperimentConfig

FLOAT32 = 4
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
STATE_COPIES = 3
"""float32 copies of each trainable parameter kept between steps: the weight and AdamW's two
moments (a pack frees each member's gradients after its update, see ``train/loop.py``, so
they count once, with the largest member's step)."""

LAYER_TENSORS = 2
"""Feature-map-sized tensors one decoder layer keeps for its backward pass without temporal
modules (the normalised features its attention reads, and their sum with the terms)."""

MODULE_TENSORS = 1
"""Further feature-map-sized tensors per enabled temporal module and layer (its term).

Both counts are calibrated on measured peak RSS (CPU, float32, ViT-B/16 8 frames, batch 2):
an SSv2 pack of 2 (12 layers, T-PE + T-CA and all three modules) used 0.79 GiB above its
members' state, features and backbone; this count gives 0.90."""

OPTIMIZER_COPIES = 1
"""float32 copies of a member's parameters AdamW's foreach step holds while it runs."""

BLOCK_TENSORS = 10
"""Token-sized tensors (``tokens x width``) alive while one backbone block runs: its input
and output, the normalised input, queries, keys and values (3), the MLP's hidden layer (4)."""

RUNTIME_BYTES = {"cpu": 900 * 1024**2, "cuda": 512 * 1024**2}
"""The worker process itself, by device: on a CPU the resident size of its modules (torch,
Ray, MLflow and the platform: 0.87 GiB measured after importing them), on a GPU its CUDA
context."""


@dataclass(frozen=True)
class PackMemory:
    """A pack worker's estimated peak memory, by part (bytes).

    Attributes:
        member_state: every member's parameters and AdamW state (float32).
        activations: the largest member's step: activations kept for its backward pass, its
            gradients and the optimizer step's temporaries.
        features: the shared backbone outputs kept per batch (blocks and T-CA maps).
        backbone_pass: the backbone's transient tensors of one block, and the pixels.
        backbone_weights: the frozen backbone's weights.
        runtime: the process itself (:data:`RUNTIME_BYTES` of the device type).
    """

    member_state: int
    activations: int
    features: int
    backbone_pass: int
    backbone_weights: int
    runtime: int

    @property
    def total(self) -> int:
        """The sum of every part."""
        return sum(getattr(self, f.name) for f in fields(self))

    def parts(self) -> dict[str, int]:
        """Part name -> bytes, and ``total``."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"total": self.total}

    def render(self) -> str:
        """One line: each part and the total in GiB."""
        shown = ", ".join(
            f"{k.replace('_', ' ')} {v / 1024**3:.2f}" for k, v in self.parts().items()
        )
        return f"{shown} GiB"


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of one member's model (built once on the meta device)."""

    trainable: int
    backbone: int
    width: int
    heads: int
    tokens: int
    image: tuple[int, int]
    blocks: tuple[int, ...]
    uses_qk: bool
    layers: int
    temporal_modules: int


def pack_memory_bytes(
    cfgs: Sequence[ExperimentConfig], *, num_workers: int, device_type: str
) -> PackMemory:
    """The estimated peak memory of one worker training ``cfgs`` as one pack (or alone).

    Args:
        cfgs: the pack's members (EVL models on one frozen backbone; they share the batch,
            frames and backbone, see :func:`~evl_platform.train.pack.check_packable`).
        num_workers: workers the batch is split over.
        device_type: ``cuda`` (autocast at ``train.amp``) or ``cpu`` (full precision).
    """
    lead = cfgs[0]
    shapes = [model_shape(cfg) for cfg in cfgs]
    batch = max(1, lead.train.batch_size // num_workers)  # the backbone's clips per pass
    chunk = math.ceil(batch / lead.train.batch_split)  # a member step's clips
    frames = lead.data.num_frames
    amp = device_type == "cuda" and lead.train.amp in DTYPE_BYTES
    feature = DTYPE_BYTES[lead.train.amp] if amp else FLOAT32
    weight = DTYPE_BYTES[lead.model.backbone.dtype]
    first = shapes[0]
    token_map = frames * first.tokens * first.width  # one clip's (T, L, C)
    copies = STATE_COPIES + (1 if num_workers > 1 else 0)  # DDP's gradient buckets
    blocks = {i for s in shapes for i in s.blocks}
    maps = {i for s in shapes if s.uses_qk for i in s.blocks}
    patches = first.tokens - 1
    images = batch * frames
    return PackMemory(
        member_state=sum(s.trainable for s in shapes) * FLOAT32 * copies,
        activations=max(_step_bytes(s, chunk * token_map, feature) for s in shapes),
        features=batch * token_map * feature * len(blocks)
        + batch * 2 * (frames - 1) * patches**2 * FLOAT32 * len(maps),
        backbone_pass=images * first.tokens * first.width * weight * BLOCK_TENSORS
        + images * first.heads * first.tokens**2 * FLOAT32
        + images * 3 * first.image[0] * first.image[1] * FLOAT32,
        backbone_weights=first.backbone * weight,
        runtime=RUNTIME_BYTES.get(device_type, RUNTIME_BYTES["cuda"]),
    )


def _step_bytes(shape: ModelShape, feature_map: int, dtype_bytes: int) -> int:
    """One member's step: kept activations for ``feature_map`` elements per layer (in the
    features' dtype: autocast's, else float32), its gradients and the optimizer's
    temporaries (float32 copies of its parameters)."""
    tensors = LAYER_TENSORS + MODULE_TENSORS * shape.temporal_modules
    kept = feature_map * dtype_bytes * tensors * max(1, shape.layers)
    return kept + (1 + OPTIMIZER_COPIES) * shape.trainable * FLOAT32


def model_shape(cfg: ExperimentConfig) -> ModelShape:
    """:class:`ModelShape` of ``cfg``'s model (cached per model, frames and classes)."""
    return _model_shape(cfg.model.model_dump_json(), cfg.data.num_frames, cfg.data.num_classes)


@functools.lru_cache(maxsize=256)
def _model_shape(model_json: str, frames: int, classes: int) -> ModelShape:
    from evl_platform.config.schema import DataConfig, ModelConfig
    from evl_platform.models import EVL, create_model, enabled_temporal_modules

    cfg = ExperimentConfig(
        model=ModelConfig.model_validate_json(model_json),
        data=DataConfig(num_frames=frames, num_classes=classes),
    )
    with torch.device("meta"):
        model = create_model(cfg, load_weights=False)
    if not isinstance(model, EVL):
        raise ValueError(
            f"model.arch: a pack's memory plan is for EVL models, not {cfg.model.arch}"
        )
    backbone = model.backbone
    return ModelShape(
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        backbone=sum(p.numel() for p in backbone.parameters() if not p.requires_grad),
        width=backbone.width,
        heads=backbone.num_heads,
        tokens=backbone.grid_size[0] * backbone.grid_size[1] + 1,
        image=backbone.image_size,
        blocks=model.feature_layers,
        uses_qk=model.decoder.uses_qk,
        layers=cfg.model.decoder.num_layers,
        temporal_modules=len(enabled_temporal_modules(cfg.model.decoder)),
    )

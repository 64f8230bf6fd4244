"""Model size and cost in the paper's conventions, computed without weights or real data."""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from evl_platform.config.schema import ExperimentConfig
from evl_platform.models.cnn3d import Cnn3d
from evl_platform.models.decoder import DecoderAttention
from evl_platform.models.evl import EVL, create_model
from evl_platform.models.temporal import enabled_temporal_modules


def count_gmacs(model: EVL | Cnn3d, *, num_frames: int, plain_attention: bool = True) -> float:
    """Multiply-accumulates (10^9) of one forward view: backbone + decoder + head for EVL,
    the whole network for the 3D CNN (convolutions and the linear head; normalisation,
    activations and pooling count nothing, as in the paper's convention).

    The paper's "GFLOPS" are multiply-accumulates; ``torch.utils.flop_counter`` counts two
    FLOPs per MAC, hence the halving. With ``plain_attention`` the decoder's attention is
    counted in its plain form (keys and values projected for every token, as the paper counts
    it); without, in the cheaper query-side form that training and inference run
    (:class:`.DecoderAttention`). Counted on a :func:`meta_copy`: ``model`` itself (its mode,
    its attention's form, its image counter) is left as it is.
    """
    counted = meta_copy(model).eval()
    height, width = counted.image_size
    video = torch.zeros(1, 3, num_frames, height, width, device="meta")
    for module in counted.modules():
        if isinstance(module, DecoderAttention):
            module.query_side = not plain_attention
    with FlopCounterMode(display=False) as counter:  # forward only: no backward is run
        counted(video)
    return counter.get_total_flops() / 2 / 1e9


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device (no memory,
    no data), for counting its operations without touching the model itself (its mode, its
    attributes, its image counter)."""
    memo: dict[int, object] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = meta
    return copy.deepcopy(model, memo)


def model_info(cfg: ExperimentConfig) -> dict[str, object]:
    """Parameter counts and GFLOPs of an experiment's model, built on the meta device.

    Returns:
        ``arch``, ``new_params`` (decoder + temporal modules + head; the whole network for a
        3D CNN), ``backbone_params`` (0 for a 3D CNN), ``trainable_params``,
        ``gflops_per_view`` (MACs, counted as the paper does), ``gflops_per_view_run``
        (MACs as this code runs them: query-side decoder attention), ``views`` and
        ``gflops_total``, plus the architecture fields they depend on.
    """
    with torch.device("meta"):
        model = create_model(cfg, load_weights=False)
    gflops = round(count_gmacs(model, num_frames=cfg.data.num_frames), 3)
    run = round(count_gmacs(model, num_frames=cfg.data.num_frames, plain_attention=False), 3)
    views = cfg.data.test_views.total
    counts = {
        "new_params": sum(p.numel() for p in model.new_parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "gflops_per_view": gflops,
        "gflops_per_view_run": run,
        "views": views,
        "gflops_total": round(gflops * views, 3),
    }
    if isinstance(model, Cnn3d):
        return {**_cnn3d_fields(cfg, model), **counts}
    return {**_evl_fields(cfg, model), **counts}


def _cnn3d_fields(cfg: ExperimentConfig, model: Cnn3d) -> dict[str, object]:
    """The 3D CNN's fields, under the same keys as EVL's where the CLI's summary reads them:
    no backbone (0 params) and no decoder (0 layers)."""
    cnn = cfg.model.cnn3d
    return {
        "experiment": cfg.name,
        "profile": cfg.profile,
        "arch": "cnn3d",
        "backbone": "none",
        "backbone_mode": f"3D CNN from scratch: width {cnn.width}, depth {cnn.depth}",
        "image_size": list(model.image_size),
        "num_frames": cfg.data.num_frames,
        "num_classes": cfg.data.num_classes,
        "cnn3d_width": cnn.width,
        "cnn3d_depth": cnn.depth,
        "decoder_layers": 0,
        "feature_layers": [],
        "temporal_modules": [],
        "feature_shape": "none",
        "backbone_params": 0,
    }


def _evl_fields(cfg: ExperimentConfig, model: EVL) -> dict[str, object]:
    decoder = cfg.model.decoder
    return {
        "experiment": cfg.name,
        "profile": cfg.profile,
        "arch": "evl",
        "backbone": cfg.model.backbone.name,
        "backbone_mode": cfg.model.backbone.mode,
        "image_size": list(model.backbone.image_size),
        "num_frames": cfg.data.num_frames,
        "num_classes": cfg.data.num_classes,
        "decoder_layers": decoder.num_layers,
        "feature_layers": list(model.feature_layers),
        "temporal_modules": [module.label for _, module in enabled_temporal_modules(decoder)],
        "feature_shape": decoder.feature_shape,
        "backbone_params": sum(p.numel() for p in model.backbone.parameters()),
        "backbone_width": model.backbone.width,
        "tokens_per_frame": model.backbone.grid_size[0] * model.backbone.grid_size[1] + 1,
        "backbone_gflops_per_view": round(_backbone_gmacs(model, cfg.data.num_frames), 3),
    }


def _backbone_gmacs(model: EVL, num_frames: int) -> float:
    """Multiply-accumulates (10^9) of the frozen backbone's part of one view: its blocks up
    to the deepest one the decoder reads (what a pack of decoders shares)."""
    from evl_platform.models.evl import extract_blocks

    height, width = model.image_size
    video = torch.zeros(1, 3, num_frames, height, width, device="meta")
    with FlopCounterMode(display=False) as counter:
        extract_blocks(meta_copy(model.backbone), video, model.feature_layers, with_qk=False)
    return counter.get_total_flops() / 2 / 1e9

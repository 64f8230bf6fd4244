"""Model size and cost in the paper's conventions, computed without weights or real data."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from evl_platform.config.schema import ExperimentConfig
from evl_platform.models.evl import EVL, create_model


def count_gmacs(model: EVL, *, num_frames: int) -> float:
    """Multiply-accumulates (10^9) of one forward view, backbone + decoder + head.

    The paper's "GFLOPS" are multiply-accumulates; ``torch.utils.flop_counter`` counts two
    FLOPs per MAC, hence the halving.
    """
    height, width = model.backbone.image_size
    device = next(model.parameters()).device
    video = torch.zeros(1, 3, num_frames, height, width, device=device)
    model.eval()
    with FlopCounterMode(display=False) as counter:  # forward only: no backward is run
        model(video)
    return counter.get_total_flops() / 2 / 1e9


def model_info(cfg: ExperimentConfig) -> dict[str, object]:
    """Parameter counts and GFLOPs of an experiment's model, built on the meta device.

    Returns:
        ``new_params`` (decoder + temporal modules + head), ``backbone_params``,
        ``trainable_params``, ``gflops_per_view`` (MACs), ``views`` and ``gflops_total``, plus
        the architecture fields they depend on.
    """
    with torch.device("meta"):
        model = create_model(cfg, load_weights=False)
    gflops = round(count_gmacs(model, num_frames=cfg.data.num_frames), 3)
    views = cfg.data.test_views.total
    decoder = cfg.model.decoder
    return {
        "experiment": cfg.name,
        "profile": cfg.profile,
        "backbone": cfg.model.backbone.name,
        "backbone_mode": cfg.model.backbone.mode,
        "image_size": list(model.backbone.image_size),
        "num_frames": cfg.data.num_frames,
        "num_classes": cfg.data.num_classes,
        "decoder_layers": decoder.num_layers,
        "feature_layers": list(model.feature_layers),
        "temporal_modules": [
            name
            for name, on in (
                ("T-Conv", decoder.temporal_conv),
                ("T-PE", decoder.temporal_pos_embed),
                ("T-CA", decoder.temporal_cross_attn),
            )
            if on
        ],
        "feature_shape": decoder.feature_shape,
        "new_params": sum(p.numel() for p in model.new_parameters()),
        "backbone_params": sum(p.numel() for p in model.backbone.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "gflops_per_view": gflops,
        "views": views,
        "gflops_total": round(gflops * views, 3),
    }

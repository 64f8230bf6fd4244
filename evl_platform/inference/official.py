"""Importing the checkpoints released with the official EVL code (OpenGVLab's
efficient-video-recognition) into the platform's weights.

Such a checkpoint is ``{"model": state_dict}``, keys under ``module.`` (DDP). With the frozen
backbone the paper trains, only the decoder and the head are stored: the backbone is the CLIP
visual tower the config loads. The official model reads the last M backbone blocks, has T-CA
on, and its T-PE tables fix the number of frames, so the experiment config must agree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from evl_platform.config import ExperimentConfig
from evl_platform.inference.errors import InferenceError
from evl_platform.inference.runs import read_weights
from evl_platform.models import create_model
from evl_platform.train.state import trainable_state

_BLOCK = "backbone.visual.transformer.resblocks.{0}."
# official decoder / head key (after ``module.``) -> ours; ``{i}`` is the layer index
_RULES: tuple[tuple[str, str], ...] = (
    (r"decoder\.cls_token", "decoder.query"),
    (r"decoder\.decoder_layers\.(\d+)\.(.+)", "decoder.layers.{0}.block.{1}"),
    (r"decoder\.temporal_conv\.(\d+)\.(weight|bias)", "decoder.layers.{0}.temporal_conv.conv.{1}"),
    (r"decoder\.temporal_pos_embed\.(\d+)", "decoder.layers.{0}.temporal_pos_embed.embedding"),
    (r"decoder\.cross_attention\.(\d+)\.w1", "decoder.layers.{0}.temporal_cross_attn.w_prev"),
    (r"decoder\.cross_attention\.(\d+)\.w2", "decoder.layers.{0}.temporal_cross_attn.w_next"),
    (r"proj\.0\.(weight|bias)", "head.norm.{0}"),
    (r"proj\.2\.(weight|bias)", "head.fc.{0}"),
    (r"backbone\.cls_token", "backbone.visual.class_embedding"),
    (r"backbone\.pos_embed", "backbone.visual.positional_embedding"),
    (r"backbone\.ln_pre\.(weight|bias)", "backbone.visual.ln_pre.{0}"),
    (r"backbone\.blocks\.(\d+)\.attn\.out_proj\.(.+)", _BLOCK + "attn.out_proj.{1}"),
    (r"backbone\.blocks\.(\d+)\.mlp\.fc1\.(.+)", _BLOCK + "mlp.c_fc.{1}"),
    (r"backbone\.blocks\.(\d+)\.mlp\.fc2\.(.+)", _BLOCK + "mlp.c_proj.{1}"),
    (r"backbone\.blocks\.(\d+)\.norm1\.(.+)", _BLOCK + "ln_1.{1}"),
    (r"backbone\.blocks\.(\d+)\.norm2\.(.+)", _BLOCK + "ln_2.{1}"),
)  # fmt: skip
_QKV = re.compile(r"backbone\.blocks\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)")
_PATCH = "backbone.patch_embed.proj."


@dataclass
class ImportReport:
    """What an import found, by our key names (official names for unexpected keys).

    Attributes:
        weights: the imported trainable state (ours), complete unless partial.
        missing: our keys the checkpoint does not provide.
        unexpected: checkpoint keys with no place in the configured model.
        mismatched: ``key: checkpoint shape != model shape``.
        mapped: how many tensors landed in the model.
    """

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    mapped: int = 0

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """One line per problem kind, naming every key."""
        lines = [f"mapped {self.mapped} tensors"]
        for what, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mismatched shape", self.mismatched),
        ):
            if keys:
                lines.append(f"{what} ({len(keys)}): {', '.join(keys)}")
        return "\n".join(lines)


def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict with the ``module.`` prefix removed."""
    state = read_weights(path)
    return {k.removeprefix("module."): v for k, v in state.items()}


def official_key(key: str) -> str | None:
    """Our name of an official decoder, head or backbone key (``None``: no single match)."""
    for pattern, target in _RULES:
        found = re.fullmatch(pattern, key)
        if found:
            return target.format(*found.groups())
    return None


def check_config(state: Mapping[str, torch.Tensor], cfg: ExperimentConfig) -> None:
    """Refuses a config the checkpoint cannot fit: frames, T-CA, depth, feature layers.

    Raises:
        InferenceError: naming the config key to change and the value the checkpoint needs.
    """
    decoder = cfg.model.decoder
    if cfg.model.arch != "evl":
        raise InferenceError(f"model.arch is {cfg.model.arch!r}; official checkpoints are EVL")
    layers = {
        int(m.group(1)) for k in state if (m := re.match(r"decoder\.decoder_layers\.(\d+)\.", k))
    }
    if layers and len(layers) != decoder.num_layers:
        raise InferenceError(
            f"the checkpoint has {len(layers)} decoder layers but model.decoder.num_layers is "
            f"{decoder.num_layers}; set it to {len(layers)}"
        )
    embed = state.get("decoder.temporal_pos_embed.0")
    if embed is not None and embed.shape[0] != cfg.data.num_frames:
        raise InferenceError(
            f"the checkpoint's temporal position embeddings (T-PE) are for {embed.shape[0]} "
            f"frames but data.num_frames is {cfg.data.num_frames}; the official model fixes the "
            f"number of frames: set data.num_frames to {embed.shape[0]}"
        )
    if any(k.startswith("decoder.cross_attention.") for k in state) and not (
        decoder.temporal_cross_attn
    ):
        raise InferenceError(
            "the checkpoint has T-CA weights (decoder.cross_attention.*; the official model has "
            "T-CA on by default) but model.decoder.temporal_cross_attn is false; set it to true"
        )


def convert(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official keys -> ours; returns the converted tensors and the keys with no match."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if (found := _QKV.fullmatch(key)) is not None:
            block, part, kind = found.groups()
            qkv.setdefault((block, kind), {})[part] = value
        elif key == _PATCH + "weight":
            out["backbone.visual.conv1.weight"] = value  # reshaped to the conv's shape below
        elif key == _PATCH + "bias":
            if value.abs().max() > 0:  # open_clip's patch conv has no bias
                unknown.append(key)
        elif (ours := official_key(key)) is not None:
            out[ours] = value
        else:
            unknown.append(key)
    for (block, kind), parts in sorted(qkv.items()):
        name = f"backbone.visual.transformer.resblocks.{block}.attn.in_proj_{kind}"
        if set(parts) == {"q", "k", "v"}:
            out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:
            unknown += [f"backbone.blocks.{block}.attn.{p}_proj.{kind}" for p in sorted(parts)]
    return out, unknown


def import_official(
    state: Mapping[str, torch.Tensor], cfg: ExperimentConfig, *, load_backbone: bool = False
) -> tuple[nn.Module, ImportReport]:
    """Loads an official state dict (``module.`` already removed) into the config's model.

    Returns:
        The model with every fitting tensor loaded, and the report; ``report.weights`` is the
        model's trainable state (what a training run stores as ``weights.pt``).

    Raises:
        InferenceError: the config does not fit the checkpoint (see :func:`check_config`).
    """
    check_config(state, cfg)
    try:
        model = create_model(cfg, load_weights=load_backbone)
    except (ValueError, KeyError) as err:  # an architecture the config cannot build
        raise InferenceError(f"the config's model cannot be built: {err}") from err
    blocks = model.backbone.num_layers
    if model.feature_layers != tuple(range(blocks - len(model.feature_layers), blocks)):
        raise InferenceError(
            "the official model reads the last num_layers backbone blocks, but "
            f"model.decoder.feature_layers reads blocks {list(model.feature_layers)}: remove it"
        )
    own, expected = model.state_dict(), set(trainable_state(model))
    converted, unknown = convert(state)
    report = ImportReport(unexpected=unknown)
    fitting: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        if key not in own or key not in expected:
            report.unexpected.append(key)
            continue
        value = _shaped(key, value, own[key].shape)
        if value.shape != own[key].shape:
            report.mismatched.append(f"{key}: {tuple(value.shape)} != {tuple(own[key].shape)}")
            continue
        fitting[key] = value.to(own[key].dtype)
    report.missing = sorted(expected - set(fitting) - {k.split(":")[0] for k in report.mismatched})
    report.mapped = len(fitting)
    model.load_state_dict(fitting, strict=False)
    report.weights = trainable_state(model)
    return model.eval(), report


def _shaped(key: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The official patch projection is the patch conv's weight, flattened."""
    if key == "backbone.visual.conv1.weight" and value.ndim == 2 and value.numel() == shape.numel():
        return value.reshape(shape)
    return value


def require_complete(report: ImportReport, *, allow_partial: bool, source: str) -> None:
    """Raises unless the import was complete or ``allow_partial`` says a partial one is fine."""
    if report.complete or allow_partial:
        return
    raise InferenceError(
        f"{source}: the checkpoint does not fit the config's model; nothing written "
        f"(--allow-partial writes it anyway, keeping the model's init for missing keys):\n"
        f"{report.summary()}"
    )


def register_import(
    cfg: ExperimentConfig, weights: Path, *, source: str, tracking_uri: str | None = None
) -> str:
    """An MLflow run (kind ``import``) holding the imported weights, the resolved config and
    the MLflow model, so ``evaluate`` and ``predict`` take its run id; returns the id."""
    import tempfile

    from evl_platform.config import dump_config, flatten_config
    from evl_platform.serving.pyfunc import log_run_model
    from evl_platform.tracking import names
    from evl_platform.tracking.client import Tracker

    tracker = Tracker(tracking_uri)
    tags = {
        names.TAG_KIND: names.KIND_IMPORT,
        names.TAG_PROFILE: cfg.profile,
        names.TAG_DATASET: cfg.data.dataset,
        names.TAG_BACKBONE: cfg.model.backbone.name,
        names.TAG_VARIANT: cfg.name,
        names.TAG_IMPORTED_FROM: source,
    }
    run_id = tracker.create_run(
        cfg.name, run_name=f"{cfg.name}-import-{Path(source).stem}", tags=tags
    )
    with tracker.finishing(run_id), tempfile.TemporaryDirectory() as scratch:
        tracker.log_params(run_id, flatten_config(cfg))
        directory = Path(scratch)
        (directory / names.ARTIFACT_CONFIG).write_text(dump_config(cfg))
        (directory / names.ARTIFACT_WEIGHTS).write_bytes(weights.read_bytes())
        for name in (names.ARTIFACT_CONFIG, names.ARTIFACT_WEIGHTS):
            tracker.log_artifact(run_id, directory / name)
        log_run_model(tracker, run_id, dump_config(cfg), directory)
    return run_id

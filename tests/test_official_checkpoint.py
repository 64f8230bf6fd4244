"""Importing checkpoints in the official EVL layout (OpenGVLab/efficient-video-recognition):
every tensor lands in its place, and a config that cannot fit is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evl_platform.cli import main
from evl_platform.config import ExperimentConfig
from evl_platform.inference.errors import InferenceError
from evl_platform.inference.official import import_official, read_official
from evl_platform.inference.runs import TrainedModel, build_model
from tests.conftest import write_config

LAYERS, FRAMES, CLASSES = 2, 8, 10


def _config(tmp_path: Path, *, tca: bool = True, frames: int = FRAMES) -> ExperimentConfig:
    data = {"dataset": "synthetic-motion", "format": "ssv2_json", "num_frames": frames}
    decoder = {"num_layers": LAYERS, "temporal_cross_attn": tca}
    return write_config(
        tmp_path / "exp.yaml",
        data,
        name="official",
        model={"backbone": {"name": "micro-vit"}, "decoder": decoder},
    )


def official_state(width: int, grid: tuple[int, int], *, seed: int = 0) -> dict:
    """A checkpoint in the official layout: decoder queries, decoder layers, per-layer
    T-Conv / T-PE / T-CA, and the LayerNorm + Linear classifier, under ``module.``."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    offsets = (2 * grid[0] - 1) * (2 * grid[1] - 1)
    state = {"decoder.cls_token": rand(width)}
    for i in range(LAYERS):
        layer = f"decoder.decoder_layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[f"{layer}attn.{proj}.weight"] = rand(width, width)
            state[f"{layer}attn.{proj}.bias"] = rand(width)
        state[f"{layer}mlp.fc1.weight"] = rand(4 * width, width)
        state[f"{layer}mlp.fc1.bias"] = rand(4 * width)
        state[f"{layer}mlp.fc2.weight"] = rand(width, 4 * width)
        state[f"{layer}mlp.fc2.bias"] = rand(width)
        for norm in ("norm1", "norm2", "norm3"):
            state[f"{layer}{norm}.weight"] = rand(width)
            state[f"{layer}{norm}.bias"] = rand(width)
        state[f"decoder.temporal_conv.{i}.weight"] = rand(width, 1, 3)
        state[f"decoder.temporal_conv.{i}.bias"] = rand(width)
        state[f"decoder.temporal_pos_embed.{i}"] = rand(FRAMES, width)
        state[f"decoder.cross_attention.{i}.w1"] = rand(offsets, width)
        state[f"decoder.cross_attention.{i}.w2"] = rand(offsets, width)
    state |= {
        "proj.0.weight": rand(width),
        "proj.0.bias": rand(width),
        "proj.2.weight": rand(CLASSES, width),
        "proj.2.bias": rand(CLASSES),
    }
    return {f"module.{k}": v for k, v in state.items()}


def _dims(cfg: ExperimentConfig) -> tuple[int, tuple[int, int]]:
    from evl_platform.models import create_model

    backbone = create_model(cfg, load_weights=False).backbone
    return backbone.width, backbone.grid_size


def test_every_official_tensor_lands_in_its_place(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    width, grid = _dims(cfg)
    saved = official_state(width, grid)
    torch.save({"model": saved}, tmp_path / "official.pth")
    model, report = import_official(read_official(tmp_path / "official.pth"), cfg)
    assert report.complete, report.summary()
    src = {k.removeprefix("module."): v for k, v in saved.items()}
    assert report.mapped == len(src)
    assert torch.equal(model.decoder.query, src["decoder.cls_token"])
    for i, layer in enumerate(model.decoder.layers):
        block = layer.block
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            ours = getattr(block.attn, proj)
            assert torch.equal(ours.weight, src[f"decoder.decoder_layers.{i}.attn.{proj}.weight"])
            assert torch.equal(ours.bias, src[f"decoder.decoder_layers.{i}.attn.{proj}.bias"])
        assert torch.equal(block.mlp.fc1.weight, src[f"decoder.decoder_layers.{i}.mlp.fc1.weight"])
        assert torch.equal(block.mlp.fc2.bias, src[f"decoder.decoder_layers.{i}.mlp.fc2.bias"])
        for norm in ("norm1", "norm2", "norm3"):
            got = getattr(block, norm).weight
            assert torch.equal(got, src[f"decoder.decoder_layers.{i}.{norm}.weight"])
        conv = layer.temporal_conv.conv
        assert torch.equal(conv.weight, src[f"decoder.temporal_conv.{i}.weight"])
        assert torch.equal(conv.bias, src[f"decoder.temporal_conv.{i}.bias"])
        embed = layer.temporal_pos_embed.embedding
        assert torch.equal(embed, src[f"decoder.temporal_pos_embed.{i}"])
        tca = layer.temporal_cross_attn
        assert torch.equal(tca.w_prev, src[f"decoder.cross_attention.{i}.w1"])  # previous frame
        assert torch.equal(tca.w_next, src[f"decoder.cross_attention.{i}.w2"])  # next frame
    assert torch.equal(model.head.norm.weight, src["proj.0.weight"])
    assert torch.equal(model.head.norm.bias, src["proj.0.bias"])
    assert torch.equal(model.head.fc.weight, src["proj.2.weight"])
    assert torch.equal(model.head.fc.bias, src["proj.2.bias"])
    # what is written is a platform weights file that builds the same model
    rebuilt = build_model(TrainedModel(cfg, report.weights, "imported"))
    video = torch.randn(1, 3, FRAMES, *rebuilt.image_size)
    assert torch.allclose(rebuilt(video), model(video))


def test_wrong_frames_or_tca_off_is_refused_by_name(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    state = {k.removeprefix("module."): v for k, v in official_state(*_dims(cfg)).items()}
    with pytest.raises(InferenceError, match=r"for 8 frames but data.num_frames is 16"):
        import_official(state, _config(tmp_path, frames=16))
    with pytest.raises(InferenceError, match=r"T-CA on by default.*temporal_cross_attn"):
        import_official(state, _config(tmp_path, tca=False))


def test_cli_reports_keys_by_name_and_refuses_a_partial_model(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = _config(tmp_path)
    state = official_state(*_dims(cfg))
    del state["module.proj.2.bias"]
    state["module.decoder.extra_table"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "partial.pth")
    argv = [
        "import-checkpoint",
        str(tmp_path / "partial.pth"),
        "--config",
        str(tmp_path / "exp.yaml"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "missing (1): head.fc.bias" in err
    assert "unexpected (1): decoder.extra_table" in err
    assert not (tmp_path / "partial.evl.pt").exists()
    assert main([*argv, "--allow-partial"]) == 0
    assert (tmp_path / "partial.evl.pt").exists()

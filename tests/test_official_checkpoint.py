"""Importing checkpoints in the official EVL layout (OpenGVLab/efficient-video-recognition):
every tensor lands in its place, and a config that cannot fit is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_config

from evl_platform.cli import main
from evl_platform.config import ExperimentConfig
from evl_platform.inference.errors import InferenceError
from evl_platform.inference.official import import_official, read_official
from evl_platform.inference.runs import TrainedModel, build_model

LAYERS, FRAMES, CLASSES = 2, 8, 10


def _config(
    tmp_path: Path, *, tca: bool = True, frames: int = FRAMES, mode: str = "frozen"
) -> ExperimentConfig:
    data = {"dataset": "synthetic-motion", "format": "ssv2_json", "num_frames": frames}
    data["augment"] = {"random_resized_crop": None, "rand_augment": None, "horizontal_flip": False}
    decoder = {"num_layers": LAYERS, "temporal_cross_attn": tca}
    return write_config(
        tmp_path / "exp.yaml",
        data,
        name="official",
        model={"backbone": {"name": "micro-vit", "mode": mode}, "decoder": decoder},
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


def official_backbone(visual_state: dict) -> dict:
    """Our open_clip visual tower in the official ``VisionTransformer2D`` layout (the layout
    the official finetune mode saves under ``backbone.``): q/k/v split, patch conv flattened."""
    out = {
        "backbone.cls_token": visual_state["class_embedding"],
        "backbone.pos_embed": visual_state["positional_embedding"],
        "backbone.patch_embed.proj.weight": visual_state["conv1.weight"].flatten(1),
        "backbone.patch_embed.proj.bias": torch.zeros(visual_state["conv1.weight"].shape[0]),
        "backbone.ln_pre.weight": visual_state["ln_pre.weight"],
        "backbone.ln_pre.bias": visual_state["ln_pre.bias"],
    }
    names = {"ln_1": "norm1", "ln_2": "norm2", "mlp.c_fc": "fc1", "mlp.c_proj": "fc2"}
    blocks = {int(k.split(".")[2]) for k in visual_state if k.startswith("transformer.resblocks.")}
    for i in sorted(blocks):
        src, dst = f"transformer.resblocks.{i}.", f"backbone.blocks.{i}."
        for kind in ("weight", "bias"):
            q, k, v = visual_state[f"{src}attn.in_proj_{kind}"].chunk(3)
            out |= {f"{dst}attn.q_proj.{kind}": q, f"{dst}attn.k_proj.{kind}": k}
            out[f"{dst}attn.v_proj.{kind}"] = v
            out[f"{dst}attn.out_proj.{kind}"] = visual_state[f"{src}attn.out_proj.{kind}"]
            for ours, theirs in names.items():
                target = f"{dst}mlp.{theirs}" if theirs.startswith("fc") else dst + theirs
                out[f"{target}.{kind}"] = visual_state[f"{src}{ours}.{kind}"]
    return out


def test_a_finetuned_official_backbone_lands_in_the_clip_tower(tmp_path: Path) -> None:
    cfg = _config(tmp_path, mode="finetune")
    source = _seeded_visual(cfg)
    state = {k.removeprefix("module."): v for k, v in official_state(*_dims(cfg)).items()}
    model, report = import_official(state | official_backbone(source), cfg)
    assert report.complete, report.summary()
    mine = model.backbone.visual.state_dict()
    trained = [k.removeprefix("backbone.visual.") for k in report.weights if "backbone." in k]
    assert "conv1.weight" in trained and "transformer.resblocks.1.attn.in_proj_weight" in trained
    for key in trained:
        assert torch.equal(mine[key], source[key]), key


def _seeded_visual(cfg: ExperimentConfig) -> dict:
    from evl_platform.models import create_model

    g = torch.Generator().manual_seed(7)
    visual = create_model(cfg, load_weights=False).backbone.visual.state_dict()
    return {k: torch.randn(v.shape, generator=g) for k, v in visual.items()}


def test_register_makes_the_import_a_run_that_predicts(
    tmp_path: Path, motion_small, capsys: pytest.CaptureFixture
) -> None:
    from conftest import layout_data

    cfg = write_config(
        tmp_path / "exp.yaml",
        layout_data(motion_small),
        name="official",
        model={
            "backbone": {"name": "micro-vit"},
            "decoder": {"num_layers": LAYERS, "temporal_cross_attn": True},
        },
    )
    torch.save({"model": official_state(*_dims(cfg))}, tmp_path / "official.pth")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = [
        "import-checkpoint",
        str(tmp_path / "official.pth"),
        "--config",
        str(tmp_path / "exp.yaml"),
    ]
    assert main([*argv, "--register", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    run_id = out.split("MLflow run ")[1].split()[0]
    video = str(next(Path(motion_small.root).rglob(f"*{motion_small.video_extension}")))
    assert main(["predict", run_id, video, "--tracking-uri", uri, "--json", "--topk", "2"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found[0]["path"] == video and len(found[0]["top"]) == 2
    weights = str(tmp_path / "official.evl.pt")  # the written file, with its config
    argv = ["predict", weights, video, "--config", str(tmp_path / "exp.yaml"), "--topk", "2"]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == found
    import mlflow.pyfunc
    import pandas as pd

    mlflow.set_tracking_uri(uri)
    frame = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(
        pd.DataFrame({"video": [video]})
    )
    assert frame["label"][0] == found[0]["top"][0]["class"]

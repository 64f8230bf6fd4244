"""The second model family: a small 3D CNN trained from scratch (``model.arch: cnn3d``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import layout_data, write_config

from evl_platform.cli import main
from evl_platform.config import ConfigError, load_config
from evl_platform.config.schema import ExperimentConfig
from evl_platform.data.synth import SyntheticLayout
from evl_platform.models import EVL, Cnn3d, count_gmacs, create_model, model_info
from evl_platform.train.inputs import create_source
from evl_platform.train.loop import (
    EVLForward,
    batches_from,
    create_optimizer,
    create_scaler,
    create_schedule,
    evaluate,
    train_step,
)
from evl_platform.train.state import trainable_state

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
FIXED_VIEWS = {"random_resized_crop": None, "rand_augment": None, "horizontal_flip": False}


def make_cfg(*, frames: int = 8, classes: int = 10, **cnn3d: object) -> ExperimentConfig:
    cnn3d.setdefault("dropout", 0.0)
    return ExperimentConfig.model_validate(
        {
            "model": {"arch": "cnn3d", "cnn3d": cnn3d},
            "data": {"num_classes": classes, "num_frames": frames},
        }
    )


def random_clips(batch: int = 2, frames: int = 8, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(0))


# --- config ------------------------------------------------------------------------------------


def test_evl_stays_the_default() -> None:
    assert ExperimentConfig().model.arch == "evl"
    assert isinstance(create_model(ExperimentConfig.model_validate({})), EVL)


def _load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return str(err.value)


def test_reuse_is_refused_with_the_keys_named(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(
        "model: {arch: cnn3d}\n"
        "features: {reuse: true}\n"
        "data: {augment: {random_resized_crop: null, rand_augment: null, "
        "horizontal_flip: false}}\n"
    )
    assert _load_error(path) == (
        f"{path}: features.reuse caches frozen CLIP backbone features, but model.arch 'cnn3d' "
        "has no frozen backbone (it trains end to end on decoded clips); set "
        "features.reuse: false"
    )


def test_unknown_arch_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("model: {arch: resnet}\n")
    assert _load_error(path) == f"{path}: model.arch: expected one of 'evl', 'cnn3d', got 'resnet'"


def test_depth_must_be_positive(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("model: {arch: cnn3d, cnn3d: {depth: 0}}\n")
    assert _load_error(path) == f"{path}: model.cnn3d.depth: expected int >= 1, got 0"


# --- the network -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "size", "depth"), [(8, 64, 4), (4, 32, 1), (16, 64, 2), (1, 16, 5)]
)
def test_forward_shapes(frames: int, size: int, depth: int) -> None:
    model = create_model(make_cfg(frames=frames, classes=7, width=8, depth=depth))
    assert isinstance(model, Cnn3d)
    assert model(random_clips(3, frames, size)).shape == (3, 7)


def test_everything_is_trainable_and_saved() -> None:
    model = create_model(make_cfg(width=8))
    params = list(model.parameters())
    assert params and all(p.requires_grad for p in params)
    assert model.new_parameters() == params
    optimised = create_optimizer(model, ExperimentConfig().train).param_groups[0]["params"]
    assert len(optimised) == len(params)
    # No frozen part: weights and BatchNorm statistics all go into checkpoints and weights.pt.
    assert trainable_state(model).keys() == model.state_dict().keys()
    assert model.forward_images == 0  # no image encoder (train/backbone_forward_images)


def test_frame_order_changes_the_output() -> None:
    torch.manual_seed(0)
    model = create_model(make_cfg(width=8)).eval()
    clips = random_clips()
    with torch.no_grad():
        forward, backward = model(clips), model(clips.flip(2))
    assert not torch.allclose(forward, backward, atol=1e-4)


def test_gflops_count_the_convolutions_and_the_head() -> None:
    with torch.device("meta"):
        model = create_model(make_cfg())
    # (positions x out x in x kernel) per layer, 8 frames at 64 px, width 32, depth 4:
    # stem 8x16x16 . 32 . 3x4x4, blocks at 8x8x8, 4x4x4, 2x2x2, 1x1x1, head 256 x 10.
    macs = (
        2048 * 32 * 48
        + 512 * 32 * 32 * 27
        + 64 * 64 * 32 * 27
        + 8 * 128 * 64 * 27
        + 1 * 256 * 128 * 27
        + 256 * 10
    )
    assert count_gmacs(model, num_frames=8) == pytest.approx(macs / 1e9)


# --- model-info --------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", ["local_motion_cnn3d", "local_appearance_cnn3d"])
def test_model_info(capsys, monkeypatch, stem: str) -> None:
    monkeypatch.chdir(ROOT)
    path = f"experiments/{stem}.yaml"
    assert main(["model-info", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "cnn3d" and info["backbone_params"] == 0
    assert info["new_params"] == info["trainable_params"] == 1_193_994
    assert info["gflops_per_view"] == pytest.approx(0.0235, abs=1e-3)
    assert info["gflops_total"] == pytest.approx(3 * info["gflops_per_view"])
    assert info == model_info(load_config(path))
    assert main(["model-info", path]) == 0
    assert "3D CNN from scratch" in capsys.readouterr().out


# --- training on a real stand-in ---------------------------------------------------------------


def test_a_few_steps_on_a_stand_in_reduce_the_loss(
    tmp_path: Path, motion_small: SyntheticLayout
) -> None:
    cfg = write_config(
        tmp_path / "cnn3d.yaml",
        layout_data(motion_small, augment=FIXED_VIEWS, test_views={"temporal": 2}),
        model={
            "arch": "cnn3d",
            "backbone": {"name": "micro-vit"},  # 32 px clips
            "cnn3d": {"width": 8, "depth": 2, "dropout": 0.0},
        },
        train={"lr": 1e-2, "num_steps": 12, "batch_size": 10, "amp": "none"},
        features={"reuse": False},
    )
    torch.manual_seed(0)
    model = create_model(cfg)
    net = EVLForward(model)
    optimizer = create_optimizer(model, cfg.train)
    schedule = create_schedule(optimizer, cfg.train)
    source, video_ids, classes = create_source(cfg, rank=0, world=1, batch=10, device=CPU)
    _, batch = next(batches_from(0, source.steps_per_epoch, source.train_batches))
    assert batch.inputs.shape == (10, 3, 8, 32, 32)  # decoded clips, 32 px for micro-vit
    losses = [
        train_step(
            net,
            batch,
            optimizer=optimizer,
            scheduler=schedule,
            scaler=create_scaler(CPU, None),
            device=CPU,
            amp=None,
        ).loss.item()
        for _ in range(cfg.train.num_steps)
    ]
    assert losses[-1] < 0.7 * losses[0], losses  # 2.46 -> 1.43 when written
    scores = evaluate(net, source.val_batches(), device=CPU, amp=None)
    assert scores.probs.shape == (len(video_ids), len(classes))

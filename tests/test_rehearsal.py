"""The rehearsal profile: the paper's architectures and recipe, random init, real-size videos.

Every paper experiment resolves under ``--profile rehearsal`` to the paper profile's model and
clip recipe (only the backbone's weights and storage dtype differ), on stand-ins written at
real sizes and codecs; every ablation loads with it; and a small rehearsal (one pack of two
ViT-B/16 decoders, 2 steps) runs through the real sweep (Ray Tune, Ray Train, MLflow) to its
results table, so the paper path stays alive.
"""

from __future__ import annotations

from pathlib import Path

import av
import pytest
import yaml
from mlflow.tracking import MlflowClient

from evl_platform.cli import main
from evl_platform.config import load_config
from evl_platform.data.source import resolve_files, synth_params
from evl_platform.sweep.spec import load_ablation
from evl_platform.tracking import names

REPO = Path(__file__).resolve().parent.parent
PAPER_EXPERIMENTS = sorted(
    p for p in (REPO / "experiments").glob("*.yaml") if p.name.startswith(("k400_", "ssv2_"))
)
# What a rehearsal may change in the model: the weights (random init) and the frozen
# backbone's storage dtype (float16 matmuls are far slower than float32 on a CPU).
WEIGHTS_ONLY = {"backbone": {"pretrained", "dtype"}}


def _model_without_weights(cfg) -> dict:
    model = cfg.model.model_dump()
    for part, keys in WEIGHTS_ONLY.items():
        for key in keys:
            model[part].pop(key)
    return model


@pytest.mark.parametrize("path", PAPER_EXPERIMENTS, ids=lambda p: p.stem)
def test_rehearsal_is_the_paper_architecture_and_recipe_with_random_weights(path: Path) -> None:
    paper = load_config(path, profile="paper")
    rehearsal = load_config(path, profile="rehearsal")
    assert rehearsal.profile == "rehearsal"
    assert rehearsal.model.backbone.pretrained is None
    assert paper.model.backbone.pretrained == "openai"
    assert _model_without_weights(rehearsal) == _model_without_weights(paper)
    for key in ("num_frames", "sampling", "stride", "test_views", "augment", "min_frames"):
        assert getattr(rehearsal.data, key) == getattr(paper.data, key), key
    assert rehearsal.data.augment.rand_augment == "m7-n4"
    assert rehearsal.data.augment.random_resized_crop == (0.08, 1.0)
    assert rehearsal.features.reuse is False  # the paper's augmentation makes a cache invalid
    assert (rehearsal.train.lr, rehearsal.train.amp) == (paper.train.lr, paper.train.amp)
    assert rehearsal.train.batch_size <= 4 and rehearsal.train.num_steps <= 10


@pytest.mark.parametrize("path", PAPER_EXPERIMENTS, ids=lambda p: p.stem)
def test_rehearsal_videos_have_the_real_datasets_sizes_and_codecs(path: Path) -> None:
    cfg = load_config(path, profile="rehearsal")
    params = synth_params(cfg.data.synthetic)
    seconds = params.num_frames / params.fps
    if path.name.startswith("k400_"):  # Kinetics: YouTube H.264 mp4, 10 s clips
        assert cfg.data.dataset == "synthetic-appearance"
        assert (params.codec, params.extension) == ("h264", ".mp4")
        assert min(params.width, params.height) >= 256 and 25 <= params.fps <= 30
        assert seconds == 10 and params.keyframe_interval >= params.fps
    else:  # Something-Something-v2: VP9 webm, 240 px high, 12 fps, 2-6 s
        assert cfg.data.dataset == "synthetic-motion"
        assert (params.codec, params.extension) == ("vp9", ".webm")
        assert params.height == 240 and params.fps == 12 and 2 <= seconds <= 6


@pytest.mark.parametrize("path", sorted((REPO / "ablations").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_ablation_loads_for_the_rehearsal(path: Path) -> None:
    ablation = load_ablation(path, profile="rehearsal")
    assert ablation.profile == "rehearsal"
    assert not ablation.spec.resources.use_gpu  # written for this CPU box; GPUs: gpu-check.sh


@pytest.mark.usefixtures("ray_local")
def test_a_small_rehearsal_sweeps_a_pack_of_two_vitb16_decoders_to_its_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One pack of 2 ViT-B/16 decoders (paper width, 4 layers, 8 frames at 224 px, RandAugment,
    2 steps at batch 2), on 1 clip per class of Kinetics-like H.264 340x256 video; shorter than
    the full rehearsal to stay within a CI minute or two: 2 s videos instead of 10, and one test
    view instead of 3."""
    ablation = tmp_path / "rehearsal.yaml"
    ablation.write_text(
        yaml.safe_dump(
            {
                "name": "rehearsal_ci",
                "table": {"paper": "8a", "title": "rehearsal", "columns": {"k400": "K-400"}},
                "experiments": {"k400": str(REPO / "experiments/k400_vitb16_8f.yaml")},
                "variants": {
                    "none": {"model.decoder.temporal_conv": False},
                    "t_conv": {"model.decoder.temporal_conv": True},
                },
                "resources": {"num_workers": 1, "cpus_per_worker": 2},
            }
        )
    )
    shrink = [  # 10 training clips of 2 s; validation on 10 clips x 1 view
        "data.synthetic.clips_per_class=1",
        "data.synthetic.video_frames=50",
        "data.test_views.temporal=1",
    ]
    store = f"sqlite:///{tmp_path}/mlflow.db"
    args = [
        "sweep",
        str(ablation),
        "--profile",
        "rehearsal",
        *[a for s in shrink for a in ("--set", s)],
        "--tracking-uri",
        store,
        "--storage-path",
        str(tmp_path / "storage"),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "none" in out and "t_conv" in out  # the results table's rows
    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    children = [r for r in runs if names.TAG_VARIANT in r.data.tags]
    assert sorted(r.data.params["model.decoder.temporal_conv"] for r in children) == [
        "False",
        "True",
    ]
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.params["model.backbone.name"] == "ViT-B-16"
        assert run.data.params["data.augment.rand_augment"] == "m7-n4"
        assert 0.0 <= run.data.metrics["val/acc1"] <= 100.0  # percent
        assert run.data.params["data.augment.on"] == "device"  # RandAugment on the device
        # what shows a starving device: the step's wait for data and the node's utilisation
        assert run.data.metrics["data/wait_s"] >= 0.0
        assert 0.0 <= run.data.metrics["system/cpu_utilization_percentage"] <= 100.0
    assert len({r.data.tags.get(names.TAG_PACK) for r in children}) == 1  # one pack, one pass
    assert all(r.data.tags[names.TAG_PROFILE] == "rehearsal" for r in children)
    cfg = load_config(
        REPO / "experiments/k400_vitb16_8f.yaml", overrides=shrink, profile="rehearsal"
    )
    video = next(resolve_files(cfg.data, progress=False).root.glob("*.mp4"))
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", 340, 256)

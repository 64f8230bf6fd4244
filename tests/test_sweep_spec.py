"""Ablation files: loading, expansion into trials, dry runs, bad input, results tables."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from evl_platform.cli import main
from evl_platform.models import create_model, model_info
from evl_platform.sweep.plan import expand
from evl_platform.sweep.results import ResultsTable
from evl_platform.sweep.spec import AblationError, load_ablation

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = sorted((ROOT / "ablations").glob("*.yaml"))


def test_every_paper_table_has_an_ablation_file() -> None:
    names = {p.stem for p in ABLATIONS}
    assert names >= {
        "temporal_modules",
        "decoder_depth",
        "feature_layers",
        "feature_shape",
        "backbone_mode",
        "num_frames",
        "ensemble",
        "lr_search",
    }


@pytest.mark.parametrize("profile", ["local", "paper"])
@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_dry_run_lists_every_trial(
    path: Path, profile: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["sweep", str(path), "--dry-run", "--profile", profile])
    out, err = capsys.readouterr()
    if path.stem == "ensemble" and profile == "paper":
        # the supervised models' scores come from files the user provides
        assert code == 2
        assert "uniformer_b16_k400_val.csv" in err and "video_id" in err
        return
    assert code == 0, err
    ablation = load_ablation(path, profile=profile)
    trials = expand(ablation)
    assert f"profile {profile}, {len(trials)} trials" in out
    assert len({t.key for t in trials}) == len(trials)
    for trial in trials:
        assert any(
            line.split()[:3] == [trial.variant, trial.dataset, "0"] for line in out.splitlines()
        )
    if profile == "local":  # the local profile maps the datasets onto the stand-ins
        for trial in trials:
            if trial.scores is None:
                dataset = trial.cfg.data.dataset
                expected = {"k400": "synthetic-appearance", "ssv2": "synthetic-motion"}
                assert dataset == expected[trial.dataset]


def test_temporal_modules_expands_to_the_eight_combinations_on_two_datasets() -> None:
    ablation = load_ablation(ROOT / "ablations/temporal_modules.yaml")
    trials = expand(ablation)
    assert len(trials) == 16
    seen = set()
    for trial in trials:
        decoder = trial.cfg.model.decoder
        flags = (decoder.temporal_conv, decoder.temporal_pos_embed, decoder.temporal_cross_attn)
        seen.add((trial.dataset, flags))
        if trial.variant == "none":
            assert flags == (False, False, False)
        if trial.variant == "all":
            assert flags == (True, True, True)
    assert len(seen) == 16
    assert len(expand(ablation, seeds=3)) == 48
    assert {t.seed for t in expand(ablation, seeds=3)} == {0, 1, 2}
    assert {t.cfg.seed for t in expand(ablation, seeds=2)} == {0, 1}
    # seed_keys: each seed also draws its own stand-in videos, so seeds are data seeds too
    for trial in expand(ablation, seeds=3):
        assert trial.cfg.data.synthetic.seed == trial.cfg.seed == trial.seed


def _block_outputs(model: torch.nn.Module, clip: torch.Tensor) -> list[torch.Tensor]:
    """Every backbone block's output for each frame of ``clip``, computed by open_clip's own
    blocks (the reference for what the decoder must read), (N*T, L, C) each."""
    visual = model.backbone.visual
    frames = clip.transpose(1, 2).flatten(0, 1)  # (N*T, 3, H, W)
    outputs = []
    with torch.no_grad():
        x = visual._embeds(frames)
        for block in visual.transformer.resblocks:
            x = block(x)
            outputs.append(x)
    return outputs


def test_feature_layers_variants_feed_the_listed_blocks() -> None:
    local = load_ablation(ROOT / "ablations/feature_layers.yaml", profile="local")
    torch.manual_seed(0)
    clip = torch.randn(1, 3, 8, 64, 64)
    for trial in expand(local):
        cfg = trial.cfg
        listed = cfg.model.decoder.feature_layers
        model = create_model(cfg, load_weights=False)
        depth = len(model.backbone.visual.transformer.resblocks)
        assert model.feature_layers == tuple(i % depth for i in listed)
        blocks = _block_outputs(model, clip)
        with torch.no_grad():
            features = model.extract_features(clip)
        assert len(features) == len(listed)
        for decoder_layer, block in enumerate(listed):
            got = features[decoder_layer].out.flatten(0, 1)  # (N*T, L, C)
            # atol 1e-4: the tiny backbone's sharp content attention amplifies float rounding
            torch.testing.assert_close(got, blocks[block % depth], atol=1e-4, rtol=1e-4)
        others = [blocks[i] for i in range(depth) if i not in {b % depth for b in listed}]
        for other in others:  # and not some other block
            assert not any(torch.allclose(f.out.flatten(0, 1), other) for f in features)
    paper = load_ablation(ROOT / "ablations/feature_layers.yaml", profile="paper")
    read = {t.variant: model_info(t.cfg)["feature_layers"] for t in expand(paper)}
    assert read["spread"] == [5, 7, 9, 11]  # [-7, -5, -3, -1] of ViT-B/16's 12 blocks
    assert read["last2_twice"] == [10, 10, 11, 11]
    assert read["interleaved"] == [10, 11, 10, 11]


def _write(path: Path, body: dict) -> Path:
    path.write_text(yaml.safe_dump(body))
    return path


def _ablation(tmp_path: Path, **changes: object) -> Path:
    body = {
        "table": {"paper": "8a"},
        "experiments": {"ssv2": str(ROOT / "experiments/local_motion_tiny.yaml")},
        "variants": {"none": {"model.decoder.temporal_conv": False}},
    }
    body.update(changes)
    return _write(tmp_path / "abl.yaml", body)


def test_bad_ablation_files_name_the_file_and_the_key(tmp_path: Path) -> None:
    path = _ablation(tmp_path, tabel={"paper": "8a"})
    with pytest.raises(AblationError, match=r"abl\.yaml: tabel: Extra inputs"):
        load_ablation(path)
    path = _ablation(tmp_path, variants={"x": {"datasets": ["k400"]}})
    with pytest.raises(AblationError, match=r"abl\.yaml: variants\.x: unknown dataset 'k400'"):
        load_ablation(path)
    path = _ablation(tmp_path, experiments={"ssv2": "nowhere.yaml"})
    with pytest.raises(AblationError, match=r"experiments\.ssv2: no such file .*nowhere\.yaml"):
        load_ablation(path)
    path = _ablation(tmp_path, variants={"deep": {"model.decoder.num_layers": "four"}})
    ablation = load_ablation(path)
    with pytest.raises(AblationError, match=r"variant 'deep' on ssv2: .*num_layers"):
        expand(ablation)
    path = _ablation(tmp_path, seeds=0)
    with pytest.raises(AblationError, match="seeds must be >= 1"):
        load_ablation(path)
    path = _ablation(tmp_path, seed_keys=["seed", "data.synthetic.sed"])
    with pytest.raises(AblationError, match=r"variant 'none' on ssv2: .*synthetic\.sed"):
        expand(load_ablation(path))
    path = _ablation(tmp_path, seed_keys=["seed", "seed"])
    with pytest.raises(AblationError, match=r"abl\.yaml: .*seed_keys: a key is named twice"):
        load_ablation(path)
    (tmp_path / "broken.yaml").write_text("variants: [unclosed\n")
    with pytest.raises(AblationError, match=r"broken\.yaml: not valid YAML"):
        load_ablation(tmp_path / "broken.yaml")


def test_cli_reports_a_bad_ablation_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _ablation(tmp_path, variants={"deep": {"model.decoder.nm_layers": 2}})
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "abl.yaml: variant 'deep' on ssv2" in err and "nm_layers" in err


def test_grid_and_profile_overlays(tmp_path: Path) -> None:
    path = _ablation(
        tmp_path,
        grid={"train.lr": [1.0e-4, 1.0e-3]},
        seeds=[3, 4],
        profiles={"paper": {"variants": {"other": {}}, "seeds": 1}},
    )
    trials = expand(load_ablation(path))
    assert [t.key for t in trials] == [
        "none/ssv2/lr=0.0001/seed3",
        "none/ssv2/lr=0.0001/seed4",
        "none/ssv2/lr=0.001/seed3",
        "none/ssv2/lr=0.001/seed4",
    ]
    assert trials[2].cfg.train.lr == 1.0e-3
    # the default seed_keys ([seed]): the seeds share the stand-in videos of data seed 0
    assert {(t.cfg.seed, t.cfg.data.synthetic.seed) for t in trials} == {(3, 0), (4, 0)}
    paper = expand(load_ablation(path, profile="paper"))
    assert [t.key for t in paper] == ["other/ssv2/lr=0.0001/seed0", "other/ssv2/lr=0.001/seed0"]


def test_results_table_mean_and_std_over_seeds(tmp_path: Path) -> None:
    table = ResultsTable(
        title="t", metric="val/acc1", rows=["none", "all"], columns=["k400", "ssv2"]
    )
    for value in (50.0, 52.0, 54.0):
        table.add("none", "ssv2", value)
    table.add("all", "ssv2", 80.0)
    assert table.cell("none", "ssv2").text() == "52.0 ± 2.0 (n=3)"
    assert table.cell("all", "ssv2").text() == "80.0"
    assert table.cell("all", "k400").text() == "not run"
    assert "| none | not run | 52.0 ± 2.0 (n=3) |" in table.markdown()
    table.write_csv(tmp_path / "r.csv")
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert "none,ssv2,,3,52.0000,2.0000,50.0000 52.0000 54.0000" in lines
    assert "all,k400,,0,,," in lines

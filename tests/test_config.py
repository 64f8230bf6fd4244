"""Experiment YAML loading: every shipped file, overrides, paths, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from evl_platform.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    dump_config,
    flatten_config,
    load_config,
    parse_override,
)

ROOT = Path(__file__).resolve().parents[1]
BROKEN = "tests/fixtures/broken"
EXPERIMENTS = sorted(
    path.relative_to(ROOT).as_posix()
    for path in (ROOT / "experiments").rglob("*.yaml")
    if not {"base", "ablations"} & set(path.relative_to(ROOT / "experiments").parts[:-1])
)


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load with paths relative to the repo root, as a user at the root types them."""
    monkeypatch.chdir(ROOT)


def _load_error(path: str | Path, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- every shipped experiment ------------------------------------------------------------------


def test_experiments_are_found() -> None:
    assert "experiments/k400_vitb16_8f.yaml" in EXPERIMENTS
    assert not any(path.startswith("experiments/base/") for path in EXPERIMENTS)


@pytest.mark.parametrize("profile", ["local", "paper"])
@pytest.mark.parametrize("path", EXPERIMENTS)
def test_experiment_loads_and_round_trips(path: str, profile: str, tmp_path: Path) -> None:
    cfg = load_config(path, profile=profile)
    assert cfg.profile == profile
    assert cfg.profiles == {}
    assert cfg.name == Path(path).stem
    dumped = _write(tmp_path / "elsewhere" / "resolved.yaml", dump_config(cfg))
    assert load_config(dumped) == cfg


def test_k400_32f_paper_recipe() -> None:
    cfg = load_config("experiments/k400_vitb16_32f.yaml")
    assert cfg.profile == "paper"
    assert (cfg.data.num_frames, cfg.data.stride, cfg.data.sampling) == (32, 8, "dense")
    assert cfg.data.num_classes == 400
    assert cfg.train.lr == pytest.approx(4e-4)
    assert (cfg.train.num_steps, cfg.train.batch_size) == (50_000, 256)
    assert cfg.model.backbone.name == "ViT-B-16"
    assert cfg.model.backbone.pretrained == "openai"
    assert cfg.data.root == str(ROOT / "data/kinetics400/videos")
    assert cfg.data.test_views.total == 3


def test_ssv2_recipe_has_no_flips_and_uniform_sampling() -> None:
    for profile in ("local", "rehearsal", "paper"):
        cfg = load_config("experiments/ssv2_vitb16_8f.yaml", profile=profile)
        assert cfg.data.augment.horizontal_flip is False
        assert cfg.data.sampling == "uniform"
    paper = load_config("experiments/ssv2_vitb16_8f.yaml")
    assert (paper.data.num_classes, paper.model.decoder.num_layers) == (174, 12)
    assert paper.model.decoder.temporal_cross_attn is True


@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if "/k400_" in p])
def test_local_profile_swaps_in_the_k400_stand_in(path: str) -> None:
    cfg = load_config(path, profile="local")
    assert cfg.model.backbone.name == "tiny-vit"
    assert cfg.model.backbone.pretrained is None
    assert cfg.data.dataset == "synthetic-appearance"
    assert cfg.data.root is None
    assert (cfg.train.amp, cfg.train.num_steps) == ("none", 300)


def test_vitl_ssv2_decoder_reads_every_block() -> None:
    assert load_config("experiments/ssv2_vitl14_8f.yaml").model.decoder.num_layers == 24
    assert (
        load_config("experiments/ssv2_vitl14_8f.yaml", profile="local").model.decoder.num_layers
        == 4
    )


def test_flatten_config_uses_dotted_keys() -> None:
    flat = flatten_config(load_config("experiments/k400_vitb16_8f.yaml"))
    assert flat["model.decoder.num_layers"] == 4
    assert flat["data.augment.random_resized_crop"] == [0.08, 1.0]
    assert flat["data.test_views.temporal"] == 3
    assert not any(isinstance(value, dict) for value in flat.values())


# --- overrides ---------------------------------------------------------------------------------

K400 = "experiments/k400_vitb16_8f.yaml"
_DECODER_KEYS = (
    "num_layers, feature_layers, num_heads, mlp_ratio, mlp_dropout, temporal_conv, "
    "temporal_pos_embed, temporal_cross_attn, feature_shape"
)


def test_overrides_are_parsed_as_yaml() -> None:
    cfg = load_config(
        K400,
        overrides=[
            "model.decoder.num_layers=2",
            "model.decoder.feature_layers=[-2,-1]",
            "data.augment.horizontal_flip=false",
            "data.augment.rand_augment=null",
            "train.lr=1e-4",
            "name=my run",
        ],
    )
    assert cfg.model.decoder.num_layers == 2
    assert cfg.model.decoder.feature_layers == (-2, -1)
    assert cfg.data.augment.horizontal_flip is False
    assert cfg.data.augment.rand_augment is None
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.name == "my run"


def test_overrides_win_over_the_profile_overlay() -> None:
    cfg = load_config(K400, profile="local", overrides=["train.num_steps=7"])
    assert cfg.train.num_steps == 7


def test_profile_override_selects_the_overlay() -> None:
    assert load_config(K400, overrides=["profile=local"]).data.dataset == "synthetic-appearance"
    assert load_config(K400, profile="paper", overrides=["profile=local"]).profile == "paper"


def test_override_paths_resolve_against_the_working_directory() -> None:
    cfg = load_config(
        K400, overrides=["data.root=videos", "model.backbone.pretrained=weights/clip.pt"]
    )
    assert cfg.data.root == str(ROOT / "videos")
    assert cfg.model.backbone.pretrained == str(ROOT / "weights/clip.pt")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "model.decoder.num_layrs=3",
            f"{K400}: --set model.decoder.num_layrs=3: unknown key 'num_layrs' (allowed: "
            "num_layers, feature_layers, num_heads, mlp_ratio, mlp_dropout, temporal_conv, "
            "temporal_pos_embed, temporal_cross_attn, feature_shape)",
        ),
        (
            "data.num_frames.x=3",
            f"{K400}: --set data.num_frames.x=3: unknown key 'x' "
            "(data.num_frames is int >= 1, not a mapping)",
        ),
        (
            "model.decoder.num_layers=four",
            f"{K400}: --set model.decoder.num_layers=four: "
            "model.decoder.num_layers: expected int >= 1, got 'four'",
        ),
        (
            "model.decoder.feature_layers=[-1]",
            f"{K400}: --set model.decoder.feature_layers=[-1]: model.decoder: feature_layers "
            "has 1 entries but num_layers is 4; give one backbone layer per decoder layer",
        ),
        (
            "data.augment.random_resized_crop=[0.1]",
            f"{K400}: --set data.augment.random_resized_crop=[0.1]: "
            "data.augment.random_resized_crop: expected list of 2 float or null, got [0.1]",
        ),
        ("novalue", f"{K400}: --set novalue: expected key=value with a dotted key, e.g. "),
        ("=3", f"{K400}: --set =3: expected key=value"),
        ("a..b=1", f"{K400}: --set a..b=1: expected key=value"),
        ("profiles.local.seed=1", f"{K400}: --set profiles.local.seed=1: overlays cannot"),
        (
            "profile=gpu",
            f"{K400}: profile: unknown profile 'gpu' (allowed: local, rehearsal, paper)",
        ),
    ],
)
def test_bad_override(override: str, expected: str) -> None:
    assert _load_error(K400, overrides=[override]).startswith(expected)


def test_unknown_profile_argument() -> None:
    message = _load_error(K400, profile="gpu")
    assert message == f"{K400}: profile: unknown profile 'gpu' (allowed: local, rehearsal, paper)"


def test_parse_override() -> None:
    assert parse_override("train.lr=4.0e-4") == ("train.lr", 4e-4)
    assert parse_override(" model.backbone.pretrained = openai") == (
        "model.backbone.pretrained",
        "openai",
    )
    assert parse_override("a=x=y") == ("a", "x=y")


def test_apply_overrides_sets_values_on_a_resolved_config(tmp_path: Path) -> None:
    cfg = load_config(K400, profile="local")
    before = cfg.model_dump()
    applied = apply_overrides(
        cfg,
        {"train.lr": 1e-3, "model.head.dropout": 0.25, "data.root": "videos"},
        base_dir=tmp_path,
    )
    assert (applied.train.lr, applied.model.head.dropout) == (1e-3, 0.25)
    assert applied.data.root == str(tmp_path / "videos")
    assert cfg.model_dump() == before  # a new config; the resolved one is unchanged
    # the same values as --set give the same config
    overrides = ["train.lr=0.001", "model.head.dropout=0.25", f"data.root={tmp_path / 'videos'}"]
    assert applied == load_config(K400, profile="local", overrides=overrides)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"model.decoder.num_layrs": 3},
            "sample: model.decoder.num_layrs=3: unknown key 'num_layrs' "
            f"(allowed: {_DECODER_KEYS})",
        ),
        (
            {"train.lr.x": 1},
            "sample: train.lr.x=1: unknown key 'x' (train.lr is float > 0, not a mapping)",
        ),
        (
            {"model.decoder.num_layers": "four"},
            "sample: model.decoder.num_layers: expected int >= 1, got 'four' "
            '(set in model.decoder.num_layers="four")',
        ),
        ({"profile": "paper"}, 'sample: profile="paper": the profile and its overlays were'),
        ({"train..lr": 1}, "sample: train..lr=1: expected a dotted key"),
    ],
)
def test_apply_overrides_names_the_source_and_the_key(values: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(load_config(K400), values, source="sample")
    assert str(info.value).startswith(expected)


# --- bases, paths, names -----------------------------------------------------------------------


def test_paths_resolve_against_the_file_that_wrote_them(tmp_path: Path) -> None:
    _write(
        tmp_path / "shared/base.yaml",
        "data:\n  train_annotations: ann/train.csv\n  label_map: null\n"
        "profiles:\n  paper:\n    data:\n      val_annotations: ann/val.csv\n",
    )
    top = _write(
        tmp_path / "runs/exp.yaml",
        "base: ../shared/base.yaml\n"
        "data:\n  root: ../videos\n"
        "model:\n  backbone:\n    pretrained: weights/clip.pt\n",
    )
    cfg = load_config(top, profile="paper")
    assert cfg.data.train_annotations == str(tmp_path / "shared/ann/train.csv")
    assert cfg.data.val_annotations == str(tmp_path / "shared/ann/val.csv")
    assert cfg.data.root == str(tmp_path / "videos")
    assert cfg.data.label_map is None
    assert cfg.model.backbone.pretrained == str(tmp_path / "runs/weights/clip.pt")


def test_pretrained_tag_is_not_a_path(tmp_path: Path) -> None:
    top = _write(tmp_path / "exp.yaml", "model:\n  backbone:\n    pretrained: openai\n")
    assert load_config(top).model.backbone.pretrained == "openai"


def test_bases_merge_in_order_and_names_do_not_leak(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "name: from_a\nseed: 1\ndata:\n  num_frames: 4\n  stride: 2\n")
    _write(tmp_path / "b.yaml", "seed: 2\ndata:\n  augment:\n    random_resized_crop: null\n")
    top = _write(tmp_path / "child.yaml", "base: [a.yaml, b.yaml]\ndata:\n  num_frames: 16\n")
    cfg = load_config(top)
    assert cfg.name == "child"
    assert cfg.seed == 2
    assert (cfg.data.num_frames, cfg.data.stride) == (16, 2)
    assert cfg.data.augment.random_resized_crop is None
    named = _write(tmp_path / "named.yaml", "base: a.yaml\nname: explicit\n")
    assert load_config(named).name == "explicit"


def test_resolved_config_has_no_overlays() -> None:
    cfg = load_config("experiments/base/k400.yaml", profile="local")
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.profiles == {}
    assert "profiles:" in dump_config(cfg)


# --- broken files ------------------------------------------------------------------------------

BROKEN_CASES = {
    "unknown_key": f"model.decoder: unknown key 'num_layrs' (allowed: {_DECODER_KEYS})",
    "wrong_type": "model.decoder.num_layers: expected int >= 1, got 'four'",
    "out_of_range": "model.decoder.mlp_dropout: expected float >= 0 and < 1, got 1.5",
    "bad_literal": "data.sampling: expected one of 'dense', 'uniform', got 'random'",
    "feature_layers_mismatch": "model.decoder: feature_layers has 2 entries but num_layers is 4; "
    "give one backbone layer per decoder layer",
    "yaml_syntax": "YAML syntax error at line 6, column 5: expected ',' or ']', but got ':' "
    "(while parsing a flow sequence started at line 5, column 21)",
    "top_level_list": "expected a mapping at the top level, got list",
    "several_errors": "data.num_frames: expected int >= 1, got 0 "
    "(and 2 more: data.sampling, train.lr)",
    "bad_base_value": "model.decoder.num_layers: expected int >= 1, got 'four' "
    f"(set in {BROKEN}/wrong_type.yaml)",
    "bad_overlay": "data.num_frames: expected int >= 1, got 0 "
    f"(set in {BROKEN}/bad_overlay.yaml, profiles.local)",
    "unknown_profile": "profiles: unknown profile 'gpu' (allowed: local, rehearsal, paper)",
    "missing_base": f"base: file not found: {BROKEN}/nope.yaml",
}


@pytest.mark.parametrize(("stem", "expected"), BROKEN_CASES.items(), ids=list(BROKEN_CASES))
def test_broken_file_gives_one_line(stem: str, expected: str) -> None:
    path = f"{BROKEN}/{stem}.yaml"
    assert _load_error(path) == f"{path}: {expected}"


def test_cyclic_base_names_the_cycle() -> None:
    a, b = f"{BROKEN}/cycle_a.yaml", f"{BROKEN}/cycle_b.yaml"
    assert _load_error(a) == f"{b}: base: cycle: {a} -> {b} -> {a}"


def test_missing_file() -> None:
    assert _load_error(f"{BROKEN}/absent.yaml") == f"{BROKEN}/absent.yaml: file not found"


def test_broken_files_all_have_a_case() -> None:
    stems = {path.stem for path in (ROOT / BROKEN).glob("*.yaml")}
    assert stems == set(BROKEN_CASES) | {"cycle_a", "cycle_b"}


def test_the_profile_option_offers_exactly_the_config_profiles() -> None:
    from evl_platform.arguments import PROFILE_CHOICES
    from evl_platform.config.loader import PROFILES

    assert PROFILE_CHOICES == PROFILES

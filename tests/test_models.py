"""The EVL model: backbone parity, temporal modules, freezing, ablations, devices."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower

from evl_platform.config.schema import (
    BackboneConfig,
    DataConfig,
    DecoderConfig,
    ExperimentConfig,
    ModelConfig,
    TemporalModuleSwitch,
)
from evl_platform.features.key import tensor_kinds
from evl_platform.models import (
    BACKBONES,
    FEATURE_SHAPES,
    BlockFeatures,
    TemporalCrossAttention,
    TemporalGeometry,
    TemporalModule,
    adjacent_attention,
    backbone_spec,
    create_backbone,
    create_model,
    model_info,
    temporal,
)
from evl_platform.models.temporal import relative_position_index
from evl_platform.models.tiny_init import DCT_SINCOS, init_dct_sincos
from evl_platform.registry import Registry

TEMPORAL_MODULES = ("temporal_conv", "temporal_pos_embed", "temporal_cross_attn")


def make_cfg(
    *,
    backbone: str = "micro-vit",
    mode: str = "frozen",
    dtype: str = "float32",
    frames: int = 4,
    classes: int = 5,
    **decoder: object,
) -> ExperimentConfig:
    decoder.setdefault("num_layers", 2)
    decoder.setdefault("mlp_dropout", 0.0)
    for name in TEMPORAL_MODULES:
        decoder.setdefault(name, False)
    return ExperimentConfig(
        model=ModelConfig(
            backbone=BackboneConfig(name=backbone, mode=mode, dtype=dtype),
            decoder=DecoderConfig(**decoder),
            head={"dropout": 0.0},
        ),
        data=DataConfig(num_classes=classes, num_frames=frames),
    )


def random_video(model: torch.nn.Module, *, batch: int = 2, frames: int = 4) -> torch.Tensor:
    size = model.backbone.image_size
    return torch.randn(batch, 3, frames, *size, generator=torch.Generator().manual_seed(0))


def randomize_temporal_modules(model: torch.nn.Module) -> None:
    """T-PE and T-CA start as exact no-ops (zero init); give them weights, as training would."""
    generator = torch.Generator().manual_seed(1)
    for name, param in model.decoder.named_parameters():
        if any(part in name for part in ("temporal_pos_embed", "w_prev", "w_next")):
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("name", [*BACKBONES, "ViT-B-16"])
def test_backbone_matches_open_clip_visual(name: str) -> None:
    backbone = create_backbone(BackboneConfig(name=name))
    spec = backbone_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = _build_vision_tower(spec.embed_dim, CLIPVisionCfg(**spec.vision_cfg), True)
    if spec.init == DCT_SINCOS:  # the registered tiny backbones' fixed embeddings
        init_dct_sincos(reference)
    reference.eval()
    images = torch.randn(2, 3, *backbone.image_size)
    with torch.no_grad():
        expected = reference(images)
    assert torch.allclose(backbone(images), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_blocks_expose_outputs_and_attention_qk(name: str) -> None:
    backbone = create_backbone(BackboneConfig(name=name))
    visual = backbone.visual
    images = torch.randn(2, 3, *backbone.image_size)
    layers = list(range(backbone.num_layers))
    found = backbone.forward_features(images, layers, with_qk=True)
    x = visual._embeds(images)
    for index, block in enumerate(visual.transformer.resblocks):
        normed = block.ln_1(x)
        _, weights = block.attn(normed, normed, normed, average_attn_weights=False)
        q, k = found[index].q, found[index].k  # (B, L, H, D)
        ours = torch.einsum("blhd,bmhd->bhlm", q * q.shape[-1] ** -0.5, k).softmax(-1)
        # The tiny backbones' content-matching logits reach the hundreds: rounding them
        # differently moves the sharp weights by a few 1e-5.
        assert torch.allclose(ours, weights, atol=1e-4)
        x = block(x)
        assert torch.allclose(found[index].out, x, atol=1e-4)
    assert not any(f.out.requires_grad for f in found.values())


def test_forward_features_stops_at_the_deepest_requested_block() -> None:
    backbone = create_backbone(BackboneConfig(name="tiny-vit"))
    calls = []
    for index, block in enumerate(backbone.visual.transformer.resblocks):
        block.ln_1.register_forward_hook(lambda *_, i=index: calls.append(i))
    found = backbone.forward_features(torch.randn(1, 3, 64, 64), [1, 0])
    assert sorted(found) == [0, 1]
    assert calls == [0, 1]


def test_all_temporal_modules_off_is_invariant_to_frame_order() -> None:
    model = create_model(make_cfg()).eval()
    video = random_video(model)
    with torch.no_grad():
        logits = model(video)
        reversed_logits = model(video.flip(2))
    assert torch.allclose(logits, reversed_logits, atol=1e-5)


@pytest.mark.parametrize("module", TEMPORAL_MODULES)
def test_any_temporal_module_makes_the_model_see_frame_order(module: str) -> None:
    model = create_model(make_cfg(**{module: True})).eval()
    randomize_temporal_modules(model)
    video = random_video(model)
    with torch.no_grad():
        logits = model(video)
        reversed_logits = model(video.flip(2))
    assert (logits - reversed_logits).abs().max() > 1e-3


def test_ablated_modules_are_none_and_enabled_ones_exist() -> None:
    model = create_model(make_cfg(temporal_conv=True))
    for layer in model.decoder.layers:
        assert layer.temporal_conv is not None
        assert layer.temporal_pos_embed is None
        assert layer.temporal_cross_attn is None


def test_temporal_modules_keep_their_parameter_names_and_order() -> None:
    """Checkpoints and optimizer states written before the temporal-module registry load."""
    model = create_model(make_cfg(**{m: True for m in TEMPORAL_MODULES}))
    names = [name for name, _ in model.decoder.layers[0].named_parameters()]
    assert [n for n in names if not n.startswith("block.")] == [
        "temporal_conv.conv.weight",
        "temporal_conv.conv.bias",
        "temporal_pos_embed.embedding",
        "temporal_cross_attn.w_prev",
        "temporal_cross_attn.w_next",
    ]
    assert names.index("temporal_conv.conv.weight") == len(names) - 5  # after the block


class AttentionGate(TemporalModule):
    """A module added the way the registry documents: per frame, how peaked its patches'
    attention to the previous frame is, times a learned vector."""

    label = "T-Gate"
    reads = ("attn",)

    def __init__(self, *, width: int) -> None:
        super().__init__()
        self.vector = torch.nn.Parameter(torch.linspace(-1.0, 1.0, width))

    @classmethod
    def create(cls, geometry: TemporalGeometry) -> AttentionGate:
        return cls(width=geometry.width)

    def term(self, features: BlockFeatures) -> torch.Tensor:
        maps = (
            features.attn
            if features.attn is not None
            else adjacent_attention(features.q, features.k)
        )
        peak = torch.nn.functional.pad(maps[:, 0].amax(dim=-1).mean(dim=-1), (1, 0))  # (N, T)
        return peak[:, :, None, None] * self.vector  # (N, T, 1, C)


class GatedDecoderConfig(DecoderConfig):
    temporal_gate: TemporalModuleSwitch = True


def test_a_new_temporal_module_needs_only_its_class_its_registration_and_its_switch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = Registry("temporal module")
    for name, module in temporal.TEMPORAL_MODULES.items():
        registry.add(name, module)
    registry.register("temporal_gate")(AttentionGate)
    monkeypatch.setattr(temporal, "TEMPORAL_MODULES", registry)
    monkeypatch.setattr(temporal, "DecoderConfig", GatedDecoderConfig)
    temporal.check_temporal_switches()
    base = make_cfg()

    def gated(on: bool) -> ExperimentConfig:
        decoder = GatedDecoderConfig(**base.model.decoder.model_dump(), temporal_gate=on)
        return base.model_copy(update={"model": base.model.model_copy(update={"decoder": decoder})})

    cfg = gated(True)
    model = create_model(cfg).eval()
    assert all(isinstance(layer.temporal_gate, AttentionGate) for layer in model.decoder.layers)
    assert "decoder.layers.1.temporal_gate.vector" in model.state_dict()
    assert model.decoder.uses_qk  # the backbone hands over q/k for it
    assert tensor_kinds(cfg) == ("out", "attn")  # the feature cache stores the maps for it
    info = model_info(cfg)
    assert info["temporal_modules"] == ["T-Gate"]
    assert info["new_params"] == model_info(gated(False))["new_params"] + 2 * model.backbone.width
    video = random_video(model)
    with torch.no_grad():
        live = model.extract_features(video)
        cached = [BlockFeatures(f.out, attn=adjacent_attention(f.q, f.k)) for f in live]
        assert not torch.allclose(model.classify(live), model(video.flip(2)))
        torch.testing.assert_close(model.classify(cached), model.classify(live))


def _one_step(model: torch.nn.Module) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(random_video(model)).logsumexp(dim=1).mean()
    loss.backward()
    optimizer.step()


def test_frozen_backbone_is_bit_identical_after_a_step_and_holds_no_grad() -> None:
    model = create_model(make_cfg(temporal_conv=True, temporal_cross_attn=True))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    decoder_before = [p.clone() for p in model.decoder.parameters()]
    _one_step(model)
    assert not model.backbone.training  # model.train() leaves a frozen backbone in eval
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(not p.requires_grad for p in model.backbone.parameters())
    changed = [
        not torch.equal(a, b)
        for a, b in zip(decoder_before, model.decoder.parameters(), strict=True)
    ]
    assert any(changed)


def test_frozen_features_carry_no_autograd_graph() -> None:
    model = create_model(make_cfg(temporal_cross_attn=True))
    features = model.extract_features(random_video(model))
    for f in features:
        assert f.out.grad_fn is None and f.q.grad_fn is None and f.k.grad_fn is None


def test_finetuned_backbone_changes_after_a_step() -> None:
    model = create_model(make_cfg(mode="finetune"))
    before = model.backbone.visual.transformer.resblocks[0].attn.in_proj_weight.clone()
    _one_step(model)
    assert model.backbone.training
    after = model.backbone.visual.transformer.resblocks[0].attn.in_proj_weight
    assert not torch.equal(before, after)


def _reference_tca(q, k, w_prev, w_next, grid):
    """Eqs. 7-8 written with explicit loops over frames and patch pairs."""
    n, t, length, heads, d = q.shape
    h, w = grid
    out = torch.zeros(n, t, length, w_prev.shape[1])
    for frame in range(t):
        for other, table in ((frame - 1, w_prev), (frame + 1, w_next)):
            if not 0 <= other < t:
                continue
            qs, ks = q[:, frame, 1:], k[:, other, 1:]  # (N, P, H, D)
            attn = (torch.einsum("nphd,nrhd->nhpr", qs, ks) / d**0.5).softmax(-1).mean(1)
            for p in range(h * w):
                for r in range(h * w):
                    dy, dx = p // w - r // w, p % w - r % w
                    row = (dy + h - 1) * (2 * w - 1) + (dx + w - 1)
                    out[:, frame, 1 + p] += attn[:, p, r, None] * table[row]
    return out


def _random_qk(grid=(2, 3), n=2, t=4, heads=2, d=4):
    gen = torch.Generator().manual_seed(0)
    shape = (n, t, grid[0] * grid[1] + 1, heads, d)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _random_tca(grid):
    """T-CA with random (not zero-initialised) weight tables."""
    tca = TemporalCrossAttention(grid=grid, width=5)
    with torch.no_grad():
        tca.w_prev.normal_()
        tca.w_next.normal_()
    return tca


def test_temporal_cross_attention_matches_the_paper_equations() -> None:
    grid = (2, 3)
    tca = _random_tca(grid)
    q, k = _random_qk(grid)
    expected = _reference_tca(q, k, tca.w_prev.detach(), tca.w_next.detach(), grid)
    assert torch.allclose(tca(q, k), expected, atol=1e-5)


def test_temporal_cross_attention_from_cached_maps_equals_from_q_and_k() -> None:
    """The feature cache stores adjacent_attention(q, k); forward_maps on it is T-CA itself,
    output and table gradients alike."""
    grid = (2, 3)
    tca = _random_tca(grid)
    q, k = _random_qk(grid)
    maps = adjacent_attention(q, k)
    assert maps.shape == (2, 2, 3, 6, 6)  # (N, prev/next, T-1, P, P)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 3, 6))  # softmax over keys

    direct = tca(q, k)
    (direct * torch.arange(5.0)).sum().backward()
    grads = [tca.w_prev.grad.clone(), tca.w_next.grad.clone()]
    tca.zero_grad()
    cached = tca.forward_maps(maps)
    (cached * torch.arange(5.0)).sum().backward()
    torch.testing.assert_close(cached, direct)
    torch.testing.assert_close([tca.w_prev.grad, tca.w_next.grad], grads)
    with pytest.raises(ValueError, match="expected 6 patch tokens"):
        tca.forward_maps(maps[..., :4, :4])


def test_temporal_cross_attention_edges_cls_and_zero_init() -> None:
    grid = (2, 3)
    tca = TemporalCrossAttention(grid=grid, width=5)
    q, k = _random_qk(grid)
    assert torch.count_nonzero(tca(q, k)) == 0  # zero-initialised tables: a no-op at init
    with torch.no_grad():
        tca.w_prev.normal_()
    only_prev = tca(q, k)
    assert torch.count_nonzero(only_prev[:, :, 0]) == 0  # nothing for cls
    assert torch.count_nonzero(only_prev[:, 0]) == 0  # frame 0 has no previous frame
    assert torch.count_nonzero(only_prev[:, 1:, 1:]) > 0
    with torch.no_grad():
        tca.w_prev.zero_()
        tca.w_next.normal_()
    only_next = tca(q, k)
    assert torch.count_nonzero(only_next[:, -1]) == 0  # the last frame has no next frame
    assert torch.count_nonzero(only_next[:, :-1, 1:]) > 0


@pytest.mark.parametrize(("width", "heads", "tokens"), [(64, 4, 8 * 65), (768, 12, 197)])
def test_decoder_attention_equals_torch_multi_head_attention(
    width: int, heads: int, tokens: int
) -> None:
    """The query-side form the decoder runs gives torch's attention output and gradients."""
    from evl_platform.models.decoder import DecoderAttention

    torch.manual_seed(0)
    ours = DecoderAttention(width=width, num_heads=heads).double()
    for param in ours.parameters():  # non-zero biases too
        torch.nn.init.normal_(param, std=0.05)
    ref = torch.nn.MultiheadAttention(width, heads, batch_first=True).double()
    projections = (ours.q_proj, ours.k_proj, ours.v_proj)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([p.weight for p in projections]))
        ref.in_proj_bias.copy_(torch.cat([p.bias for p in projections]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    query = torch.randn(3, 1, width, dtype=torch.double, requires_grad=True)
    context = torch.randn(3, tokens, width, dtype=torch.double, requires_grad=True)
    mine, theirs = ours(query, context), ref(query, context, context, need_weights=False)[0]
    torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12)
    grads = torch.autograd.grad(mine.square().sum(), [query, context, ours.k_proj.weight])
    expected = torch.autograd.grad(theirs.square().sum(), [query, context, ref.in_proj_weight])
    torch.testing.assert_close(grads[0], expected[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[1], expected[1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[2], expected[2][width : 2 * width], rtol=1e-9, atol=1e-12)
    ours.query_side = False  # the plain form model info counts
    torch.testing.assert_close(ours(query, context), theirs, rtol=1e-9, atol=1e-12)


def test_relative_position_index_covers_every_offset_once_per_row() -> None:
    index = relative_position_index((3, 4))
    assert index.shape == (12, 12)
    assert index.min() == 0 and index.max() == 5 * 7 - 1
    assert index.diagonal().unique().tolist() == [2 * 7 + 3]  # zero offset in the middle


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        ([-4, -3, -2, -1], [8, 9, 10, 11]),
        ([-2, -2, -1, -1], [10, 10, 11, 11]),
        ([-1, -1, -1, -1], [11, 11, 11, 11]),
        ([-2, -1, -2, -1], [10, 11, 10, 11]),
        ([-7, -5, -3, -1], [5, 7, 9, 11]),
    ],
)
def test_feature_layers_feed_the_listed_backbone_blocks(layers, expected) -> None:
    with torch.device("meta"):
        model = create_model(make_cfg(backbone="ViT-B-16", num_layers=4, feature_layers=layers))
    assert list(model.feature_layers) == expected


def test_decoder_layers_read_their_own_backbone_block() -> None:
    model = create_model(make_cfg(num_layers=3, feature_layers=[0, 2, 0]))
    features = model.extract_features(random_video(model))
    blocks = model.backbone.forward_features(
        random_video(model).transpose(1, 2).flatten(0, 1), [0, 2]
    )
    for feats, block in zip(features, (0, 2, 0), strict=True):
        assert torch.allclose(feats.out.flatten(0, 1), blocks[block].out)


def test_feature_layer_out_of_range_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"model\.decoder\.feature_layers: index -4 .* 3 blocks"):
        create_model(make_cfg(num_layers=1, feature_layers=[-4]))


@pytest.mark.parametrize(
    ("shape", "tokens"),
    [("spatiotemporal", 4 * 17), ("temporal_token", 4), ("temporal_avg", 4), ("spatial_avg", 17)],
)
def test_feature_shapes_give_the_table_6c_token_counts(shape: str, tokens: int) -> None:
    y = torch.randn(2, 4, 17, 8)  # (N, T, L, C)
    assert FEATURE_SHAPES.get(shape)(y).shape == (2, tokens, 8)
    model = create_model(make_cfg(feature_shape=shape, temporal_conv=True)).eval()
    assert model(random_video(model)).shape == (2, 5)


def test_bfloat16_frozen_backbone_feeds_float32_features() -> None:
    model = create_model(make_cfg(dtype="bfloat16", temporal_cross_attn=True))
    assert model.backbone.dtype == torch.bfloat16
    features = model.extract_features(random_video(model))
    assert all(f.out.dtype == torch.float32 for f in features)
    assert model(random_video(model)).dtype == torch.float32


def test_model_follows_its_device_without_code_changes() -> None:
    """No tensor is created on a fixed device: the whole forward runs on the meta device."""
    model = create_model(make_cfg(**{m: True for m in TEMPORAL_MODULES})).to("meta")
    video = torch.empty(2, 3, 4, 32, 32, device="meta")
    assert model(video).device.type == "meta"
    if torch.cuda.is_available():  # exercised on GPU machines
        model = create_model(make_cfg(**{m: True for m in TEMPORAL_MODULES})).cuda()
        assert model(random_video(model).cuda()).is_cuda


def test_pretrained_weights_load_from_a_local_clip_checkpoint(tmp_path) -> None:
    source = create_backbone(BackboneConfig(name="micro-vit", init_seed=7))
    checkpoint = {f"visual.{k}": v for k, v in source.visual.state_dict().items()}
    checkpoint["logit_scale"] = torch.tensor(1.0)  # text-side keys are ignored
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": checkpoint}, path)
    loaded = create_backbone(BackboneConfig(name="micro-vit", pretrained=str(path)))
    for key, value in source.visual.state_dict().items():
        assert torch.equal(loaded.visual.state_dict()[key], value), key
    assert not torch.equal(
        create_backbone(BackboneConfig(name="micro-vit"))
        .visual.transformer.resblocks[0]
        .mlp.c_fc.weight,
        loaded.visual.transformer.resblocks[0].mlp.c_fc.weight,
    )


def test_missing_weights_file_names_the_key(tmp_path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="model.backbone.pretrained: weights file"):
        create_backbone(BackboneConfig(name="micro-vit", pretrained=str(missing)))


def test_unknown_backbone_lists_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="model.backbone.name: 'ViT-Q-99' .*tiny-vit"):
        backbone_spec("ViT-Q-99")


@pytest.mark.parametrize(
    ("name", "tag", "message"),
    [
        ("micro-vit", "openai", "'openai' is an open_clip weights tag, but 'micro-vit' is a"),
        ("ViT-B-16", "no-such-tag", "no open_clip weights 'no-such-tag' for ViT-B-16 (available:"),
    ],
)
def test_bad_pretrained_tag_names_the_key(name: str, tag: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"model.backbone.pretrained: {message}")):
        create_backbone(BackboneConfig(name=name, pretrained=tag))


def test_weights_that_cannot_be_downloaded_give_one_clear_error(tmp_path) -> None:
    """Offline with an empty cache (as here): a clear message, not open_clip's traceback."""
    code = (
        "from evl_platform.config.schema import BackboneConfig\n"
        "from evl_platform.models import create_backbone\n"
        "try:\n"
        "    create_backbone(BackboneConfig(name='ViT-B-16', pretrained='openai'))\n"
        "except ValueError as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith(
        "model.backbone.pretrained: could not load open_clip weights 'openai' for ViT-B-16"
    )
    assert "give a local weights file" in result.stdout

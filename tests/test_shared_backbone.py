"""The frozen backbone's features as a pack and a lone model keep them: in the autocast dtype
(not upcast to float32), and T-CA's maps made block by block while the backbone runs (at most
one block's queries and keys alive), bit-identical to maps made after the pass."""

from __future__ import annotations

import weakref

import pytest
import torch

from evl_platform.config.schema import BackboneConfig
from evl_platform.models import adjacent_attention, backbone, create_backbone, extract_blocks
from evl_platform.models.evl import feature_dtype
from evl_platform.train.pack import SharedBackbone

CPU = torch.device("cpu")


def _video(frames: int = 4, size: int = 64, n: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, frames, size, size), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_features_stay_in_the_autocast_dtype(dtype: str) -> None:
    net = create_backbone(BackboneConfig(name="tiny-vit", dtype=dtype), load_weights=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        found = extract_blocks(net, _video(), [1, 3], with_qk=True)
    for block in found.values():
        assert block.out.dtype == block.q.dtype == block.k.dtype == torch.bfloat16
    assert feature_dtype(CPU) == torch.float32  # outside autocast: what the decoder takes


def test_features_outside_autocast_are_float32_for_the_decoder() -> None:
    net = create_backbone(BackboneConfig(name="tiny-vit", dtype="bfloat16"), load_weights=False)
    with torch.no_grad():
        found = extract_blocks(net, _video(), [3], with_qk=False)
    assert found[3].out.dtype == torch.float32


def test_pack_makes_tca_maps_block_by_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """When block i+1 starts, block i's queries and keys (the qkv projection they view) are
    freed: the pack kept its T-CA maps instead. The result is bit-identical to maps made from
    every block's q/k after the whole pass."""
    net = create_backbone(BackboneConfig(name="tiny-vit"), load_weights=False)
    video = _video()
    with torch.no_grad():
        whole = extract_blocks(net, video, [0, 1, 2, 3], with_qk=True)
        expected = {i: adjacent_attention(f.q, f.k) for i, f in whole.items() if i != 2}
    del whole

    real = backbone._block_forward
    produced: list[weakref.ref] = []
    alive_at_start: list[int] = []

    def recording(block, x, *, training):  # noqa: ANN001, ANN202
        alive_at_start.append(sum(ref() is not None for ref in produced))
        out, q, k = real(block, x, training=training)
        produced.append(weakref.ref(q._base))  # the qkv tensor q and k are views of
        return out, q, k

    monkeypatch.setattr(backbone, "_block_forward", recording)
    shared = SharedBackbone(net, (0, 1, 2, 3), maps=(0, 1, 3), device=CPU, amp=None)
    found = shared(video)
    assert alive_at_start == [0, 0, 0, 0]
    assert all(ref() is None for ref in produced)
    for index, maps in expected.items():
        assert found[index].q is None and found[index].k is None
        assert torch.equal(found[index].attn, maps)
    assert found[2].attn is None and found[2].q is None  # no member reads its maps

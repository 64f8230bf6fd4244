"""T-CA's windowed projection: the numbers of the direct (P, P, C) formulation, less work.

The oracle is a verbatim copy of the implementation it replaced, which gathered the whole
(P, P, C) weight tensor ``table[relative_position_index]`` and contracted it with the maps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from evl_platform.models import TemporalCrossAttention
from evl_platform.models.temporal import relative_position_index, window_table_index

GRIDS = [(1, 1), (1, 4), (4, 1), (2, 3), (3, 2), (8, 8), (14, 14)]


def _oracle_project(q, k, table, rel_index):
    scale = q.shape[-1] ** -0.5
    attn = torch.einsum("ntqhd,ntkhd->ntqkh", q * scale, k)  # (N, T', P, P, H)
    attn = attn.softmax(dim=-2).mean(dim=-1)  # softmax over keys, mean over heads
    weights = table[rel_index]  # (P, P, C)
    return torch.einsum("ntqk,qkc->ntqc", attn.to(weights.dtype), weights)


def _oracle(q, k, w_prev, w_next, grid):
    rel_index = relative_position_index(grid).to(q.device)
    q, k = q[:, :, 1:], k[:, :, 1:]
    prev = _oracle_project(q[:, 1:], k[:, :-1], w_prev, rel_index)
    nxt = _oracle_project(q[:, :-1], k[:, 1:], w_next, rel_index)
    out = F.pad(prev, (0, 0, 0, 0, 1, 0)) + F.pad(nxt, (0, 0, 0, 0, 0, 1))
    return F.pad(out, (0, 0, 1, 0))


def _setup(grid, *, n=2, t=4, heads=3, d=8, width=6, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, t, grid[0] * grid[1] + 1, heads, d)
    q = torch.randn(shape, generator=gen, dtype=dtype)
    k = torch.randn(shape, generator=gen, dtype=dtype)
    tca = TemporalCrossAttention(grid=grid, width=width).to(dtype)
    with torch.no_grad():
        tca.w_prev.copy_(torch.randn(tca.w_prev.shape, generator=gen))
        tca.w_next.copy_(torch.randn(tca.w_next.shape, generator=gen))
    grad_out = torch.randn(n, t, shape[2], width, generator=gen, dtype=dtype)
    return tca, q, k, grad_out


def _compare(tca, q, k, grad_out, *, qk_grad, atol, rtol):
    inputs = [tca.w_prev, tca.w_next]
    if qk_grad:
        q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
        inputs += [q, k]
    out = tca(q, k)
    expected = _oracle(q, k, tca.w_prev, tca.w_next, tca.grid)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    unused = {"allow_unused": True, "materialize_grads": True}  # one frame: q/k do nothing
    grads = torch.autograd.grad(out, inputs, grad_out, **unused)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out, **unused)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("qk_grad", [False, True], ids=["frozen", "finetune"])
def test_outputs_and_gradients_match_the_direct_formulation(grid, qk_grad) -> None:
    tca, q, k, grad_out = _setup(grid)
    _compare(tca, q, k, grad_out, qk_grad=qk_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("grid", [(2, 3), (5, 4), (8, 8)])
def test_float64_agrees_to_rounding(grid) -> None:
    tca, q, k, grad_out = _setup(grid, dtype=torch.float64, seed=1)
    _compare(tca, q, k, grad_out, qk_grad=True, atol=1e-12, rtol=1e-10)


def test_strided_backbone_views() -> None:
    """The backbone hands over q/k as strided views of its fused qkv projection."""
    tca, q, k, grad_out = _setup((3, 4))
    qkv = torch.stack([q, k, torch.zeros_like(q)], dim=-2)  # (N, T, L, H, 3, D)
    q, k = qkv[..., 0, :], qkv[..., 1, :]
    assert not q.is_contiguous()
    _compare(tca, q, k, grad_out, qk_grad=False, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("frames", [1, 2, 3])
def test_short_clips(frames) -> None:
    tca, q, k, grad_out = _setup((2, 3), t=frames)
    _compare(tca, q, k, grad_out, qk_grad=True, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_the_direct_formulation(dtype) -> None:
    tca, q, k, _ = _setup((3, 4))
    with torch.autocast("cpu", dtype=dtype):
        out = tca(q, k)
        expected = _oracle(q, k, tca.w_prev, tca.w_next, tca.grid)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out.float(), expected.float(), atol=0.1, rtol=0.05)
    out.float().sum().backward()  # gradients reach the fp32 tables
    assert tca.w_prev.grad is not None and tca.w_prev.grad.dtype == torch.float32


def test_half_precision_backbone_features() -> None:
    """A half-precision frozen backbone feeds fp16 q/k to fp32 tables: maps are cast up."""
    tca, q, k, _ = _setup((3, 4))
    q, k = q.half(), k.half()
    out = tca(q, k)
    expected = _oracle(q, k, tca.w_prev, tca.w_next, tca.grid)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=1e-3)


def test_checkpoint_layout_is_unchanged() -> None:
    tca = TemporalCrossAttention(grid=(3, 4), width=6)
    state = tca.state_dict()
    assert set(state) == {"w_prev", "w_next"}
    assert state["w_prev"].shape == state["w_next"].shape == (5 * 7, 6)
    assert torch.count_nonzero(state["w_prev"]) == torch.count_nonzero(state["w_next"]) == 0


def test_window_index_agrees_with_the_relative_position_index() -> None:
    """Query (qr, qc)'s weights are window qc's rows qr*W.. with keys ordered (H-1-kr, kc)."""
    h, w = grid = (3, 4)
    rel, window = relative_position_index(grid), window_table_index(grid)
    assert window.shape == (w, (2 * h - 1) * w)
    for qr in range(h):
        for qc in range(w):
            for kr in range(h):
                for kc in range(w):
                    row = window[qc, qr * w + (h - 1 - kr) * w + kc]
                    assert row == rel[qr * w + qc, kr * w + kc]


def test_multiply_adds_equal_the_direct_sum() -> None:
    """``model-info`` counts executed matmuls: the projection costs exactly N*T'*P*P*C MACs."""
    from torch.utils.flop_counter import FlopCounterMode

    tca, q, k, _ = _setup((14, 14), n=2, t=3, heads=2, d=4, width=16)
    with FlopCounterMode(display=False) as new:
        tca(q, k)
    with FlopCounterMode(display=False) as old:
        _oracle(q, k, tca.w_prev, tca.w_next, tca.grid)
    assert new.get_total_flops() == old.get_total_flops()


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_no_pairwise_weight_tensor_is_materialised() -> None:
    """ViT-B/16 grid and width: nothing near the (P, P, C) gathered table is ever allocated."""
    grid, width = (14, 14), 768
    tca, q, k, grad_out = _setup(grid, n=1, t=2, heads=2, d=4, width=width)
    recorder = _Recorder()
    with recorder:
        out = tca(q, k)
        out.backward(grad_out)
    patches = grid[0] * grid[1]
    assert recorder.largest < patches * patches * width // 5  # (P, P, C) is 29.5 M elements


def test_frozen_qk_spends_no_backward_on_the_attention() -> None:
    """Without grad on q/k the backward is only the projection's: no softmax or q.k backward."""
    tca, q, k, grad_out = _setup((4, 4))
    out = tca(q, k)
    recorder = _Recorder()
    with recorder:
        out.backward(grad_out)
    assert not any("softmax" in op or "mean" in op for op in recorder.ops), recorder.ops
    assert tca.w_prev.grad is not None and tca.w_next.grad is not None

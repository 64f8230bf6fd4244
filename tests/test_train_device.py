"""Paper-scale correctness of the training loop, shown on a CPU.

Each worker owns its device (``set_device``, every CUDA RNG call names it: recorded on a fake
``cuda:1``), DDP wraps only what trains (two gloo processes: no backbone parameter in the DDP
module, the same weights as one process on the whole batch), a step between logging steps
never waits for the device (host reads recorded), and the time steps wait for their batches is
logged as ``data/wait_s``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from evl_platform.config import ExperimentConfig
from evl_platform.models import create_model
from evl_platform.tracking import names
from evl_platform.train.loop import (
    Callback,
    EVLForward,
    InputBatch,
    Optimization,
    StepResult,
    create_forward,
    fit,
    train_step,
    unwrap,
)
from evl_platform.train.member import RngState
from evl_platform.train.state import load_checkpoint, save_checkpoint

CPU = torch.device("cpu")
FAKE_GPU = torch.device("cuda", 1)


def _cfg(mode: str = "frozen", **train: object) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "model": {
                "backbone": {"name": "micro-vit", "mode": mode},
                "decoder": {"num_layers": 2, "temporal_cross_attn": True, "mlp_dropout": 0.0},
                "head": {"dropout": 0.0},
            },
            "data": {"num_classes": 6, "num_frames": 4},
            "train": {"num_steps": 10, "batch_size": 4, **train},
        }
    )


def _batch(n: int = 4, *, views: int | None = None, seed: int = 0) -> InputBatch:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 3, 4, 32, 32) if views is None else (n, views, 3, 4, 32, 32)
    return InputBatch(
        torch.randn(shape, generator=g), torch.randint(0, 6, (n,), generator=g), torch.arange(n)
    )


class _FakeCuda:
    """Stands in for ``torch.cuda``'s RNG and device calls; records the device each got."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, Any]] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)

    def get_rng_state(self, device: Any = "cuda") -> torch.Tensor:
        self.calls.append(("get", torch.device(device)))
        return torch.tensor([7, 7], dtype=torch.uint8)

    def set_rng_state(self, state: torch.Tensor, device: Any = "cuda") -> None:
        self.calls.append(("set", torch.device(device)))

    def set_device(self, device: Any) -> None:
        self.calls.append(("set_device", torch.device(device)))


def test_every_cuda_rng_call_names_the_workers_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bare ``torch.cuda.get_rng_state()`` acts on ``cuda:0`` whatever GPU the worker has."""
    fake = _FakeCuda(monkeypatch)
    state = RngState.capture(FAKE_GPU)
    state.restore()
    assert fake.calls == [("get", FAKE_GPU), ("set", FAKE_GPU)]

    fake.calls.clear()
    cfg = _cfg()
    model = create_model(cfg)
    optimization = Optimization.create(model, cfg.train, CPU)
    parts = {
        "model": model,
        "optimizer": optimization.optimizer,
        "scheduler": optimization.scheduler,
        "scaler": optimization.scaler,
    }
    save_checkpoint(
        tmp_path, rank=0, step=1, device_seconds=0.0, cfg=cfg, run_id=None, device=FAKE_GPU, **parts
    )
    load_checkpoint(tmp_path, rank=0, device=FAKE_GPU, **parts)
    assert fake.calls == [("get", FAKE_GPU), ("set", FAKE_GPU)]
    assert torch.load(tmp_path / "rng_rank0.pt", weights_only=True)["cuda"].tolist() == [7, 7]


def test_a_worker_claims_its_own_device_before_using_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.train.torch

    from evl_platform.train.worker import claim_device

    fake = _FakeCuda(monkeypatch)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: FAKE_GPU)
    assert claim_device() == FAKE_GPU
    assert fake.calls == [("set_device", FAKE_GPU)]


def test_unwrap_finds_the_model_under_every_forward() -> None:
    frozen, tuned = create_model(_cfg("frozen")), create_model(_cfg("finetune"))
    for model in (frozen, tuned):
        assert unwrap(create_forward(model, device=CPU)) is model
        assert unwrap(EVLForward(model)) is model


def _ddp_worker(rank: int, world: int, directory: str) -> None:
    """One of two gloo workers: two steps on its half of each batch, its results saved."""
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world
    )
    try:
        cfg = _cfg()
        torch.manual_seed(0)
        model = create_model(cfg)
        net = create_forward(model, device=CPU, distributed=True)
        ddp = net.trainable
        optimization = Optimization.create(model, cfg.train, CPU)
        losses = []
        for seed in (1, 2):
            batch = _batch(4, seed=seed)
            half = slice(rank * 2, rank * 2 + 2)
            mine = InputBatch(batch.inputs[half], batch.labels[half], batch.indices[half])
            losses.append(_train(net, mine, optimization))
        torch.save(
            {
                "ddp_params": [id(p) for p in ddp.module.parameters()],
                "ddp_state": list(ddp.module.state_dict()),
                "backbone_params": [id(p) for p in model.backbone.parameters()],
                "forward_sync_buffers": ddp.forward_sync_buffers,
                "is_ddp": isinstance(ddp, nn.parallel.DistributedDataParallel),
                "decoder": {k: v.clone() for k, v in model.decoder.state_dict().items()},
                "losses": losses,
            },
            f"{directory}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _train(net: nn.Module, batch: InputBatch, optimization: Optimization) -> float:
    result = train_step(
        net,
        batch,
        optimizer=optimization.optimizer,
        scheduler=optimization.scheduler,
        scaler=optimization.scaler,
        device=CPU,
        amp=None,
    )
    return float(result.loss)


def test_ddp_wraps_only_the_trainable_part_and_trains_as_one_process(tmp_path: Path) -> None:
    """Two gloo workers on half a batch each end with the weights one process gets from the
    whole batch; their DDP module holds no backbone parameter or buffer (so DDP neither
    broadcasts the frozen backbone at construction nor its buffers per forward)."""
    sys.path.insert(0, str(Path(__file__).parent))  # the spawned workers import this module
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for found in ranks:
        assert found["is_ddp"] and found["forward_sync_buffers"] is False
        assert not set(found["ddp_params"]) & set(found["backbone_params"])
        assert found["ddp_state"] and not any(k.startswith("backbone") for k in found["ddp_state"])

    cfg = _cfg()
    torch.manual_seed(0)
    model = create_model(cfg)
    optimization = Optimization.create(model, cfg.train, CPU)
    alone = [_train(EVLForward(model), _batch(4, seed=s), optimization) for s in (1, 2)]
    # Adam's first steps move a weight by about the learning rate whatever its gradient's
    # size, so a weight whose gradient is rounding noise (summed in another order over two
    # ranks: attention's key biases, whose true gradient is 0) may go either way, up to
    # 2 x lr after 2 steps; nearly all weights agree closely
    loose = total = 0
    for key, value in model.decoder.state_dict().items():
        assert torch.equal(ranks[0]["decoder"][key], ranks[1]["decoder"][key]), key
        differ = (ranks[0]["decoder"][key] - value).abs()
        assert differ.max() <= 2 * cfg.train.lr, key
        loose += int((differ > 1e-5 + 1e-3 * value.abs()).sum())
        total += value.numel()
    assert loose <= 0.01 * total, (loose, total)
    means = [sum(r["losses"][i] for r in ranks) / 2 for i in range(2)]
    assert means == pytest.approx(alone, rel=1e-5)


class _HostReads:
    """Records every read of a tensor's value on the host made by the platform's code."""

    METHODS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self) -> None:
        self.on = False
        self.reads: list[str] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for method in self.METHODS:
            monkeypatch.setattr(torch.Tensor, method, self._wrap(getattr(torch.Tensor, method)))

    def _wrap(self, original: Any) -> Any:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1)
            if self.on and caller.f_globals.get("__name__", "").startswith("evl_platform"):
                self.reads.append(f"{caller.f_code.co_filename}:{caller.f_lineno}")
            return original(tensor, *args, **kwargs)

        return read


class _Source:
    """Fixed random batches; each batch takes ``delay`` seconds to arrive."""

    def __init__(self, delay: float = 0.0) -> None:
        self.steps_per_epoch, self.bad_videos, self.delay = 3, 0, delay

    def train_batches(self, epoch: int, first: int) -> Iterator[InputBatch]:
        for b in range(first, self.steps_per_epoch):
            time.sleep(self.delay)
            yield _batch(seed=epoch * 100 + b)

    def val_batches(self) -> list[InputBatch]:
        return [_batch(3, views=2, seed=999)]


class _Watch(Callback):
    """Turns the recorder on after step 1 and off after step ``until``; keeps the reports."""

    def __init__(self, reads: _HostReads, until: int) -> None:
        self.reads, self.until, self.reports = reads, until, []

    def on_step(self, step: int, result: StepResult) -> None:
        self.reads.on = step < self.until

    def on_report(self, report: Any) -> None:
        self.reports.append(report)


def _fit(source: _Source, *callbacks: Callback, **train: object) -> Any:
    cfg = _cfg(**train)
    torch.manual_seed(0)
    model = create_model(cfg)
    return fit(
        create_forward(model, device=CPU),
        source,
        cfg.train,
        optimization=Optimization.create(model, cfg.train, CPU),
        callbacks=callbacks,
    )


def test_steps_between_logging_steps_never_read_the_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every host read of a CUDA tensor waits for the device; steps 2 to 6 of 8 (no logging,
    validation or checkpoint) make none, and the logging step reads the values."""
    reads = _HostReads()
    reads.install(monkeypatch)
    watch = _Watch(reads, until=7)
    last = _fit(_Source(), watch, num_steps=8, log_every=8, eval_every=8, checkpoint_every=8)
    assert reads.reads == []
    assert [r.step for r in watch.reports] == [8]
    assert last.metrics[names.TRAIN_LOSS] > 0


def test_the_time_steps_wait_for_their_batches_is_logged() -> None:
    delay = 0.2
    last = _fit(_Source(delay), num_steps=4, log_every=2, eval_every=4, checkpoint_every=4)
    waited = last.metrics[names.DATA_WAIT]
    assert delay * 0.9 < waited < delay * 3  # seconds per step, not summed over the window
    quick = _fit(_Source(), num_steps=2, log_every=2, eval_every=2, checkpoint_every=2)
    assert 0 <= quick.metrics[names.DATA_WAIT] < delay / 2


def test_ray_report_spreads_step_time_over_the_workers_it_is_built_for() -> None:
    from evl_platform.train.loop import Report
    from evl_platform.train.worker import RayReport

    report = RayReport([], {}, {}, rank=0, world=2, video_ids=[], class_names=[])
    last = Report(step=4, metrics={}, checkpoint=True, last=True, device_seconds=10.0)
    assert report.timings({"": last})[names.TIME_TRAIN] == pytest.approx(5.0)

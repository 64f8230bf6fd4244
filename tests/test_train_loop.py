"""The plain-PyTorch training step and loop (cadence, resume, timing, non-finite loss),
checkpoint state and resume checks (no Ray)."""

from __future__ import annotations

import itertools
import math
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from evl_platform.config import ExperimentConfig, TrainConfig
from evl_platform.models import create_model
from evl_platform.runtime.storage import RunRecord
from evl_platform.tracking import names
from evl_platform.train.errors import NonFiniteLossError, ResumeError
from evl_platform.train.inputs import StepSampler
from evl_platform.train.loop import (
    Callback,
    EvalResult,
    EVLForward,
    InputBatch,
    Optimization,
    Report,
    StepResult,
    batches_from,
    create_optimizer,
    create_scaler,
    create_schedule,
    evaluate,
    fit,
    train_step,
)
from evl_platform.train.records import check_resumable
from evl_platform.train.state import (
    architecture_changes,
    load_checkpoint,
    save_checkpoint,
)

CPU = torch.device("cpu")


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
        torch.randn(shape, generator=g),
        torch.randint(0, 6, (n,), generator=g),
        torch.arange(n),
    )


def _parts(cfg: ExperimentConfig) -> tuple:
    torch.manual_seed(0)
    model = create_model(cfg)
    optimizer = create_optimizer(model, cfg.train)
    return model, EVLForward(model), optimizer, create_schedule(optimizer, cfg.train)


def _step(cfg: ExperimentConfig, net, optimizer, schedule, batch, split: int = 1) -> float:
    return train_step(
        net,
        batch,
        optimizer=optimizer,
        scheduler=schedule,
        scaler=create_scaler(CPU, None),
        device=CPU,
        amp=None,
        batch_split=split,
    ).loss.item()


def test_cosine_schedule_matches_official_annealing() -> None:
    cfg = TrainConfig(num_steps=100, lr=1.0)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    ours = create_schedule(optimizer, cfg)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        ours.step()
    expected = [0.5 * (1 + math.cos(math.pi * s / 100)) for s in range(100)]
    assert lrs == pytest.approx(expected)
    warm = create_schedule(torch.optim.AdamW([param], lr=1.0), TrainConfig(warmup_steps=4))
    assert warm.get_last_lr() == [pytest.approx(0.25)]


def test_frozen_backbone_gets_no_gradients_and_only_new_params_are_optimised() -> None:
    cfg = _cfg("frozen")
    model, net, optimizer, schedule = _parts(cfg)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    _step(cfg, net, optimizer, schedule, _batch())
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.new_parameters()}
    features = model.extract_features(_batch().inputs)
    assert all(not f.out.requires_grad and f.out.grad_fn is None for f in features)


def test_finetuned_backbone_gets_gradients() -> None:
    cfg = _cfg("finetune")
    model, net, optimizer, schedule = _parts(cfg)
    _step(cfg, net, optimizer, schedule, _batch())
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)


def test_batch_split_accumulates_to_the_same_update() -> None:
    cfg = _cfg("frozen")
    results = []
    for split in (1, 2, 4):
        model, net, optimizer, schedule = _parts(cfg)
        loss = _step(cfg, net, optimizer, schedule, _batch(), split)
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results.append((loss, grads))
    (loss, reference), *others = results
    for other_loss, grads in others:
        assert other_loss == pytest.approx(loss, rel=1e-5)
        for key, value in reference.items():
            torch.testing.assert_close(grads[key], value, rtol=1e-3, atol=1e-5)


def test_evaluation_averages_softmax_over_views() -> None:
    cfg = _cfg("frozen")
    model, net, *_ = _parts(cfg)
    batch = _batch(3, views=2)
    result = evaluate(net, [batch], device=CPU, amp=None)
    model.eval()
    with torch.no_grad():
        per_view = torch.stack([model(batch.inputs[:, v]).softmax(-1) for v in range(2)], 1)
    np.testing.assert_allclose(result.probs, per_view.mean(1).numpy(), rtol=1e-5, atol=1e-6)
    assert result.labels.tolist() == batch.labels.tolist()


def test_eval_result_metrics() -> None:
    probs = np.array(
        [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1]], dtype=np.float32
    )
    result = EvalResult(np.array([3, 0, 2, 1]), np.array([0, 1, 1, 1]), probs)
    assert result.topk(1) == pytest.approx(50.0)
    assert result.topk(2) == pytest.approx(100.0)
    assert result.confusion(3).tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    per_class = result.per_class_accuracy(3)
    assert per_class[:2].tolist() == pytest.approx([100.0, 100 / 3])
    assert np.isnan(per_class[2])
    merged = EvalResult.merge([result, EvalResult(np.array([0]), np.array([2]), probs[:1])])
    assert merged.indices.tolist() == [0, 1, 2, 3]  # one row per video


def test_checkpoint_round_trip_continues_identically(tmp_path: Path) -> None:
    cfg = _cfg("frozen")
    batches = [_batch(seed=s) for s in range(4)]
    model, net, optimizer, schedule = _parts(cfg)
    scaler = create_scaler(CPU, None)
    for batch in batches[:2]:
        _step(cfg, net, optimizer, schedule, batch)
    save_checkpoint(
        tmp_path,
        rank=0,
        model=model,
        optimizer=optimizer,
        scheduler=schedule,
        scaler=scaler,
        step=2,
        device_seconds=1.5,
        cfg=cfg,
        run_id="abc",
    )
    straight = [_step(cfg, net, optimizer, schedule, b) for b in batches[2:]]

    model2, net2, optimizer2, schedule2 = _parts(_cfg("frozen"))
    torch.manual_seed(123)  # the checkpoint's RNG state must win over this
    state = load_checkpoint(
        tmp_path, rank=0, model=model2, optimizer=optimizer2, scheduler=schedule2, scaler=scaler
    )
    assert (state.step, state.device_seconds, state.run_id) == (2, 1.5, "abc")
    resumed = [_step(cfg, net2, optimizer2, schedule2, b) for b in batches[2:]]
    assert resumed == pytest.approx(straight, rel=1e-6)
    saved = torch.load(tmp_path / "state.pt", weights_only=True)["model"]
    assert not any(key.startswith("backbone.") for key in saved)  # frozen: not copied


def test_resume_refuses_architecture_changes() -> None:
    saved = _cfg("frozen")
    changed = ExperimentConfig.model_validate(
        saved.model_dump() | {"model": saved.model.model_dump() | {"decoder": {"num_layers": 3}}}
    )
    changes = architecture_changes(saved, changed)
    assert any(c.startswith("model.decoder.num_layers: 2 -> 3") for c in changes)
    from evl_platform.config import dump_config

    record = RunRecord("run-1", "id", "experiment", "experiment", dump_config(saved), "now")
    with pytest.raises(ResumeError, match=r"run-1: .*model\.decoder\.num_layers: 2 -> 3"):
        check_resumable(record, changed)
    longer = ExperimentConfig.model_validate(
        saved.model_dump() | {"train": saved.train.model_dump() | {"num_steps": 20}}
    )
    assert check_resumable(record, longer) == ["train.num_steps"]


def test_step_sampler_deals_disjoint_batches_and_resumes_mid_epoch() -> None:
    samplers = [StepSampler(23, rank=r, world=2, batch=3, seed=7) for r in range(2)]
    assert samplers[0].steps_per_epoch == 3  # 23 // 6, the incomplete batch is dropped
    seen = np.concatenate([b for s in samplers for b in s.batches(epoch=1)])
    assert len(seen) == len(set(seen.tolist())) == 18
    assert not np.array_equal(samplers[0].batches(0)[0], samplers[0].batches(1)[0])
    tail = samplers[1].batches(1, first=2)
    assert [b.tolist() for b in tail] == [b.tolist() for b in samplers[1].batches(1)[2:]]
    stream = batches_from(4, 3, lambda e, f: [(e, f, i) for i in range(f, 3)])
    steps = list(itertools.islice(stream, 4))
    assert [s for s, _ in steps] == [4, 5, 6, 7]
    assert [b for _, b in steps] == [(1, 1, 1), (1, 1, 2), (2, 0, 0), (2, 0, 1)]
    with pytest.raises(ValueError, match="larger than the training split"):
        StepSampler(5, rank=0, world=2, batch=3, seed=0)


class _Source:
    """Fixed random batches, ``steps_per_epoch`` per epoch; records what ``fit`` asks for."""

    def __init__(self, *, steps_per_epoch: int = 3, val_seconds: float = 0.0) -> None:
        self.steps_per_epoch, self.bad_videos, self.val_seconds = steps_per_epoch, 0, val_seconds
        self.epochs: list[tuple[int, int]] = []

    def train_batches(self, epoch: int, first: int) -> list[InputBatch]:
        self.epochs.append((epoch, first))
        return [_batch(seed=epoch * 100 + b) for b in range(first, self.steps_per_epoch)]

    def val_batches(self) -> list[InputBatch]:
        time.sleep(self.val_seconds)
        return [_batch(3, views=2, seed=999)]


class _Recorder(Callback):
    """Records every call; sleeps ``pause`` seconds in each logging and report hook."""

    def __init__(self, pause: float = 0.0) -> None:
        self.pause = pause
        self.steps: list[int] = []
        self.losses: dict[int, float] = {}
        self.train: list[int] = []
        self.reports: list[Report] = []

    def on_step(self, step: int, result: StepResult) -> None:
        self.steps.append(step)
        self.losses[step] = float(result.loss)

    def on_train_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.train.append(step)
        time.sleep(self.pause)

    def on_report(self, report: Report) -> None:
        self.reports.append(report)
        time.sleep(self.pause)

    def validated(self) -> list[int]:
        return [r.step for r in self.reports if r.validation is not None]

    def checkpoints(self) -> list[int]:
        return [r.step for r in self.reports if r.checkpoint]


def _fit(source: _Source, *callbacks: Callback, start_step: int = 0, **train: object) -> Report:
    cfg = _cfg("frozen", log_every=3, eval_every=4, checkpoint_every=5, **train)
    model, net, *_ = _parts(cfg)
    return fit(
        net,
        source,
        cfg.train,
        optimization=Optimization.create(model, cfg.train, CPU),
        start_step=start_step,
        callbacks=callbacks,
    )


def test_fit_logs_validates_and_checkpoints_on_cadence_and_at_the_last_step() -> None:
    recorder = _Recorder()
    last = _fit(_Source(), recorder)
    assert recorder.steps == list(range(1, 11))
    assert recorder.train == [3, 6, 9, 10]
    assert recorder.validated() == [4, 8, 10]
    assert recorder.checkpoints() == [5, 10]
    assert [r.step for r in recorder.reports] == [3, 4, 5, 6, 8, 9, 10]
    assert [r.last for r in recorder.reports] == [False] * 6 + [True]
    assert last is recorder.reports[-1] and last.checkpoint and last.validation is not None
    assert set(last.metrics) == {*names.STEP_METRICS, names.BACKBONE_FORWARD_IMAGES} | {
        *names.EVAL_METRICS
    }
    only_checkpoint = recorder.reports[2]
    assert only_checkpoint.step == 5 and only_checkpoint.metrics == {}
    # train/loss is the mean over the window of steps since the last logged one
    assert recorder.reports[0].metrics[names.TRAIN_LOSS] == pytest.approx(
        np.mean([recorder.losses[s] for s in (1, 2, 3)])
    )
    assert recorder.reports[-1].metrics[names.TRAIN_LOSS] == pytest.approx(recorder.losses[10])
    assert last.metrics[names.VAL_ACC1] == pytest.approx(last.validation.topk(1))


def test_fit_resumes_at_the_start_step_mid_epoch() -> None:
    source, recorder = _Source(steps_per_epoch=3), _Recorder()
    _fit(source, recorder, start_step=7)
    assert recorder.steps == [8, 9, 10]
    assert source.epochs[0] == (2, 1)  # step 7 is batch 1 of epoch 2
    assert recorder.train == [9, 10] and recorder.validated() == [8, 10]
    assert recorder.checkpoints() == [10]
    assert recorder.reports[0].metrics.keys() == set(names.EVAL_METRICS)  # step 8: no window
    assert recorder.reports[1].metrics[names.TRAIN_LOSS] == pytest.approx(
        np.mean([recorder.losses[8], recorder.losses[9]])
    )
    assert _fit(_Source(), _Recorder(), start_step=10) is None


def test_fit_times_only_the_steps() -> None:
    """Logging, checkpoints and validation take 0.3 s each here; none of it is step time."""
    pause = 0.3
    started = time.perf_counter()
    recorder = _Recorder(pause=pause)
    last = _fit(_Source(val_seconds=pause), recorder)
    elapsed = time.perf_counter() - started
    paused = pause * (len(recorder.train) + len(recorder.reports) + len(recorder.validated()))
    assert paused == pytest.approx(4.2)
    assert 0 < last.device_seconds < elapsed - paused + 0.1
    assert last.metrics[names.DEVICE_HOURS] == pytest.approx(last.device_seconds / 3600)
    device = [r.device_seconds for r in recorder.reports]
    assert device == sorted(device)  # cumulative


class _Poison(Callback):
    def __init__(self, at: int, value: float) -> None:
        self.at, self.value, self.model = at, value, None

    def on_step(self, step: int, result: StepResult) -> None:
        if step == self.at:
            with torch.no_grad():
                for p in self.model.parameters():
                    if p.requires_grad:
                        p.fill_(self.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_fit_stops_at_the_first_non_finite_loss(value: float) -> None:
    """The loss is checked on the device every step and read at the next reporting step
    (here step 6): the error names the first non-finite step (5), and nothing after it was
    reported."""
    cfg = _cfg("frozen", log_every=2, eval_every=100, checkpoint_every=100)
    model, net, *_ = _parts(cfg)
    poison, recorder = _Poison(at=4, value=value), _Recorder()
    poison.model = model
    with pytest.raises(NonFiniteLossError, match=r"^step 5: the training loss is nan") as error:
        fit(
            net,
            _Source(),
            cfg.train,
            optimization=Optimization.create(model, cfg.train, CPU),
            callbacks=[poison, recorder],
        )
    assert (error.value.step, math.isnan(error.value.loss)) == (5, True)
    assert recorder.steps == [1, 2, 3, 4, 5, 6] and [r.step for r in recorder.reports] == [2, 4]
    assert pickle.loads(pickle.dumps(error.value)).step == 5  # crosses from a Ray worker

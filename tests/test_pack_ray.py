"""Packs on real Ray Train / Ray Tune with a real MLflow store (sqlite).

A pack of two variants is tracked as two runs, each as its variant trained alone would be
(metrics step by step, params, artifacts, MLflow model) plus the pack tag; a member whose loss
goes non-finite ends FAILED with the reason while its pack-mate FINISHES. A packed sweep
killed with SIGKILL mid-pack and finished by ``--resume``: test_batch_ray.py.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import ray
import torch
from conftest import layout_data, write_config
from mlflow.tracking import MlflowClient
from torch import nn
from worker_faults import InjectIntoWorkers, WorkerMember

from evl_platform.config import ExperimentConfig, apply_overrides
from evl_platform.data.synth import SyntheticLayout
from evl_platform.runtime.storage import PackRecord
from evl_platform.tracking import names
from evl_platform.train.launcher import PackMember, TrainOptions, train, train_pack
from evl_platform.train.loop import Callback, StepResult

pytestmark = pytest.mark.usefixtures("ray_local")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import it

FIXED_VIEWS = {"random_resized_crop": None, "rand_augment": None, "horizontal_flip": False}


class PoisonMember(Callback):
    """Sets one member's head to NaN after ``step``: its next loss is not finite."""

    def __init__(self, member: str, step: int, model: nn.Module | None = None) -> None:
        self.member, self.step, self.model = member, step, model

    def __call__(self, worker: WorkerMember) -> Callback:
        return (
            PoisonMember(self.member, self.step, worker.model)
            if worker.key == self.member
            else Callback()
        )

    def on_step(self, step: int, result: StepResult) -> None:
        if step == self.step and self.model is not None:
            with torch.no_grad():
                self.model.head.fc.weight.fill_(math.nan)


def _client(tmp_path: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


def _runs(tmp_path: Path) -> list:
    client = _client(tmp_path)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


def _history(tmp_path: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    found = _client(tmp_path).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in found)


def _config(tmp_path: Path, layout: SyntheticLayout) -> ExperimentConfig:
    schedule = {
        "num_steps": 8,
        "batch_size": 4,
        "log_every": 2,
        "eval_every": 4,
        "checkpoint_every": 4,
        "amp": "none",
    }
    return write_config(
        tmp_path / "exp.yaml",
        layout_data(layout, augment=FIXED_VIEWS),
        name="tiny",
        train=schedule,
        features={"reuse": False},
    )


def test_a_pack_tracks_each_member_as_alone_and_a_non_finite_member_fails_alone(
    tmp_path: Path, motion_small: SyntheticLayout
) -> None:
    base = _config(tmp_path, motion_small)
    conv = apply_overrides(base, {"name": "conv", "model.decoder.temporal_conv": True}, source="t")
    pe = apply_overrides(base, {"name": "pe", "model.decoder.temporal_pos_embed": True}, source="t")
    options = {
        "num_workers": 2,
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "storage_path": str(tmp_path / "storage"),
    }
    alone = train(conv, TrainOptions(**options, run_name="conv-alone"))
    outcomes = train_pack(
        [PackMember("conv", conv, "conv-packed"), PackMember("pe", pe, "pe-packed")],
        TrainOptions(
            **options, run_name="pack0", callbacks=[InjectIntoWorkers(PoisonMember("pe", 2))]
        ),
    )
    assert outcomes["conv"].status == names.STATUS_FINISHED
    assert outcomes["pe"].status == names.STATUS_FAILED
    runs = {r.info.run_name: r for r in _runs(tmp_path)}
    packed, failed, single = runs["conv-packed"], runs["pe-packed"], runs["conv-alone"]
    assert packed.info.status == "FINISHED" and single.info.status == "FINISHED"
    assert packed.data.tags[names.TAG_PACK] == failed.data.tags[names.TAG_PACK] == "pack0"
    assert names.TAG_PACK not in single.data.tags
    # the packed member's history is the lone run's, step by step
    for key in (names.TRAIN_LOSS, names.TRAIN_ACC1, names.VAL_ACC1, names.VAL_LOSS):
        mine, theirs = (
            _history(tmp_path, packed.info.run_id, key),
            _history(tmp_path, single.info.run_id, key),
        )
        assert [s for s, _ in mine] == [s for s, _ in theirs] and mine, key
        for (_, a), (_, b) in zip(mine, theirs, strict=True):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6), key
    assert alone.metrics[names.VAL_ACC1] == pytest.approx(outcomes["conv"].metrics[names.VAL_ACC1])
    params = {k: v for k, v in packed.data.params.items() if k != "name"}
    assert params == {k: v for k, v in single.data.params.items() if k != "name"}
    artifacts = {a.path for a in _client(tmp_path).list_artifacts(packed.info.run_id)}
    assert {names.ARTIFACT_SCORES, names.ARTIFACT_WEIGHTS, names.ARTIFACT_CONFIG} <= artifacts
    assert artifacts == {a.path for a in _client(tmp_path).list_artifacts(single.info.run_id)}
    # the poisoned member stopped at its first non-finite loss (step 3, found at the logging
    # step 4, before anything was reported), with the reason in its run
    assert failed.info.status == "FAILED"
    assert "step 3" in failed.data.tags[names.TAG_FAILURE]
    assert [s for s, _ in _history(tmp_path, failed.info.run_id, names.TRAIN_LOSS)] == [2]
    assert names.ARTIFACT_SCORES not in {
        a.path for a in _client(tmp_path).list_artifacts(failed.info.run_id)
    }
    record = PackRecord.read(str(tmp_path / "storage"), "pack0")
    assert record is not None and sorted(record.members) == ["conv", "pe"]

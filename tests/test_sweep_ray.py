"""Sweeps on real Ray Tune + Ray Train with a real MLflow store (sqlite): a reduced ablation
(2 variants of the micro backbone on the small motion stand-in, a few steps) planned once on
the driver, a search's samples, and the ensemble stage on score files. A sweep killed with
SIGKILL and finished with ``--resume``: test_batch_ray.py; stopped by SIGTERM and resumed:
test_sigterm.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import layout_data, write_config
from mlflow.tracking import MlflowClient

from evl_platform.cli import main
from evl_platform.data.synth import SyntheticLayout
from evl_platform.sweep.runner import SweepOptions, plan, run_sweep
from evl_platform.tracking import names

pytestmark = pytest.mark.usefixtures("ray_local")

FIXED_VIEWS = {"random_resized_crop": None, "rand_augment": None, "horizontal_flip": False}


def _client(tmp_path: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


def _runs(tmp_path: Path) -> list:
    client = _client(tmp_path)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


def _reduced_ablation(tmp_path: Path, layout: SyntheticLayout) -> Path:
    schedule = {
        "num_steps": 12,
        "batch_size": 4,
        "log_every": 4,
        "eval_every": 6,
        "checkpoint_every": 4,
        "amp": "none",
    }
    features = {"reuse": True, "train_views": 1, "cache_dir": str(tmp_path / "features")}
    data = layout_data(layout, augment=FIXED_VIEWS)
    write_config(tmp_path / "exp.yaml", data, train=schedule, features=features)
    ablation = {
        "name": "reduced",
        "table": {"paper": "8a", "columns": {"ssv2": "SSv2"}},
        "experiments": {"ssv2": "exp.yaml"},
        "variants": {
            "none": {
                "model.decoder.temporal_conv": False,
                "model.decoder.temporal_pos_embed": False,
            },
            "all": {"model.decoder.temporal_conv": True, "model.decoder.temporal_pos_embed": True},
        },
    }
    path = tmp_path / "reduced.yaml"
    path.write_text(yaml.safe_dump(ablation, sort_keys=False))
    return path


def _score_file(path: Path, correct: np.ndarray) -> Path:
    """A 3-class score file over 40 videos: confidently right (0.9) where ``correct``, else
    narrowly wrong (0.5 on the next class, 0.4 on the right one)."""
    labels = np.arange(40) % 3
    rows = np.arange(40)
    probs = np.zeros((40, 3))
    probs[rows, labels] = np.where(correct, 0.9, 0.4)
    probs[rows, (labels + 1) % 3] = np.where(correct, 0.05, 0.5)
    probs[rows, (labels + 2) % 3] = np.where(correct, 0.05, 0.1)
    frame = pd.DataFrame(probs, columns=["a", "b", "c"])
    frame.insert(0, "label", labels)
    frame.insert(0, "video_id", [f"v{i:03d}" for i in range(40)])
    frame.to_csv(path, index=False)
    return path


def test_a_planned_sweep_runs_after_its_yaml_files_are_gone(
    tmp_path: Path, motion_small: SyntheticLayout
) -> None:
    """The driver resolves every trial's config once: the Tune trials and the Ray Train
    workers get it as data, so deleting the ablation and experiment files after planning
    changes nothing, and --set values planned on the driver reach every trial."""
    path = _reduced_ablation(tmp_path, motion_small)
    experiment = tmp_path / "exp.yaml"  # moved under a base: bases are resolved at planning too
    (tmp_path / "base.yaml").write_text(experiment.read_text())
    experiment.write_text(yaml.safe_dump({"base": "base.yaml", "train": {"weight_decay": 0.01}}))
    options = SweepOptions(
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        storage_path=str(tmp_path / "storage"),
        overrides=["train.num_steps=4", "train.lr=0.002"],
        quiet=True,
    )
    planned = plan(path, options)
    for used in (path, experiment, tmp_path / "base.yaml"):
        used.unlink()
    outcome = run_sweep(planned, options)
    assert outcome.failed == []
    trials = [r for r in _runs(tmp_path) if r.data.tags.get(names.TAG_KIND) == "train"]
    assert sorted(r.data.tags[names.TAG_TRIAL] for r in trials) == [
        "all/ssv2/seed0",
        "none/ssv2/seed0",
    ]
    for run in trials:
        params = run.data.params
        assert run.info.status == "FINISHED"
        assert params["train.num_steps"] == "4" and params["train.lr"] == "0.002"
        assert float(params["train.weight_decay"]) == 0.01
        expected = str(run.data.tags[names.TAG_VARIANT] == "all")
        assert params["model.decoder.temporal_conv"] == expected
        assert names.VAL_ACC1 in run.data.metrics


def test_ensemble_stage_of_a_sweep_logs_one_run_per_pair(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = np.arange(40) < 30  # right on videos 0-29
    second = np.arange(40) >= 16  # right on videos 16-39
    ablation = {
        "name": "ens",
        "table": {"paper": "10"},
        "experiments": {
            "k400": str(Path(__file__).parents[1] / "experiments/local_motion_tiny.yaml")
        },
        "variants": {
            "one": {"scores": {"k400": str(_score_file(tmp_path / "one.csv", first))}},
            "two": {"scores": {"k400": str(_score_file(tmp_path / "two.csv", second))}},
        },
        "ensemble": {"pairs": [["one", "two"]]},
    }
    path = tmp_path / "ens.yaml"
    path.write_text(yaml.safe_dump(ablation))
    args = ["sweep", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    assert main([*args, "--storage-path", str(tmp_path / "storage")]) == 0
    out = capsys.readouterr().out
    assert "one + two" in out
    [run] = [r for r in _runs(tmp_path) if r.data.tags.get(names.TAG_KIND) == "ensemble"]
    metrics = run.data.metrics
    assert metrics[names.ENSEMBLE_ACC1_A] == 75.0 and metrics[names.ENSEMBLE_ACC1_B] == 60.0
    # each model is confidently right where the other is narrowly wrong: the even mix is
    # right everywhere, and only alphas 0.4-0.6 are (0.3 and 0.7 let the wrong side win)
    assert metrics[names.ENSEMBLE_ACC1_BEST] == 100.0 and metrics[names.ENSEMBLE_ALPHA] == 0.5
    assert metrics[names.ENSEMBLE_GAIN] == 25.0
    assert run.data.tags["mlflow.parentRunId"] in {
        r.info.run_id for r in _runs(tmp_path) if r.data.tags.get(names.TAG_KIND) == "sweep"
    }
    assert run.data.tags[names.TAG_TRIAL] == "one+two/k400/seed0"


def test_search_runs_its_samples_as_nested_runs_with_sampled_values(
    tmp_path: Path, motion_small: SyntheticLayout
) -> None:
    ablation = _reduced_ablation(tmp_path, motion_small)
    body = yaml.safe_load(ablation.read_text())
    body["variants"] = {"search": {}}
    body["search"] = {
        "num_samples": 2,
        "space": {"train.lr": {"loguniform": [1.0e-4, 1.0e-2]}},
        "asha": {"grace_period": 6, "reduction_factor": 2},
    }
    ablation.write_text(yaml.safe_dump(body, sort_keys=False))
    outcome = run_sweep(
        ablation,
        SweepOptions(
            max_concurrent=1,
            tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
            storage_path=str(tmp_path / "storage"),
            quiet=True,
        ),
    )
    runs = [r for r in _runs(tmp_path) if r.data.tags.get(names.TAG_KIND) == "train"]
    assert len(runs) == 2 and not outcome.failed
    lrs = {float(r.data.params["train.lr"]) for r in runs}
    assert len(lrs) == 2 and all(1.0e-4 <= lr <= 1.0e-2 for lr in lrs)
    client = _client(tmp_path)
    full = 0
    for run in runs:  # finished, or stopped early by ASHA and closed as finished
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
        assert run.data.tags[names.TAG_TRIAL].startswith("search/ssv2/seed0/")
        assert names.VAL_ACC1 in run.data.metrics
        last = max(m.step for m in client.get_metric_history(run.info.run_id, names.VAL_ACC1))
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        if run.data.tags.get(names.TAG_EARLY_STOPPED) == "true":
            assert last < 12  # ASHA stops a sample only below its last step
        else:  # a sample that ran all its steps is not killed while it uploads its files
            assert last == 12 and {names.ARTIFACT_PER_CLASS, names.ARTIFACT_SCORES} <= files
            full += 1
    assert full >= 1  # ASHA never stops the first sample: it has no rival at its rungs
    assert len(outcome.table.rows) == 2

"""SIGTERM (a scheduler's preemption) stops ``train`` and ``sweep`` as Ctrl-C does: one line,
exit 143, the MLflow runs marked KILLED, checkpoints kept, and ``--resume`` continues.

Before, Ray's own SIGTERM handlers ended the driver (``sys.exit``, or ``Aborted`` with a C++
stack dump on a local instance), the run marked FAILED.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray.cloudpickle
import yaml
from conftest import layout_data, write_config
from mlflow.tracking import MlflowClient

from evl_platform.cli import SWEEP_STOPPED, TRAIN_STOPPED, main
from evl_platform.data.synth import SyntheticLayout
from evl_platform.runtime.session import Terminated, received_sigterm, stop_on_sigterm
from evl_platform.runtime.storage import RUN_RECORD
from evl_platform.sweep.plan import SweepPlan
from evl_platform.sweep.runs import SweepParent
from evl_platform.tracking import names
from evl_platform.tracking.client import Tracker

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

FIXED_VIEWS = {"random_resized_crop": None, "rand_augment": None, "horizontal_flip": False}


def _runs(tmp_path: Path) -> list:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


def _steps(tmp_path: Path, run_id: str, key: str) -> list[int]:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _experiment(tmp_path: Path, layout: SyntheticLayout, num_steps: int) -> Path:
    schedule = {
        "num_steps": num_steps,
        "batch_size": 4,
        "log_every": 4,
        "eval_every": num_steps,
        "checkpoint_every": 4,
        "amp": "none",
    }
    features = {"reuse": False, "cache_dir": str(tmp_path / "features")}
    data = layout_data(layout, augment=FIXED_VIEWS)
    write_config(tmp_path / "exp.yaml", data, name="tiny", train=schedule, features=features)
    return tmp_path / "exp.yaml"


def test_sigterm_raises_terminated_in_the_block_and_the_handler_comes_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), stop_on_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs before this returns
    assert signal.getsignal(signal.SIGTERM) is before
    assert received_sigterm()
    assert issubclass(Terminated, KeyboardInterrupt)  # every Ctrl-C path handles it


@pytest.mark.usefixtures("ray_local")
def test_sigterm_stops_training_like_ctrl_c_and_resume_finishes_the_run(
    tmp_path: Path,
    motion_small: SyntheticLayout,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGTERM after the first checkpoint; then ``--resume`` with another architecture is
    refused (one line, nothing touched) and ``--resume`` with more steps, from another working
    directory, continues the same run. Run records are read through the same filesystem layer
    as a bucket (s3://, gs://): a ``file://`` URI stands in for one. (A driver killed with
    SIGKILL, runs left RUNNING, is resumed in test_batch_ray.py.)"""
    config = _experiment(tmp_path, motion_small, num_steps=40)
    args = [
        str(config),
        "--num-workers",
        "2",
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--storage-path",
        (tmp_path / "storage").as_uri(),
    ]
    address = ray.get_runtime_context().gcs_address
    driver = subprocess.Popen(
        [sys.executable, "-m", "evl_platform.cli", "train", *args, "--address", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"RAY_ADDRESS": address},
    )
    try:
        deadline = time.monotonic() + 240
        while not list((tmp_path / "storage").glob("*/checkpoint_00000004/state.pt")):
            assert driver.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 143, err
    assert err.rstrip("\n").splitlines()[-1] == f"stopped by SIGTERM: {TRAIN_STOPPED}"
    driver_lines = "\n".join(line for line in err.splitlines() if " pid=" not in line)
    for crash in ("Traceback", "Aborted", "*** SIG", "SystemExit"):  # workers' lines aside
        assert crash not in driver_lines, err
    [run] = _runs(tmp_path)
    stopped_at = _steps(tmp_path, run.info.run_id, names.TRAIN_LOSS)
    assert run.info.status == "KILLED" and 40 not in stopped_at

    capsys.readouterr()
    assert main(["train", *args, "--set", "model.decoder.temporal_conv=false", "--resume"]) == 2
    assert "model.decoder.temporal_conv: True -> False" in capsys.readouterr().err
    assert [r.info.status for r in _runs(tmp_path)] == ["KILLED"]

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert main(["train", *args, "--set", "train.num_steps=44", "--resume"]) == 0

    [resumed] = _runs(tmp_path)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed_with.train.num_steps"] == "44"
    assert _steps(tmp_path, run.info.run_id, names.TRAIN_LOSS) == list(range(4, 45, 4))
    records = list((tmp_path / "storage").glob(f"*/{RUN_RECORD}"))
    assert [p.parent.name for p in records] == [run.info.run_name]
    assert not (tmp_path / "cwd" / names.ARTIFACT_CONFIG).exists()  # only logged to MLflow


def _terminate_self(
    planned: SweepPlan, tracker: Tracker, parent: SweepParent, *args: object
) -> None:
    """Stands in for the sweep's trials: one trial's run is open when the driver gets
    SIGTERM."""
    tags = {names.TAG_KIND: names.KIND_TRAIN, names.TAG_TRIAL: "none-ssv2-seed0"}
    spec = planned.ablation.spec
    tracker.create_run(spec.name, run_name="trial", tags=tags, parent_run_id=parent.run_id)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
    raise AssertionError("SIGTERM did not stop the sweep")


@pytest.mark.usefixtures("ray_local")
def test_sigterm_stops_a_sweep_with_its_parent_run_killed_and_resume_finishes_it(
    tmp_path: Path,
    motion_small: SyntheticLayout,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _experiment(tmp_path, motion_small, num_steps=4)
    ablation = {
        "name": "stopped",
        "table": {"paper": "8a", "columns": {"ssv2": "SSv2"}},
        "experiments": {"ssv2": "exp.yaml"},
        "variants": {"none": {"model.decoder.temporal_conv": False}},
    }
    (tmp_path / "stopped.yaml").write_text(yaml.safe_dump(ablation, sort_keys=False))
    monkeypatch.setattr("evl_platform.sweep.runner._run_trials", _terminate_self)
    before = signal.getsignal(signal.SIGTERM)

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["sweep", str(tmp_path / "stopped.yaml"), "--tracking-uri", uri]
    args += ["--storage-path", str(tmp_path / "storage")]
    code = main(args)

    assert code == 143
    err = capsys.readouterr().err  # MLflow's INFO lines on creating the store come first
    assert err.splitlines()[-1] == f"stopped by SIGTERM: {SWEEP_STOPPED}" and "Traceback" not in err
    runs = {run.info.run_name: run.info.status for run in _runs(tmp_path)}
    assert len(runs) == 2 and runs.pop("trial") == "KILLED"  # its trainer died with the driver
    assert list(runs.values()) == ["KILLED"]  # the parent
    assert signal.getsignal(signal.SIGTERM) is before
    [parent] = [r for r in _runs(tmp_path) if r.data.tags.get(names.TAG_KIND) == "sweep"]

    monkeypatch.undo()  # --resume reopens the killed parent and trains what it lacks
    assert main([*args, "--resume"]) == 0
    runs = _runs(tmp_path)
    [after] = [r for r in runs if r.data.tags.get(names.TAG_KIND) == "sweep"]
    assert after.info.run_id == parent.info.run_id and after.info.status == "FINISHED"
    [trained] = [r for r in runs if r.data.tags.get(names.TAG_TRIAL) == "none/ssv2/seed0"]
    assert trained.info.status == "FINISHED" and names.VAL_ACC1 in trained.data.metrics
    assert trained.data.tags["mlflow.parentRunId"] == parent.info.run_id
    files = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id)}
    assert names.ARTIFACT_RESULTS_CSV in files

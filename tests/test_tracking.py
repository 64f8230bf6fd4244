"""The MLflow client: URI resolution and concurrent writers on the default sqlite store."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from evl_platform.tracking import Tracker, resolve_tracking_uri
from evl_platform.tracking.artifacts import scores_frame


def test_relative_sqlite_and_directory_uris_become_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path}/sub/x.db"
    assert resolve_tracking_uri("mlruns") == (tmp_path / "mlruns").as_uri()
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    assert resolve_tracking_uri() == "http://10.0.0.1:5000"


def _writer(uri: str, worker: int, steps: int) -> str:
    tracker = Tracker(uri)
    run_id = tracker.create_run("concurrent", run_name=f"trial-{worker}", tags={"w": str(worker)})
    tracker.log_params(run_id, {f"p{i}": i for i in range(150)})
    for step in range(steps):
        tracker.log_metrics(
            run_id, {"train/loss": worker + step / 1000, "val/acc1": step}, step=step
        )
    tracker.terminate(run_id)
    return run_id


def test_concurrent_writers_on_sqlite_lose_nothing(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    Tracker(uri).experiment_id("concurrent")  # the store exists before the trials start
    workers, steps = 6, 60
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        run_ids = pool.starmap(_writer, [(uri, w, steps) for w in range(workers)])
    client = MlflowClient(uri)
    assert len(set(run_ids)) == workers
    for worker, run_id in enumerate(run_ids):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and len(run.data.params) == 150
        history = client.get_metric_history(run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(steps))
        assert {round(m.value - worker, 3) for m in history} == {s / 1000 for s in range(steps)}


def test_scores_frame_has_one_row_per_video_and_class_columns() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    frame = scores_frame(["b", "a", "c"], np.array([2, 0]), np.array([0, 1]), probs, ["x", "y"])
    assert list(frame.columns) == ["video_id", "label", "x", "y"]
    assert frame["video_id"].tolist() == ["b", "c"]
    assert frame.loc[frame.video_id == "c", "x"].item() == pytest.approx(0.9)
    with pytest.raises(ValueError, match="2 score columns for 3 classes"):
        scores_frame(["a"], np.array([0]), np.array([0]), probs, ["x", "y", "z"])

"""System metrics of a training node go to its MLflow runs (a real SQLite store), sampled by
MLflow's own monitor at a short interval."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray  # noqa: F401 - a venv without psutil of its own gets the copy bundled with Ray
from mlflow.tracking import MlflowClient

from evl_platform.tracking.system import start_system_metrics, stop_system_metrics

CPU = "cpu_utilization_percentage"
MEMORY = "system_memory_usage_megabytes"


@pytest.fixture
def store(tmp_path: Path) -> tuple[str, MlflowClient]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return uri, MlflowClient(uri)


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_every_run_of_the_node_gets_the_same_samples(store: tuple[str, MlflowClient]) -> None:
    uri, client = store
    experiment = client.create_experiment("system")
    runs = [client.create_run(experiment).info.run_id for _ in range(2)]
    monitor = start_system_metrics(runs, uri, interval_s=0.2)
    try:
        _wait_for(lambda: len(client.get_metric_history(runs[0], f"system/{CPU}")) >= 3)
    finally:
        stop_system_metrics(monitor)

    first = _history(client, runs[0], f"system/{CPU}")
    assert [step for step, _ in first] == list(range(len(first)))
    assert all(0 <= value <= 100 for _, value in first)
    assert _history(client, runs[1], f"system/{CPU}") == first  # one sampler, two runs
    memory = _history(client, runs[1], f"system/{MEMORY}")
    assert len(memory) == len(first) and all(value > 0 for _, value in memory)


def test_a_restart_continues_the_steps_and_other_nodes_are_named(
    store: tuple[str, MlflowClient],
) -> None:
    uri, client = store
    run = client.create_run(client.create_experiment("system")).info.run_id
    for _ in range(2):  # the second start stands in for a restarted worker or --resume
        monitor = start_system_metrics(run, uri, interval_s=0.2)
        before = len(client.get_metric_history(run, f"system/{CPU}"))
        _wait_for(lambda b=before: len(client.get_metric_history(run, f"system/{CPU}")) > b + 1)
        stop_system_metrics(monitor)
    steps = [step for step, _ in _history(client, run, f"system/{CPU}")]
    assert steps == list(range(len(steps)))  # no step logged twice

    other = start_system_metrics(run, uri, node_rank=1, interval_s=0.2)
    try:
        _wait_for(lambda: client.get_metric_history(run, f"system/node_1/{CPU}"))
    finally:
        stop_system_metrics(other)


def test_sampling_stops_when_the_run_ends(store: tuple[str, MlflowClient]) -> None:
    uri, client = store
    run = client.create_run(client.create_experiment("system")).info.run_id
    monitor = start_system_metrics(run, uri, interval_s=0.2)
    client.set_terminated(run, "KILLED")
    monitor._process.join(timeout=10)
    assert not monitor._process.is_alive()
    stop_system_metrics(monitor)
    stop_system_metrics(None)  # a worker that started none

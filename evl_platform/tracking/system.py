"""System metrics of a training node, logged with MLflow's own system-metrics monitor.

The driver logs a run's training metrics, but the driver's machine is not where training
runs: one worker per node (local rank 0) samples its node instead, with MLflow's
``SystemMetricsMonitor`` (CPU utilisation, memory, disk, network, and each GPU's
utilisation and memory where NVIDIA's NVML is present), and logs the samples to every run it
trains (one, or each member of a pack). They appear under ``system/`` in the MLflow UI, next
to ``train/clips_per_s``: a GPU at low utilisation while the CPUs are pegged is a loader that
cannot keep up.

Nodes other than the first log as ``system/node_<rank>/...``. Steps continue after a restart
or ``--resume`` instead of starting again at 0. Sampling stops on :func:`stop_system_metrics`,
or by itself once a run is no longer RUNNING.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

DEFAULT_INTERVAL_S = 10.0
"""Seconds between samples (MLflow's default); ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``
overrides it."""


def start_system_metrics(
    run_ids: str | Sequence[str],
    tracking_uri: str,
    *,
    node_rank: int = 0,
    interval_s: float = DEFAULT_INTERVAL_S,
) -> Any:
    """Starts sampling this node's system metrics into ``run_ids``, in a daemon thread.

    Args:
        run_ids: the MLflow run (or the runs of a pack's members) the node trains.
        tracking_uri: the store the driver logs to.
        node_rank: this node's rank among the training nodes (0 logs without a node prefix).
        interval_s: seconds between samples.

    Returns:
        The monitor, for :func:`stop_system_metrics`.
    """
    from evl_platform.tracking.client import store_uri

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # per-run INFO lines
    ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
    monitor = _monitor_class()(
        ids,
        store_uri(tracking_uri),
        interval_s=interval_s,
        node_id=f"node_{node_rank}" if node_rank else None,
    )
    monitor.start()
    return monitor


def stop_system_metrics(monitor: Any) -> None:
    """Stops sampling and logs what was sampled; ``None`` (no monitor started) is fine."""
    if monitor is not None:
        monitor.finish()


def _monitor_class() -> type:
    """MLflow's monitor, sampling once and logging each sample to several runs (it logs to
    one). Defined on first use: MLflow is imported only by the workers that sample."""
    global _RunsMonitor  # noqa: PLW0603 - one class per process
    if _RunsMonitor is not None:
        return _RunsMonitor
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.utils.autologging_utils import BatchMetricsLogger

    class RunsMonitor(SystemMetricsMonitor):
        """A :class:`SystemMetricsMonitor` whose samples go to every run of ``run_ids``."""

        def __init__(
            self, run_ids: list[str], uri: str, *, interval_s: float, node_id: str | None
        ) -> None:
            super().__init__(
                run_ids[0],
                sampling_interval=interval_s,
                resume_logging=True,  # a restarted worker continues the steps
                node_id=node_id,
                tracking_uri=uri,
            )
            self.others = [BatchMetricsLogger(r, tracking_uri=uri) for r in run_ids[1:]]

        def publish_metrics(self, metrics: dict[str, float]) -> None:
            step = self._logging_step
            super().publish_metrics(metrics)  # clears the monitors' samples
            prefix = self._metrics_prefix + (f"{self.node_id}/" if self.node_id else "")
            for logger in self.others:
                logger.record_metrics({prefix + k: v for k, v in metrics.items()}, step)

        def finish(self) -> None:
            super().finish()
            for logger in self.others:
                logger.flush()

    _RunsMonitor = RunsMonitor
    return RunsMonitor


_RunsMonitor: type | None = None

"""What the cluster can grow to and what memory its workers have.

Two questions the sweep asks before it starts: how many trials can run at once (the
autoscaler's maximum, not the nodes up now: on ``cluster.yaml`` the GPU workers start at
zero), and how much memory a trial's worker will have (measured on a worker when one is up,
else from the node type the autoscaler would start).

The node types come from the autoscaler's cluster config reported to the GCS (autoscaler v2,
KubeRay) or from the cluster launcher's config on the head (``~/ray_bootstrap_config.yaml``,
whose ``resources`` ``ray up`` fills from EC2's instance descriptions). Where a node type has
no ``GPU`` or no GPU memory there, :data:`INSTANCE_TYPES` and :data:`ACCELERATOR_MEMORY`
(AWS's published figures) fill them in.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evl_platform.runtime.cluster import BOOTSTRAP_CONFIG, PROBE_TIMEOUT_S

GIB = 1024**3


@dataclass(frozen=True)
class InstanceType:
    """A cloud machine type: vCPUs, memory, GPUs and memory per GPU (bytes)."""

    cpus: int
    memory: int
    gpus: int = 0
    gpu_memory: int = 0


INSTANCE_TYPES: dict[str, InstanceType] = {
    "m5.2xlarge": InstanceType(8, 32 * GIB),
    "g5.12xlarge": InstanceType(48, 192 * GIB, 4, 24 * GIB),  # A10G
    "g5.48xlarge": InstanceType(192, 768 * GIB, 8, 24 * GIB),
    "g6e.12xlarge": InstanceType(48, 384 * GIB, 4, 48 * GIB),  # L40S
    "p4d.24xlarge": InstanceType(96, 1152 * GIB, 8, 40 * GIB),  # A100 40 GB
    "p4de.24xlarge": InstanceType(96, 1152 * GIB, 8, 80 * GIB),  # A100 80 GB
    "p5.48xlarge": InstanceType(192, 2048 * GIB, 8, 80 * GIB),  # H100
}
"""AWS instance types ``cluster.yaml`` uses or names as alternatives (AWS's published vCPUs,
memory, GPUs and GPU memory); a type not listed needs its ``resources`` in the config."""

ACCELERATOR_MEMORY: dict[str, int] = {
    "A10G": 24 * GIB,
    "L4": 24 * GIB,
    "L40S": 48 * GIB,
    "T4": 16 * GIB,
    "V100": 16 * GIB,
    "A100": 40 * GIB,  # the smaller model; p4de's 80 GB is known by its instance type
    "H100": 80 * GIB,
    "H200": 141 * GIB,
}
"""Memory per GPU by Ray's ``accelerator_type:<name>`` resource, where no instance type says."""


@dataclass(frozen=True)
class NodeType:
    """A kind of node the autoscaler may start.

    Attributes:
        name: the node type's (or node group's) name.
        resources: Ray resources of one node (``CPU``, ``GPU``, ``memory``...).
        max_workers: how many the autoscaler may start (``sys.maxsize``: no limit).
        gpu_memory: bytes per GPU, 0 when unknown or without GPUs.
        head: the head node's type (always up, never started).
    """

    name: str
    resources: Mapping[str, float] = field(default_factory=dict)
    max_workers: int = 0
    gpu_memory: int = 0
    head: bool = False


def launcher_node_types(config: Mapping[str, Any]) -> tuple[NodeType, ...]:
    """The node types of a cluster-launcher config (``cluster.yaml`` or the head's bootstrap
    copy), resources filled in from :data:`INSTANCE_TYPES` where the config has none."""
    head = config.get("head_node_type")
    found = []
    for name, spec in (config.get("available_node_types") or {}).items():
        instance = INSTANCE_TYPES.get(str((spec.get("node_config") or {}).get("InstanceType")))
        resources = dict(spec.get("resources") or {})
        if instance is not None:
            resources.setdefault("CPU", instance.cpus)
            if instance.gpus:
                resources.setdefault("GPU", instance.gpus)
        memory = instance.gpu_memory if instance is not None else accelerator_memory(resources)
        found.append(
            NodeType(
                name,
                resources,
                int(spec.get("max_workers") or 0),
                memory if resources.get("GPU") else 0,
                head=name == head,
            )
        )
    return tuple(found)


def accelerator_memory(resources: Mapping[str, float]) -> int:
    """Memory per GPU from an ``accelerator_type:<name>`` resource (0: unknown)."""
    for key in resources:
        if key.startswith("accelerator_type:"):
            return ACCELERATOR_MEMORY.get(key.partition(":")[2], 0)
    return 0


def max_resources(
    node_types: Sequence[NodeType],
    *,
    current: Mapping[str, float],
    max_workers: int | None = None,
) -> dict[str, float]:
    """Each resource's total when the autoscaler has started as many nodes as it may.

    Args:
        node_types: the node types (the head's counts once, as it is up).
        current: the cluster's resources now (a node started by hand counts too).
        max_workers: the cluster's cap on worker nodes of all types together.

    Returns:
        Resource name -> the larger of what the cluster has now and what it can grow to.
    """
    cap = sys.maxsize if max_workers is None else max_workers
    keys = set(current) | {k for t in node_types for k in t.resources}
    totals = {}
    for key in keys:
        grown = sum(t.resources.get(key, 0) for t in node_types if t.head)
        left = cap
        for kind in sorted(node_types, key=lambda t: -t.resources.get(key, 0)):
            if kind.head or left <= 0:
                continue
            count = min(kind.max_workers, left)
            grown += count * kind.resources.get(key, 0)
            left -= count
        totals[key] = max(float(current.get(key, 0)), float(grown))
    return totals


def cluster_node_types() -> tuple[tuple[NodeType, ...], int | None]:
    """The connected cluster's node types and its cap on workers: from the autoscaler's
    config in the GCS, else the launcher's config on the head, else none (a fixed cluster)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # no autoscaler state reported (a cluster made with `ray start`)
        config = None
    if config is not None and config.node_group_configs:
        return tuple(
            NodeType(
                g.name,
                dict(g.resources),
                sys.maxsize if g.max_count == -1 else g.max_count,
                accelerator_memory(g.resources),
            )
            for g in config.node_group_configs
        ), None
    launcher = _on_head(_read_launcher_config)
    if not launcher:
        return (), None
    total = launcher.get("max_workers")
    return launcher_node_types(launcher), None if total is None else int(total)


def cluster_max_resources() -> dict[str, float]:
    """The connected cluster's resources once the autoscaler has grown it as far as it may
    (its current resources on a cluster that cannot grow)."""
    import ray

    node_types, cap = cluster_node_types()
    return max_resources(node_types, current=ray.cluster_resources(), max_workers=cap)


def _read_launcher_config() -> dict[str, Any]:
    import yaml

    try:
        return yaml.safe_load(Path(BOOTSTRAP_CONFIG).expanduser().read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _on_head(fn: Any) -> Any:
    """``fn()`` run on the head node (here, when this process is on the head)."""
    import ray

    head = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and _is_head(n)]
    if head == [ray.get_runtime_context().get_node_id()]:
        return fn()
    task = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})(fn)
    return ray.get(task.remote(), timeout=PROBE_TIMEOUT_S)


def _is_head(node: Mapping[str, Any]) -> bool:
    return "node:__internal_head__" in node.get("Resources", {})


def host_memory() -> int:
    """Memory this machine can still give (bytes): ``MemAvailable`` of /proc/meminfo, else
    the free physical pages (0 where neither is known)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def device_memory(use_gpu: bool) -> int:
    """This process's device memory: its GPU's total memory, or :func:`host_memory`."""
    if use_gpu:
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return host_memory()


def worker_memory(*, use_gpu: bool, cpus_per_worker: float) -> tuple[int, str]:
    """The memory one trial worker will have, and how it was found.

    Measured by a small Ray task with a worker's resources when the cluster has them free
    now; otherwise the smallest per-GPU memory (GPU trials) or node memory (CPU trials) of
    the node types the autoscaler may start (a trial may land on any of them); 0 when
    neither tells.
    """
    import ray

    free = ray.available_resources()
    wanted = {"GPU": 1.0} if use_gpu else {"CPU": float(cpus_per_worker)}
    if all(free.get(k, 0) >= v for k, v in wanted.items()):
        task = ray.remote(num_cpus=0 if use_gpu else cpus_per_worker, num_gpus=1 if use_gpu else 0)(
            device_memory
        )
        try:
            return ray.get(task.remote(use_gpu), timeout=PROBE_TIMEOUT_S), "measured on a worker"
        except ray.exceptions.GetTimeoutError:
            pass
    startable = [t for t in cluster_node_types()[0] if t.head or t.max_workers > 0]
    if use_gpu:
        sizes = [t.gpu_memory for t in startable if t.resources.get("GPU") and t.gpu_memory]
        return min(sizes, default=0), "the node types' GPU memory"
    sizes = [int(t.resources.get("memory", 0)) for t in startable if t.resources.get("memory")]
    return min(sizes, default=0), "the node types' memory"

"""What changes when a command runs on a Ray cluster instead of one machine.

Two things, both done by the driver once it is connected to Ray:

- **The cluster's defaults.** ``cluster.yaml`` starts Ray on every node with
  ``MLFLOW_TRACKING_URI`` (the head's tracking server), ``EVL_PLATFORM_STORAGE`` (the bucket)
  and ``EVL_PLATFORM_CACHE`` (the shared feature cache) in the environment. A driver attached
  with ``--address`` whose own environment lacks one of them takes the head node's value
  (:func:`adopt_head_environment`), so ``train``/``sweep``/``report --address auto`` record
  into the cluster's store without repeating it on the command line.
- **Shared storage.** Checkpoints, a local MLflow store (SQLite file or ``file:`` directory)
  and the feature cache are written by processes on every node. On a cluster a local path is
  accepted only when every node sees the same directory (a probe file written here is read by a
  task on each node) and, when the autoscaler can still add nodes that cannot be probed yet,
  when it lies on a network filesystem. Otherwise :func:`check_shared` raises
  :class:`SharedStorageError` before anything runs.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CLUSTER_VARIABLES = ("MLFLOW_TRACKING_URI", "EVL_PLATFORM_STORAGE", "EVL_PLATFORM_CACHE")
"""Environment variables a cluster sets for the platform on every node (see cluster.yaml)."""

NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "lustre",
        "gpfs",
        "beegfs",
        "ceph",
        "glusterfs",
        "afs",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.sshfs",
        "fuse.juicefs",
        "fuse.glusterfs",
        "fuse.ceph-fuse",
        "fuse.efs",
    }
)
"""Filesystem types (as in /proc/mounts) that several machines can mount at once."""

PROBE_TIMEOUT_S = 60.0
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
"""Where ``ray up`` puts the cluster config on the head node (the autoscaler reads it)."""


class SharedStorageError(RuntimeError):
    """A node-local path was given where every node of the cluster must read and write."""


@dataclass(frozen=True)
class ClusterNode:
    """One alive node of the connected Ray cluster."""

    node_id: str
    address: str
    is_head: bool


def alive_nodes() -> list[ClusterNode]:
    """The alive nodes of the connected cluster, the head first."""
    import ray

    nodes = [
        ClusterNode(
            node_id=n["NodeID"],
            address=n["NodeManagerAddress"],
            is_head="node:__internal_head__" in n.get("Resources", {}),
        )
        for n in ray.nodes()
        if n.get("Alive")
    ]
    return sorted(nodes, key=lambda n: not n.is_head)


def can_add_nodes() -> bool:
    """Whether the cluster's autoscaler can start nodes that are not up yet.

    Two sources: the cluster config the autoscaler (v2, KubeRay) reports to the GCS, which
    Ray Train reads for the same question, and the cluster launcher's config on the head node
    (``~/ray_bootstrap_config.yaml``, written by ``ray up``; Ray Tune's test of "a launched
    cluster"), whose worker node types say how many workers may join.
    """
    import ray

    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # no autoscaler state reported (a cluster made with `ray start`)
        config = None
    if config is not None and any(g.max_count != 0 for g in config.node_group_configs):
        return True

    head = [n.node_id for n in alive_nodes() if n.is_head]
    if head == [ray.get_runtime_context().get_node_id()]:  # this process runs on the head
        return _launcher_max_workers(Path(BOOTSTRAP_CONFIG).expanduser()) > 0

    @ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})
    def launcher_allows_workers() -> bool:
        return _launcher_max_workers(Path(BOOTSTRAP_CONFIG).expanduser()) > 0

    return ray.get(launcher_allows_workers.remote(), timeout=PROBE_TIMEOUT_S)


def _launcher_max_workers(path: Path) -> int:
    """Workers a cluster-launcher config lets the autoscaler start (0: none, or no file)."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return 0
    # The head's type counts too: the local provider uses one type for the head and workers.
    types = config.get("available_node_types") or {}
    per_type = sum(int(spec.get("max_workers") or 0) for spec in types.values())
    total = config.get("max_workers")
    if not types:  # an old-style config: only the top-level count
        return int(total or 0)
    return per_type if total is None else min(per_type, int(total))


def head_environment() -> dict[str, str]:
    """The :data:`CLUSTER_VARIABLES` set in the environment of the head node's Ray workers."""
    import ray

    @ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})
    def read() -> dict[str, str]:
        return {k: os.environ[k] for k in CLUSTER_VARIABLES if os.environ.get(k)}

    return ray.get(read.remote(), timeout=PROBE_TIMEOUT_S)


def adopt_head_environment() -> dict[str, str]:
    """Sets each cluster variable this process lacks to the head node's value.

    Returns:
        The variables taken from the head (printed by the caller).
    """
    taken = {k: v for k, v in head_environment().items() if not os.environ.get(k)}
    os.environ.update(taken)
    return taken


def local_path(location: str) -> Path | None:
    """The directory a storage location or tracking URI writes to on this machine, or
    ``None`` for remote storage (``s3://``, ``gs://``, an ``http(s)`` tracking server...)."""
    if location.startswith("sqlite:///"):
        return Path(location.removeprefix("sqlite:///").partition("?")[0]).parent
    if location.startswith("file:"):
        return Path(location.removeprefix("file://").removeprefix("file:"))
    if "://" in location:
        return None
    return Path(location)


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (longest mount point in /proc/mounts)."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    target, best, kind = str(path.resolve()), "", "unknown"
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def _sees(marker: str, token: str) -> bool:
    path = Path(marker)
    return path.is_file() and path.read_text() == token


def check_shared(locations: Mapping[str, str]) -> None:
    """Refuses node-local paths on a multi-node (or growing) cluster.

    Args:
        locations: what each path is for (named as the user sets it, e.g. ``--storage-path``)
            mapped to the storage path or URI.

    Raises:
        SharedStorageError: a path some node cannot see, or a node-local filesystem on a
            cluster the autoscaler can grow; the message names the option and the path.
    """
    nodes = alive_nodes()
    growing = can_add_nodes()
    if len(nodes) <= 1 and not growing:
        return
    for what, location in locations.items():
        directory = local_path(location)
        if directory is None:
            continue
        directory = directory.expanduser().resolve()
        blind = _blind_nodes(directory, nodes)
        if blind:
            raise SharedStorageError(
                f"{what} {location} is not shared storage: node(s) {', '.join(blind)} of the "
                f"cluster cannot see {directory}. On a cluster every node writes there: use a "
                "bucket URI (s3://..., gs://...) or a directory on a filesystem every node "
                "mounts (cluster.yaml: $EVL_SHARED)"
            )
        kind = filesystem_type(directory)
        if growing and kind not in NETWORK_FILESYSTEMS:
            raise SharedStorageError(
                f"{what} {location} is on a node-local filesystem ({kind}) and the cluster's "
                "autoscaler can add nodes that will not see it: use a bucket URI (s3://..., "
                "gs://...) or a directory on a network filesystem every node mounts "
                "(cluster.yaml: $EVL_SHARED)"
            )


def _blind_nodes(directory: Path, nodes: list[ClusterNode]) -> list[str]:
    """Addresses of the nodes that cannot read a probe file written into ``directory``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    directory.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = directory / f".evl-shared-probe-{token}"
    marker.write_text(token)
    probe = ray.remote(num_cpus=0)(_sees)
    try:
        answers = ray.get(
            [
                probe.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)
                ).remote(str(marker), token)
                for node in nodes
            ],
            timeout=PROBE_TIMEOUT_S,
        )
    finally:
        marker.unlink(missing_ok=True)
    return [
        f"{node.address} ({'head, ' if node.is_head else ''}node {node.node_id[:8]})"
        for node, seen in zip(nodes, answers, strict=True)
        if not seen
    ]

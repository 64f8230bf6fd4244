"""Training on a real multi-node Ray cluster, and against a real MLflow tracking server.

The cluster is two (then three) ``ray start`` node processes on loopback with token
authentication, each with one CPU, so a 2-worker training puts one worker on each node. The
second node runs in its own mount namespace with a private tmpfs over one directory: a real
node-local path, which ``train`` must refuse. Every process a node starts (raylet, GCS, Ray
workers) inherits an environment marker, so a node is killed, and the cluster stopped, by
killing every process carrying its marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import layout_data, write_config
from mlflow.tracking import MlflowClient

from evl_platform.cli import main
from evl_platform.data.synth import SyntheticLayout
from evl_platform.runtime.cluster import (
    NETWORK_FILESYSTEMS,
    _launcher_max_workers,
    check_shared,
    filesystem_type,
    local_path,
)
from evl_platform.tracking import names

RAY = str(Path(sys.executable).parent / "ray")
MLFLOW = str(Path(sys.executable).parent / "mlflow")
FIXED_VIEWS = {"random_resized_crop": None, "rand_augment": None, "horizontal_flip": False}
CLUSTER_VARIABLES = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "EVL_PLATFORM_STORAGE")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (``NAME=value``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or a zombie
            continue
        if marker.encode() in environ:
            found.append(int(entry.name))
    return found


def _kill_all(marker: str, timeout: float = 30) -> list[int]:
    """SIGKILLs every process carrying ``marker`` until none is left; returns survivors."""
    deadline = time.monotonic() + timeout
    while (pids := _processes_with(marker)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    return _processes_with(marker)


def _can_unshare_mounts() -> bool:
    probe = subprocess.run(
        ["unshare", "--mount", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


class LoopbackCluster:
    """Ray nodes started with ``ray start`` on 127.0.0.1, one CPU each.

    Args:
        root: a directory for logs and everything the cluster writes.
        head_env: extra environment of the head node (the cluster's defaults).
    """

    def __init__(self, root: Path, head_env: dict[str, str]) -> None:
        self.root = root
        self.tag = uuid.uuid4().hex
        self.port, self.dashboard = _free_ports(2)
        self.address = f"127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARIABLES}
        self.env = env | {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "EVL_TEST_CLUSTER": self.tag,
        }
        self.head_env = head_env
        self.nodes: list[str] = []

    def start_node(self, name: str, *, head: bool = False, private: Path | None = None) -> None:
        """Starts a node and waits until it has joined.

        Args:
            name: the node's marker name.
            head: start the head (GCS, dashboard) instead of a worker node.
            private: a directory this node sees as an empty tmpfs of its own.
        """
        agent, grpc, metrics, runtime_env, manager, objects = _free_ports(6)
        command = [
            RAY,
            "start",
            "--block",
            "--num-cpus=1",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--node-manager-port={manager}",
            f"--object-manager-port={objects}",
        ]
        if head:
            client_port = _free_ports(1)[0]
            command += [
                "--head",
                f"--port={self.port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard}",
                f"--ray-client-server-port={client_port}",
            ]
        else:
            command.append(f"--address={self.address}")
        if private is not None:
            private.mkdir(parents=True, exist_ok=True)
            script = f'mount -t tmpfs tmpfs "{private}" && exec "$@"'
            command = ["unshare", "--mount", "sh", "-c", script, "sh", *command]
        env = self.env | (self.head_env if head else {}) | {"EVL_TEST_NODE": self._node(name)}
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 90
        while b"block forever" not in log.read_bytes():
            assert process.poll() is None, f"node {name} did not start:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"node {name} not up in 90 s:\n{log.read_text()}"
            time.sleep(0.2)
        self.nodes.append(name)

    def _node(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def kill_node(self, name: str) -> None:
        """SIGKILLs every process of one node (raylet, agents, its Ray workers)."""
        assert _kill_all(f"EVL_TEST_NODE={self._node(name)}") == []
        self.nodes.remove(name)

    def stop(self) -> list[int]:
        """Kills every process the cluster (or a driver run with :attr:`env`) started;
        returns the pids that survived."""
        survivors = _kill_all(f"EVL_TEST_CLUSTER={self.tag}")
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        with contextlib.suppress(OSError):  # `ray start --head` names itself the default
            if current.read_text().strip().endswith(f":{self.port}"):
                current.unlink()
        return survivors

    def evl(
        self, *args: str, timeout: float = 300, on_head: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``evl-platform ARGS`` as a driver on this machine (not in the test process,
        which is connected to the tests' own local Ray); ``on_head``: with the head's home."""
        return subprocess.run(
            [sys.executable, "-m", "evl_platform.cli", *args],
            env=self.env | ({"HOME": self.head_env["HOME"]} if on_head else {}),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def worker_nodes(self) -> set[str]:
        """Node ids of the alive Ray Train workers (through the state API)."""
        listed = subprocess.run(
            [
                RAY,
                "list",
                "actors",
                f"--address=http://127.0.0.1:{self.dashboard}",
                "--filter",
                "class_name=RayTrainWorker",
                "--filter",
                "state=ALIVE",
                "--format=json",
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        return {actor["node_id"] for actor in json.loads(listed.stdout)}


def _registered_step(storage: Path) -> int | None:
    """The step of the newest checkpoint Ray Train has registered (it polls its workers, so
    a checkpoint directory can exist on disk a moment before it is registered)."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        with contextlib.suppress(ValueError, OSError):  # being rewritten
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
            if latest:
                return int(latest["checkpoint_dir_name"].removeprefix("checkpoint_"))
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackCluster]:
    """A head and a second node whose ``node-local/`` directory is its own."""
    if shutil.which("unshare") is None or not _can_unshare_mounts():
        pytest.skip("needs `unshare --mount` to give the second node a node-local directory")
    root = tmp_path_factory.mktemp("cluster")
    head_env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{root}/shared/mlflow.db",
        "EVL_PLATFORM_STORAGE": str(root / "shared" / "storage"),
        "HOME": str(root / "head-home"),  # where `ray up` would put its launcher config
    }
    (root / "shared").mkdir()
    (root / "head-home").mkdir()
    loopback = LoopbackCluster(root, head_env)
    try:
        loopback.start_node("head", head=True)
        loopback.start_node("second", private=root / "node-local")
        yield loopback
    finally:
        survivors = loopback.stop()
    assert survivors == [], f"processes left running: {survivors}"


def _experiment(root: Path, layout: SyntheticLayout, **train: object) -> Path:
    schedule = {
        "num_steps": 40,
        "batch_size": 4,
        "log_every": 4,
        "eval_every": 40,
        "checkpoint_every": 4,
        "amp": "none",
        "max_failures": 2,
        **train,
    }
    write_config(
        root / "exp.yaml",
        layout_data(layout, augment=FIXED_VIEWS),
        name="tiny",
        train=schedule,
        features={"reuse": False},
    )
    return root / "exp.yaml"


def test_a_node_local_storage_path_is_refused_on_a_cluster(
    cluster: LoopbackCluster, motion_small: SyntheticLayout
) -> None:
    config = _experiment(cluster.root, motion_small)
    local = cluster.root / "node-local" / "storage"
    done = cluster.evl(
        "train", str(config), "--num-workers=2", f"--address={cluster.address}",
        f"--storage-path={local}",
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: --storage-path {local} is not shared storage: node(s) ")
    assert "cannot see" in line and "(head" not in line  # only the second node is blind
    client = MlflowClient(cluster.head_env["MLFLOW_TRACKING_URI"])
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    assert not list((cluster.root / "node-local").glob(".evl-shared-probe-*"))


def test_a_local_path_is_refused_where_the_autoscaler_can_add_nodes(
    cluster: LoopbackCluster, motion_small: SyntheticLayout
) -> None:
    """Both nodes see ``shared/``, but a node the autoscaler starts later would not: with the
    launcher's config on the head (as `ray up` leaves it), only a network filesystem does."""
    config = _experiment(cluster.root, motion_small)
    bootstrap = Path(cluster.head_env["HOME"]) / "ray_bootstrap_config.yaml"
    bootstrap.write_text((Path(__file__).parents[1] / "cluster.yaml").read_text())
    storage = cluster.root / "shared" / "elsewhere"
    try:
        args = ("train", str(config), f"--address={cluster.address}", f"--storage-path={storage}")
        done = cluster.evl(*args, on_head=True)
    finally:
        bootstrap.unlink()
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: --storage-path {storage} is on a node-local filesystem (")
    assert "autoscaler can add nodes" in line


def test_training_finishes_from_a_checkpoint_after_losing_a_node(
    cluster: LoopbackCluster, motion_small: SyntheticLayout
) -> None:
    config = _experiment(cluster.root, motion_small)
    storage = cluster.root / "shared" / "storage"
    log = (cluster.root / "driver.log").open("w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "evl_platform.cli", "train", str(config), "--num-workers=2",
         f"--address={cluster.address}"],
        env=cluster.env, cwd=cluster.root, stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while (registered := _registered_step(storage)) is None:
            assert driver.poll() is None, (cluster.root / "driver.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        assert len(cluster.worker_nodes()) == 2  # one worker on each node
        cluster.kill_node("second")
        assert not list(storage.glob("*/checkpoint_00000040")), "finished before the kill"
        cluster.start_node("third")  # the replacement an autoscaler would start
        assert driver.wait(timeout=300) == 0, (cluster.root / "driver.log").read_text()
    finally:
        driver.kill()
        log.close()
    output = (cluster.root / "driver.log").read_text()
    # The driver took the cluster's store and storage from the head node's environment.
    tracking_uri = cluster.head_env["MLFLOW_TRACKING_URI"]
    assert f"using the cluster's MLFLOW_TRACKING_URI={tracking_uri}" in output
    restored = [int(x.split("restored step ")[1].split()[0]) for x in output.splitlines()
                if "restored step " in x]  # fmt: skip
    assert restored and restored[0] >= registered > 0, output  # not from scratch

    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, names.TRAIN_LOSS)
    assert sorted(m.step for m in history) == list(range(4, 41, 4))  # no gap, no repeat
    assert [m.step for m in client.get_metric_history(run.info.run_id, names.VAL_ACC1)] == [40]
    assert list(storage.glob("*/checkpoint_00000040/state.pt"))

    # `report --address` finds the cluster's store through the head node as well.
    report = cluster.evl("report", "--out", "report", f"--address={cluster.address}")
    assert report.returncode == 0, report.stdout + report.stderr
    assert run.info.run_name in (cluster.root / "report" / "README.md").read_text()


@pytest.fixture()
def tracking_server(tmp_path: Path) -> Iterator[str]:
    """A real ``mlflow server`` on loopback: SQLite backend, artifacts served from a local
    directory; stopped (with its workers) at the end."""
    port = _free_ports(1)[0]
    tag = uuid.uuid4().hex
    command = [
        MLFLOW, "server", "--host=127.0.0.1", f"--port={port}", "--workers=1",
        f"--backend-store-uri=sqlite:///{tmp_path}/server.db",
        f"--artifacts-destination={tmp_path / 'artifacts'}",
    ]  # fmt: skip
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        command,
        env=os.environ | {"EVL_TEST_SERVER": tag},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "mlflow server not up in 90 s"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.3)
        yield uri
    finally:
        server.terminate()
        log.close()
        assert _kill_all(f"EVL_TEST_SERVER={tag}") == []


@pytest.mark.usefixtures("ray_local")
def test_train_records_into_a_tracking_server(
    tmp_path: Path, tracking_server: str, motion_small: SyntheticLayout
) -> None:
    config = _experiment(tmp_path, motion_small, num_steps=8, eval_every=8, checkpoint_every=8)
    code = main(
        ["train", str(config), "--tracking-uri", tracking_server,
         "--storage-path", str(tmp_path / "storage")]
    )  # fmt: skip
    assert code == 0

    client = MlflowClient(tracking_server)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the server
    assert [m.step for m in client.get_metric_history(run.info.run_id, names.VAL_ACC1)] == [8]
    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert listed >= {names.ARTIFACT_CONFIG, names.ARTIFACT_SCORES, names.ARTIFACT_WEIGHTS}
    fetched = Path(client.download_artifacts(run.info.run_id, names.ARTIFACT_CONFIG, tmp_path))
    assert fetched.read_text() == config_text(tmp_path, run.info.run_name)
    # The files really are in the server's artifact store, not next to the client.
    # (the run's MLflow model under model/ carries a copy of its own)
    root = tmp_path / "artifacts"  # <experiment>/<run id>/artifacts/config.yaml
    stored = [p for p in root.rglob(names.ARTIFACT_CONFIG) if len(p.relative_to(root).parts) == 4]
    assert [p.parent.parent.name for p in stored] == [run.info.run_id]

    assert (
        main(["report", "--out", str(tmp_path / "report"), "--tracking-uri", tracking_server]) == 0
    )
    assert run.info.run_name in (tmp_path / "report" / "README.md").read_text()


def config_text(tmp_path: Path, run_name: str) -> str:
    """The resolved config the launcher wrote next to the run's checkpoints."""
    return (tmp_path / "storage" / run_name / names.ARTIFACT_CONFIG).read_text()


@pytest.mark.parametrize(
    ("location", "directory"),
    [
        ("s3://bucket/ray", None),
        ("gs://bucket/ray", None),
        ("http://10.0.0.5:5000", None),
        ("sqlite:////srv/shared/mlflow.db?timeout=60", Path("/srv/shared")),
        ("file:///srv/shared/mlruns", Path("/srv/shared/mlruns")),
        ("/srv/shared/storage", Path("/srv/shared/storage")),
    ],
)
def test_only_local_locations_are_probed(location: str, directory: Path | None) -> None:
    assert local_path(location) == directory


def test_the_filesystem_type_comes_from_the_longest_mount_point(tmp_path: Path) -> None:
    assert filesystem_type(Path("/proc/self")) == "proc"
    assert filesystem_type(tmp_path) not in NETWORK_FILESYSTEMS  # a local temporary directory


@pytest.mark.usefixtures("ray_local")
def test_one_local_node_accepts_any_local_path(tmp_path: Path) -> None:
    check_shared({"--storage-path": str(tmp_path / "storage")})
    assert not (tmp_path / "storage").exists()  # nothing probed on a single machine


@pytest.mark.parametrize(("name", "workers"), [("cluster.yaml", 8), ("cluster.local.yaml", 2)])
def test_the_launcher_config_on_the_head_says_how_many_workers_may_join(
    tmp_path: Path, name: str, workers: int
) -> None:
    """``ray up`` leaves its prepared config on the head; the local provider lists its
    machines instead of node types, and Ray's preparation turns them into one."""
    from ray.autoscaler._private.util import prepare_config

    config = yaml.safe_load((Path(__file__).parents[1] / name).read_text())
    if config["provider"]["type"] == "local":
        config = prepare_config(config)
        assert len(config["provider"]["worker_ips"]) == workers
    (tmp_path / "bootstrap.yaml").write_text(yaml.safe_dump(config))
    assert _launcher_max_workers(tmp_path / "bootstrap.yaml") == workers
    assert _launcher_max_workers(tmp_path / "missing.yaml") == 0

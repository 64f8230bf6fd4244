"""The pack memory plan: each member's own training state summed, the largest member's
activations (members step one after another), the shared features and backbone; packs grown
while their summed estimate fits a worker's memory, measured on a worker where one exists;
and sweep concurrency from what the cluster can grow to, not what is up at the start."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from evl_platform.config import ExperimentConfig, apply_overrides
from evl_platform.config.schema import BackboneConfig, DataConfig, DecoderConfig, ModelConfig
from evl_platform.runtime import capacity
from evl_platform.runtime.capacity import NodeType, host_memory, launcher_node_types, max_resources
from evl_platform.sweep import packs
from evl_platform.sweep.memory import FLOAT32, STATE_COPIES, model_shape
from evl_platform.sweep.packs import pack_memory_bytes, pack_todo, planned_worker_memory
from evl_platform.sweep.plan import Trial
from evl_platform.sweep.runs import TrialTodo
from evl_platform.sweep.trials import default_concurrency

ROOT = Path(__file__).parents[1]


def _depth(layers: int, *, backbone: str = "ViT-B-16") -> ExperimentConfig:
    cfg = ExperimentConfig(
        model=ModelConfig(
            backbone=BackboneConfig(name=backbone),
            decoder=DecoderConfig(num_layers=layers),
        ),
        data=DataConfig(num_classes=5, num_frames=4),
    )
    return apply_overrides(cfg, {"train.batch_size": 4})


def _trial(cfg: ExperimentConfig, layers: int) -> TrialTodo:
    key = f"depth{layers}/k400/seed0"
    return TrialTodo(Trial(key, f"depth{layers}", "k400", 0, "x.yaml", (), config=cfg))


def test_a_pack_of_depths_4_to_12_is_sized_by_its_members_sum() -> None:
    cfgs = [_depth(layers) for layers in range(4, 13)]
    estimate = pack_memory_bytes(cfgs, num_workers=1, device_type="cpu")
    params = [model_shape(c).trainable for c in cfgs]
    assert estimate.member_state == sum(params) * FLOAT32 * STATE_COPIES
    assert estimate.member_state > len(cfgs) * params[0] * FLOAT32 * STATE_COPIES * 1.5
    assert estimate.total == sum(estimate.parts().values()) - estimate.total


def test_activations_are_the_largest_members_not_their_sum() -> None:
    deep = pack_memory_bytes([_depth(12)], num_workers=1, device_type="cpu")
    mixed = pack_memory_bytes([_depth(4), _depth(12), _depth(12)], num_workers=1, device_type="cpu")
    assert mixed.activations == deep.activations
    assert mixed.features == deep.features and mixed.backbone_weights == deep.backbone_weights
    shallow = pack_memory_bytes([_depth(4)], num_workers=1, device_type="cpu")
    assert shallow.activations < deep.activations


def test_packs_grow_while_the_running_sum_fits() -> None:
    """A worker that fits depth 4 x 5 but not depths 4..8 together: the depth-ordered trials
    split where their summed estimate passes the budget (not at the first member x count)."""
    todo = [_trial(_depth(layers), layers) for layers in range(4, 9)]
    first_times_five = pack_memory_bytes([_depth(4)] * 5, num_workers=1, device_type="cpu").total
    memory = math.ceil(first_times_five / packs.MEMORY_SHARE)
    packing = pack_todo(
        todo, enabled=True, pack_size=None, use_gpu=False, num_workers=1, memory=memory
    )
    sizes = [len(p.trials) for p in packing.packs]
    assert sum(sizes) == 5 and len(sizes) > 1
    for pack in packing.packs:
        cfgs = [t.cfg for t in pack.trials]
        total = pack_memory_bytes(cfgs, num_workers=1, device_type="cpu").total
        assert total <= memory * packs.MEMORY_SHARE
    assert "memory plan: " in packing.memory and "(given)" in packing.memory


@pytest.mark.usefixtures("ray_local")
def test_a_cpu_trials_memory_is_measured_on_a_worker() -> None:
    memory, source = planned_worker_memory(use_gpu=False, cpus_per_worker=1)
    assert source == "measured on a worker"
    assert memory == pytest.approx(host_memory(), rel=0.25)  # same machine, moments apart


def test_a_gpu_trial_without_a_gpu_up_is_sized_by_the_node_type(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CPU head with no GPU up: the GPU node type the autoscaler starts says 24 GiB
    (g5.12xlarge's A10G), not a fixed 32 GiB."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = launcher_node_types(config)
    monkeypatch.setattr(capacity, "cluster_node_types", lambda: (types, 10))
    import ray

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 8.0})
    memory, source = capacity.worker_memory(use_gpu=True, cpus_per_worker=1)
    assert memory == 24 * 1024**3 and source == "the node types' GPU memory"


def _plan(num_workers: int, use_gpu: bool) -> SimpleNamespace:
    resources = SimpleNamespace(num_workers=num_workers, use_gpu=use_gpu, cpus_per_worker=1)
    return SimpleNamespace(ablation=SimpleNamespace(spec=SimpleNamespace(resources=resources)))


def test_concurrency_counts_the_gpus_the_autoscaler_can_start() -> None:
    gpu_nodes = NodeType("gpu", {"CPU": 96, "GPU": 8}, max_workers=4)
    head = NodeType("head", {"CPU": 8}, head=True)
    grown = max_resources([head, gpu_nodes], current={"CPU": 8.0, "memory": 1e10})
    assert grown["GPU"] == 32 and grown["CPU"] == 8 + 4 * 96
    assert default_concurrency(_plan(8, True), grown) == 4
    capped = max_resources([head, gpu_nodes], current={"CPU": 8.0}, max_workers=2)
    assert default_concurrency(_plan(8, True), capped) == 2


@pytest.mark.usefixtures("ray_local")
def test_a_launched_cluster_with_no_gpu_up_yet_runs_trials_side_by_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cluster.yaml's GPU workers start at zero: the sweep's concurrency comes from its 8
    g5.12xlarge (32 GPUs), 4 trials of 8 workers, read from the launcher's config on the
    head (this process runs on the local Ray's head)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ray_bootstrap_config.yaml").write_text((ROOT / "cluster.yaml").read_text())
    assert default_concurrency(_plan(8, True)) == 4


def test_peak_rss_reads_a_processs_high_water_mark() -> None:
    """A process that touched 256 MiB and freed it reports that peak, not its RSS now."""
    import subprocess
    import sys

    from evl_platform.bench.sweep import peak_rss

    code = "import sys; b = b'x' * (256 << 20); del b; print('freed', flush=True); sys.stdin.read()"
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "freed"
        assert peak_rss(child.pid) >= 256 << 20
    finally:
        child.communicate("")
    assert peak_rss(child.pid) == 0  # ended

"""``bench step`` and ``bench infer`` on the micro backbone: results, memory, MLflow, CLI.

Timings are only compared where the gap is large (an open backbone's backward against none),
and then on each side's fastest step, which other processes on the machine cannot shorten.
"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from evl_platform.bench.common import (
    GIB,
    LiveBytes,
    log_benchmark,
    saved_tensor_bytes,
    search_max_batch,
    storage_keys,
    with_backbone,
)
from evl_platform.bench.infer import CPU_THROUGHPUT_BATCH, bench_infer
from evl_platform.bench.step import (
    COMBINATIONS,
    StepBench,
    create_bench_model,
    find_max_batch,
    make_step,
    run_combination,
)
from evl_platform.cli import main
from evl_platform.config import ExperimentConfig, load_config
from evl_platform.models import model_info

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "local_motion_tiny.yaml"
OVERRIDES = ["model.backbone.name=micro-vit", "model.decoder.num_layers=2"]
CLI_ARGS = [str(EXPERIMENT), *(arg for o in OVERRIDES for arg in ("--set", o))]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cfg() -> ExperimentConfig:
    return load_config(EXPERIMENT, overrides=OVERRIDES)


@pytest.fixture(scope="module")
def step(cfg: ExperimentConfig) -> StepBench:
    from evl_platform.bench.step import bench_step

    return bench_step(
        cfg, batch=4, iters=5, warmup=1, device="cpu", threads=1, progress=lambda _: None
    )


def _variant(cfg: ExperimentConfig, backbone: str) -> ExperimentConfig:
    return with_backbone(cfg, device=CPU, mode="finetune" if backbone == "open" else "frozen")[0]


def _store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)  # run artifacts go to ./mlruns
    return f"sqlite:///{tmp_path}/mlflow.db"


def _only_run(uri: str) -> tuple[MlflowClient, Run]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("benchmarks")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_step_runs_the_four_combinations(step: StepBench) -> None:
    assert [(r.backbone, r.head) for r in step.results] == list(COMBINATIONS)
    for r in step.results:
        assert r.chunks == 1 and len(r.step_times_s) == 5 and r.step_time_s > 0
        assert r.max_batch.estimated and r.max_batch.value >= 1
    table = step.render()
    assert "CLIP (frozen)" in table and "global average pool" in table and "EVL" in table
    assert "open/frozen step time" in table and "CPU estimate" in table


@pytest.mark.parametrize("backbone", ["frozen", "open"])
@pytest.mark.parametrize("head", ["gap", "evl"])
def test_frozen_backbone_never_gets_gradients(
    cfg: ExperimentConfig, step: StepBench, backbone: str, head: str
) -> None:
    variant = _variant(cfg, backbone)
    model = create_bench_model(variant, head).train()
    make_step(model, variant, batch=2, micro=1, device=CPU)()
    grads = [p.grad is not None for p in model.backbone.parameters()]
    assert not any(grads) if backbone == "frozen" else any(grads)
    assert (step.result(backbone, head).backbone_grads == 0) == (backbone == "frozen")


def test_open_evl_step_is_slower_than_frozen(step: StepBench) -> None:
    frozen, opened = step.result("frozen", "evl"), step.result("open", "evl")
    assert min(opened.step_times_s) > min(frozen.step_times_s)
    assert step.metrics()["frozen_open_ratio/evl"] == opened.step_time_s / frozen.step_time_s


def test_memory_estimate_grows_with_batch_and_with_an_open_backbone(step: StepBench) -> None:
    for r in step.results:
        assert r.max_batch.bytes_at(2) > r.max_batch.bytes_at(1) > 0
    for head in ("gap", "evl"):
        frozen, opened = step.result("frozen", head), step.result("open", head)
        assert opened.max_batch.per_sample_bytes > frozen.max_batch.per_sample_bytes
        assert opened.max_batch.bytes_at(4) > frozen.max_batch.bytes_at(4)


def test_max_batch_estimate_is_the_largest_under_the_budget(cfg: ExperimentConfig) -> None:
    variant = _variant(cfg, "open")
    model = create_bench_model(variant, "evl").train()
    big = find_max_batch(model, variant, device=CPU, memory_gib=16, cap=1024)
    budget = big.bytes_at(10.5) / GIB
    small = find_max_batch(model, variant, device=CPU, memory_gib=budget, cap=1024)
    assert small.value == 10 and not small.capped
    assert small.bytes_at(small.value) <= budget * GIB < small.bytes_at(small.value + 1)


def test_batch_beyond_the_largest_runs_with_gradient_accumulation(cfg: ExperimentConfig) -> None:
    variant = _variant(cfg, "open")
    model = create_bench_model(variant, "evl").train()
    line = find_max_batch(model, variant, device=CPU, memory_gib=16, cap=1024)
    result = run_combination(
        variant,
        head="evl",
        batch=6,
        iters=1,
        warmup=0,
        device=CPU,
        memory_gib=line.bytes_at(2.5) / GIB,
        cap=1024,
    )
    assert result.max_batch.value == 2 and result.chunks == 3 and result.backbone_grads > 0


def test_search_max_batch_finds_the_edge() -> None:
    def peak(batch: int) -> float | None:  # 1 GiB fixed + 0.25 GiB per sample, OOM above 37
        return None if batch > 37 else GIB * (1 + batch / 4)

    assert search_max_batch(peak, budget_gib=100, cap=1024).value == 37
    limited = search_max_batch(peak, budget_gib=4, cap=1024)
    assert limited.value == 12 and not limited.estimated
    assert limited.per_sample_bytes == pytest.approx(GIB / 4)
    capped = search_max_batch(peak, budget_gib=100, cap=20)
    assert capped.value == 20 and capped.capped and capped.label == ">=20"


def test_live_bytes_tracks_the_peak_of_live_tensors() -> None:
    layers = torch.nn.Sequential(*(torch.nn.Linear(100, 100) for _ in range(5)))
    with torch.inference_mode(), LiveBytes(exclude=storage_keys(layers)) as live:
        layers(torch.zeros(10, 100))
    assert live.peak == 3 * 10 * 100 * 4  # input, previous and current activations
    assert live.live == 0


class _Sigmoid(torch.nn.Module):
    """A sigmoid that keeps a weak reference to its output (which autograd saves)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.sigmoid(x)
        self.output = weakref.ref(out)
        return out


def test_saved_tensor_count_frees_the_graph() -> None:
    layers = torch.nn.Sequential(torch.nn.Linear(100, 100), _Sigmoid())
    saved = saved_tensor_bytes(layers, torch.zeros(10, 100))
    assert saved == 2 * 10 * 100 * 4  # the input and the sigmoid's output
    gc.collect()
    assert layers[1].output() is None  # no reference cycle through the saved output


def test_step_is_logged_in_the_benchmarks_experiment(
    step: StepBench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = _store(tmp_path, monkeypatch)
    run_id = log_benchmark(step, bench="step", tracking_uri=uri)
    client, run = _only_run(uri)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["kind"] == "benchmark" and tags["bench"] == "step"
    assert tags["profile"] == "local" and tags["dataset"] == "synthetic-motion"
    assert tags["backbone"] == "micro-vit" and tags["git_commit"] and "cores" in tags["device"]
    metrics = run.data.metrics
    for r in step.results:
        assert metrics[f"step_time_s/{r.key}"] == pytest.approx(r.step_time_s)
        assert metrics[f"max_batch/{r.key}"] == r.max_batch.value
    assert metrics["frozen_open_ratio/evl"] == pytest.approx(step.ratio("evl"))
    params = run.data.params
    assert params["model.backbone.name"] == "micro-vit" and params["bench.batch"] == "4"
    assert [a.path for a in client.list_artifacts(run_id)] == ["bench_step.txt"]


def test_infer_reports_latency_throughput_and_model_info_gflops(
    cfg: ExperimentConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = bench_infer(cfg, iters=3, warmup=1, device="cpu", progress=lambda _: None)
    assert result.latency_ms > 0 and result.throughput_videos_per_s > 0
    assert result.gflops_per_video == model_info(cfg)["gflops_total"]
    assert result.throughput_batch == CPU_THROUGHPUT_BATCH and result.views == 3
    assert result.max_batch.estimated and result.max_batch.per_sample_bytes > 0
    assert "CPU default" in result.render()
    assert result.to_dict()["paper"] == {  # Table 3, EVL ViT-B/16 (8)
        "gflops_per_video": 454.0,
        "latency_ms": 102.88,
        "throughput_videos_per_s": 25.53,
    }
    uri = _store(tmp_path, monkeypatch)
    log_benchmark(result, bench="infer", tracking_uri=uri)
    _, run = _only_run(uri)
    assert run.data.tags["bench"] == "infer" and run.data.tags["kind"] == "benchmark"
    metrics = run.data.metrics
    assert metrics["latency_ms"] == pytest.approx(result.latency_ms)
    assert metrics["throughput_videos_per_s"] == pytest.approx(result.throughput_videos_per_s)
    assert metrics["gflops_per_video"] == pytest.approx(result.gflops_per_video)
    assert metrics["max_batch"] == result.max_batch.value


def test_cli_bench_step_json_is_tracked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    uri = _store(tmp_path, monkeypatch)
    args = ["--batch", "2", "--iters", "1", "--device", "cpu", "--threads", "1", "--json"]
    assert main(["bench", "step", *CLI_ARGS, *args, "--tracking-uri", uri]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["batch"] == 2 and len(out["results"]) == 4 and out["run_id"]
    assert out["device_name"].endswith("1 torch thread(s)")
    assert out["frozen_open_ratio"]["evl"] > 0 and "CLIP (open) + EVL" in captured.err
    paper = [(r["paper_max_batch"], r["paper_step_time_s"]) for r in out["results"]]
    assert paper == [("inf.", 0.57), ("8", 3.39), ("64", 1.03), ("8", 4.41)]  # Table 5
    assert out["paper_frozen_open_ratio"] == {"gap": 3.39 / 0.57, "evl": 4.41 / 1.03}
    assert _only_run(uri)[1].info.run_id == out["run_id"]


def test_cli_bench_infer_text_without_tracking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["--batch", "2", "--iters", "1", "--device", "cpu", "--no-track"]
    assert main(["bench", "infer", *CLI_ARGS, *args]) == 0
    out = capsys.readouterr().out
    assert "latency ms" in out and "batch 2 videos (--batch)" in out and "GFLOPs/video" in out
    assert not (tmp_path / "mlflow.db").exists() and "mlflow run" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_a_gpu_is_an_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "infer", *CLI_ARGS, "--device", "cuda", "--no-track"]) == 2
    assert "no CUDA device" in capsys.readouterr().err

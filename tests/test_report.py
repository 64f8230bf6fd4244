"""``evl-platform report`` on a real MLflow store (sqlite) seeded through the MLflow client
with runs of known metrics, tagged as the sweep runner, the ensemble stage, the trainer and
the benchmarks tag them: exact cells in the CSV and Markdown, "not run", mean ± std over
seeds, the ensemble table, findings, determinism, and what bad input gives."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest
from browser import check_page
from mlflow.tracking import MlflowClient

from evl_platform.cli import main
from evl_platform.report.paper import paper_table, paper_tables
from evl_platform.tracking import names

ROOT = Path(__file__).resolve().parents[1]


class Store:
    """A sqlite MLflow store and the runs seeded into it."""

    def __init__(self, path: Path) -> None:
        self.uri = f"sqlite:///{path}/mlflow.db"
        self.client = MlflowClient(self.uri)
        self.path = path

    def experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found else self.client.create_experiment(name)

    def run(
        self,
        experiment: str,
        name: str,
        *,
        tags: dict[str, str],
        metrics: dict[str, float],
        params: dict[str, str] | None = None,
        parent: str | None = None,
        status: str = "FINISHED",
    ) -> str:
        tags = {names.TAG_PROFILE: "local", **tags}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment(experiment), run_name=name, tags=tags)
        for key, value in (params or {}).items():
            self.client.log_param(run.info.run_id, key, value)
        for key, value in metrics.items():
            self.client.log_metric(run.info.run_id, key, value, step=0)
        self.client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    def sweep(self, ablation: str) -> str:
        """A sweep parent run holding the real ablation file as its artifact."""
        run_id = self.run(ablation, f"{ablation}-sweep", tags={names.TAG_KIND: "sweep"}, metrics={})
        copy = self.path / ablation / names.ARTIFACT_ABLATION
        copy.parent.mkdir()
        copy.write_text((ROOT / "ablations" / f"{ablation}.yaml").read_text())
        self.client.log_artifact(run_id, str(copy))
        return run_id

    def trial(self, parent: str, row: str, key: str, seed: int, acc1: float | None) -> str:
        variant = row.lower().replace(" ", "+") or "none"
        dataset = {"ssv2": "synthetic-motion", "k400": "synthetic-appearance"}[key]
        return self.run(
            "temporal_modules",
            f"trial-{variant}-{key}-{seed}",
            tags={
                names.TAG_KIND: "train",
                names.TAG_ABLATION: "temporal_modules",
                names.TAG_PAPER_TABLE: "8a",
                names.TAG_PAPER_ROW: row,
                names.TAG_VARIANT: variant,
                names.TAG_DATASET_KEY: key,
                names.TAG_DATASET: dataset,
                names.TAG_SEED: str(seed),
                names.TAG_TRIAL: f"{variant}/{key}/seed{seed}",
                names.TAG_BACKBONE: "tiny-vit",
            },
            metrics={} if acc1 is None else {names.VAL_ACC1: acc1, names.DEVICE_HOURS: 0.01},
            params={"model.arch": "evl", "model.backbone.mode": "frozen"},
            parent=parent,
        )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """Table 8a trials (two seeds of "- - -" on SSv2, one of the others, a failed one, one
    without its metric), a sweep ensemble, a plain training run and a bench infer run."""
    store = Store(tmp_path)
    parent = store.sweep("temporal_modules")
    store.trial(parent, "- - -", "ssv2", 0, 50.0)
    store.trial(parent, "- - -", "ssv2", 1, 52.0)
    store.trial(parent, "T-Conv T-PE T-CA", "ssv2", 0, 81.0)
    store.trial(parent, "- - -", "k400", 0, 99.0)
    store.trial(parent, "T-Conv T-PE T-CA", "k400", 0, 99.5)
    store.trial(parent, "T-Conv", "k400", 0, None)  # finished without val/acc1
    failed = store.trial(parent, "T-PE", "ssv2", 0, 77.0)
    store.client.set_terminated(failed, "FAILED")

    ensembles = store.sweep("ensemble")
    run_id = store.run(
        "ensemble",
        "ensemble-cnn3d+evl-k400-seed0",
        tags={
            names.TAG_KIND: names.KIND_ENSEMBLE,
            names.TAG_ABLATION: "ensemble",
            names.TAG_PAPER_TABLE: "10+11",
            names.TAG_PAPER_ROW: "cnn3d + evl",
            names.TAG_DATASET_KEY: "k400",
            names.TAG_DATASET: "synthetic-appearance",
        },
        metrics={
            names.ENSEMBLE_ACC1_A: 90.0,
            names.ENSEMBLE_ACC1_B: 95.0,
            names.ENSEMBLE_ACC1_BEST: 97.5,
            names.ENSEMBLE_GAIN: 7.5,
            names.ENSEMBLE_ALPHA: 0.3,
        },
        parent=ensembles,
    )
    for step, acc in ((0, 95.0), (30, 97.5), (100, 90.0)):
        store.client.log_metric(run_id, names.ENSEMBLE_ACC1, acc, step=step)
    store.run(
        "k400_vitb16_16f",
        "plain-16f",
        tags={names.TAG_KIND: "train", names.TAG_DATASET: "synthetic-appearance"},
        metrics={names.VAL_ACC1: 97.0, names.MODEL_GFLOPS: 0.5, names.MODEL_NEW_PARAMS: 2.5e5},
        params={"name": "k400_vitb16_16f", "data.num_frames": "16"},
    )
    store.run(
        names.BENCHMARK_EXPERIMENT,
        "bench-infer",
        tags={names.TAG_KIND: "benchmark", "bench": "infer", "device": "cpu (test)"},
        metrics={"latency_ms": 12.5, "throughput_videos_per_s": 80.0, "gflops_per_video": 0.5},
        params={"name": "local_motion_tiny"},
    )
    return store


def _report(store: Store, out: Path, *extra: str) -> int:
    return main(["report", "--out", str(out), "--tracking-uri", store.uri, *extra])


def _csv(out: Path, table: str) -> pd.DataFrame:
    return pd.read_csv(out / "tables" / f"table_{table}.csv", dtype=str, keep_default_na=False)


def test_report_cells_in_csv_and_markdown(store: Store, tmp_path: Path, capsys) -> None:
    out = tmp_path / "reports"
    assert _report(store, out) == 0
    table = _csv(out, "8a").set_index("row")
    none, every = table.loc["- - -"], table.loc["T-Conv T-PE T-CA"]
    # two seeds: mean ± sample std, n and the paper's value beside it
    assert (none["SSv2"], none["SSv2_std"], none["SSv2_n"]) == ("51", "1.4142", "2")
    assert (none["SSv2_paper"], none["SSv2_diff"]) == ("47.2", "3.8")
    assert (every["SSv2"], every["SSv2_n"], every["K-400"]) == ("81", "1", "99.5")
    # no run, a FAILED run, a run without the metric: not run
    for row, column in (("T-CA", "SSv2"), ("T-PE", "SSv2"), ("T-Conv", "K-400")):
        assert table.loc[row, column] == "not run" and table.loc[row, f"{column}_n"] == "0"
    assert list(table.index[:8]) == [r.id for r in paper_table("8a").rows]

    readme = (out / "README.md").read_text()
    assert "| 51.0 ± 1.4 (n=2) | 47.2 | +3.8 |" in readme
    assert "K-400 measured on synthetic-appearance (synthetic stand-in)" in readme
    assert "as the paper found" in readme and "+30.0 points on SSv2" in readme
    assert "1 FAILED" in readme and "has no val/acc1" in readme

    ensemble = _csv(out, "10").set_index("row")
    assert ensemble.loc["cnn3d + evl", "acc1_ensemble"] == "97.5"
    assert ensemble.loc["cnn3d + evl", "gain"] == "7.5"
    assert ensemble.loc["cnn3d + evl", "alpha"] == "0.3"
    assert ensemble.loc["uniformer_b16 + evl", "gain_paper"] == "2.5"
    assert ensemble.loc["uniformer_b16 + evl", "acc1_ensemble"] == "not run"

    main_table = _csv(out, "1").set_index("row")  # a plain run of a paper experiment file
    assert (main_table.loc["16", "K-400"], main_table.loc["16", "gflops"]) == ("97", "0.5")
    speed = _csv(out, "3")
    [bench] = speed[speed["label"].str.contains("cpu \\(test\\)")].to_dict("records")
    assert (bench["latency_ms"], bench["latency_ms_paper"]) == ("12.5", "102.88")
    runs = _csv(out, "runs")
    assert len(runs) == 7 and set(runs["acc1"]) >= {"50", "52", ""}

    html = (out / "index.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # GFLOPs, device-hours, ensemble α
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert "finding:" in capsys.readouterr().out


def test_report_is_deterministic_and_keeps_other_files(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "reports"
    (out / "tables").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "tables" / "mine.csv").write_text("mine")

    def digest() -> dict[str, str]:
        return {
            str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*"))
            if p.is_file()
        }

    assert _report(store, out, "--format", "html,md,csv,tex") == 0
    first = digest()
    assert "tex/table_8a.tex" in first and "figures/ensemble_alpha.png" in first
    assert _report(store, out, "--format", "html,md,csv,tex") == 0
    assert digest() == first
    assert _report(store, out, "--format", "md") == 0  # only what the report wrote goes
    after = digest()
    assert (
        not (out / "index.html").exists()
        and not (out / "tex").exists()
        or not any((out / "tex").iterdir())
    )
    assert after["notes.txt"] == first["notes.txt"] and "tables/mine.csv" in after
    assert after["README.md"] == first["README.md"]


def test_empty_store_and_unknown_experiment_say_what_is_missing(tmp_path: Path, capsys) -> None:
    empty = Store(tmp_path)
    out = tmp_path / "empty"
    assert _report(empty, out) == 1
    readme = (out / "README.md").read_text()
    assert "no finished run of profile 'local'" in readme
    assert "| not run | 61.0 |" in readme  # the paper's numbers are still there
    assert "missing: no finished run" in capsys.readouterr().err

    empty.run("other", "r", tags={names.TAG_KIND: "train"}, metrics={names.VAL_ACC1: 1.0})
    assert _report(empty, out, "--experiment", "nosuch") == 1
    assert "experiment 'nosuch' is not in" in (out / "README.md").read_text()
    assert "(it has: Default, other)" in capsys.readouterr().err


def test_bad_format_is_one_clear_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--out", str(tmp_path), "--format", "html,pdf"])
    assert exit_info.value.code == 2
    assert "'html,pdf': choose one or more of html,md,csv,tex" in capsys.readouterr().err


def test_index_html_renders_in_headless_chromium(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "reports"
    assert _report(store, out) == 0
    page = check_page(out / "index.html", tmp_path / "screenshot.png")
    titles = [t.title for t in paper_tables().values()]
    assert [h for h in page.headings if h.startswith("Table ")] == titles
    assert {"Findings", "Missing", "Training runs", "Figures"} <= set(page.headings)
    assert page.table_count == len(titles) + 1
    assert page.images == 3 and page.broken_images == []
    assert page.console_errors == []
    assert (tmp_path / "screenshot.png").stat().st_size > 50_000


def test_unreachable_tracking_server_is_one_error(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast: nothing listens
    out = tmp_path / "reports"
    code = main(["report", "--out", str(out), "--tracking-uri", "http://127.0.0.1:9"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: report to {out}: ") and "Traceback" not in err
    assert not out.exists()


def test_an_early_stopped_search_sample_is_not_missing_its_per_class_file(tmp_path: Path) -> None:
    """ASHA stops a sample before its last evaluation, which writes the per-class file: the
    report must not list it as missing (a finished run without one still is)."""
    from evl_platform.report.collect import collect

    store = Store(tmp_path)
    parent = store.sweep("temporal_modules")
    plain = store.trial(parent, "- - -", "ssv2", 0, 50.0)
    stopped = store.trial(parent, "T-Conv", "ssv2", 0, 60.0)
    store.client.set_tag(stopped, names.TAG_EARLY_STOPPED, "true")
    missing = collect(store.uri).missing
    assert f"run {plain} has no {names.ARTIFACT_PER_CLASS} artifact" in missing
    assert not [line for line in missing if stopped in line]

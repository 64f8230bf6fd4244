"""A batch of two ablation files on real Ray Tune + Ray Train with a real MLflow store, killed
with SIGKILL mid-way and finished with ``--resume``.

This is the suite's one kill-and-resume of a sweep (each costs a driver, Tune and several
trial starts): the tiny tables of test_batch.py plus a ``pe`` row in ``tab_b``, so that
``tab_b``'s ``d2`` is identical to ``tab_a``'s ``all`` and the four unique trials run as two
packs, the first across the tables (``tab_a:all`` + ``tab_b:d1``), then ``tab_b:none`` +
``tab_b:pe``. ``evl-platform sweep`` is killed once the first pack has finished and the second
has logged a step. ``--resume`` must reopen both parents, leave the finished pack alone,
continue the interrupted one in its own runs, and end with exactly one finished run per
unique trial; the deduplicated run must fill its cell in both tables' results, in the report
(all experiments, or ``--experiment`` of the table that holds only the copy) and in an MLflow
search by table and row.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from test_batch import write_batch

from evl_platform.cli import main
from evl_platform.data.synth import SyntheticLayout
from evl_platform.sweep.batch import plan_batch
from evl_platform.sweep.batch_runner import run_batch
from evl_platform.sweep.runner import SweepOptions
from evl_platform.tracking import names

pytestmark = pytest.mark.usefixtures("ray_local")

PE = {"model.decoder.temporal_conv": False, "model.decoder.temporal_pos_embed": True}
UNIQUE = ["all/ssv2/seed0", "d1/ssv2/seed0", "none/ssv2/seed0", "pe/ssv2/seed0"]


def _runs(client: MlflowClient, filter_string: str = "") -> list:
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, filter_string) if ids else []


def _kind(client: MlflowClient, kind: str) -> list:
    return [r for r in _runs(client) if r.data.tags.get(names.TAG_KIND) == kind]


def _steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, names.TRAIN_LOSS))


def _mid_second_pack(client: MlflowClient) -> bool:
    """The first pack's two runs finished, the second pack's two running with a logged step."""
    runs = _kind(client, names.KIND_TRAIN)
    done = [r for r in runs if r.info.status == names.STATUS_FINISHED]
    running = [r for r in runs if r.info.status == names.STATUS_RUNNING]
    return (
        len(done) == 2 and len(running) == 2 and all(_steps(client, r.info.run_id) for r in running)
    )


def test_a_killed_batch_resumes_to_one_run_per_unique_trial_filling_every_cell(
    tmp_path: Path, motion_small: SyntheticLayout
) -> None:
    import ray

    tab_a, tab_b = write_batch(tmp_path, motion_small, {"pe": PE}, num_steps=8, eval_every=4)
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "storage")
    client = MlflowClient(uri)
    _runs(client)  # create the store's tables before two processes race to
    address = ray.get_runtime_context().gcs_address
    log = tmp_path / "driver.log"
    args = [str(tab_a), str(tab_b), "--max-concurrent", "1", "--tracking-uri", uri]
    driver = subprocess.Popen(
        [sys.executable, "-m", "evl_platform.cli", "sweep", *args, "--storage-path", storage],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=os.environ | {"RAY_ADDRESS": address},
    )
    try:
        deadline = time.monotonic() + 400
        while not _mid_second_pack(client):
            assert driver.poll() is None, f"the batch ended early: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no second pack training within 400 s"
            time.sleep(0.3)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    killed = {r.data.tags[names.TAG_TRIAL]: r for r in _kind(client, names.KIND_TRAIN)}
    finished = {k: r.info.run_id for k, r in killed.items() if r.info.status == "FINISHED"}
    unfinished = {k: r.info.run_id for k, r in killed.items() if r.info.status == "RUNNING"}
    assert sorted(finished) == UNIQUE[:2], log.read_text()[-3000:]  # the pack across tables
    assert sorted(unfinished) == UNIQUE[2:]
    assert len({killed[k].data.tags[names.TAG_PACK] for k in unfinished}) == 1  # one pack
    parents = {r.data.tags[names.TAG_ABLATION]: r for r in _kind(client, names.KIND_SWEEP)}
    assert sorted(parents) == ["tab_a", "tab_b"]
    assert all(r.info.status == names.STATUS_RUNNING for r in parents.values())
    batch_name = parents["tab_a"].data.tags[names.TAG_BATCH]

    options = SweepOptions(
        resume=True, max_concurrent=1, tracking_uri=uri, storage_path=storage, quiet=True
    )
    outcome = run_batch(plan_batch([tab_a, tab_b]), options)

    # one finished run per unique trial, in the same runs: none started again, no step twice
    runs = _kind(client, names.KIND_TRAIN)
    assert sorted(r.data.tags[names.TAG_TRIAL] for r in runs) == UNIQUE  # d2 trained nothing
    assert all(r.info.status == names.STATUS_FINISHED for r in runs)
    ids = {r.data.tags[names.TAG_TRIAL]: r.info.run_id for r in runs}
    assert ids == finished | unfinished
    for run_id in ids.values():
        assert _steps(client, run_id) == list(range(1, 9))  # no gap, no duplicate
    # both tables' parents reopened, finished, in the same batch
    assert outcome.name == batch_name and not outcome.failed
    after = {r.data.tags[names.TAG_ABLATION]: r for r in _kind(client, names.KIND_SWEEP)}
    assert {k: r.info.run_id for k, r in after.items()} == {
        k: r.info.run_id for k, r in parents.items()
    }
    for parent in after.values():
        assert parent.info.status == names.STATUS_FINISHED
        files = {a.path for a in client.list_artifacts(parent.info.run_id)}
        expected = {names.ARTIFACT_ABLATION, names.ARTIFACT_RESULTS_CSV, names.ARTIFACT_RESULTS_MD}
        assert expected <= files
    for run in runs:  # each run under its own table's parent, tagged with its trial
        tags = run.data.tags
        own = "tab_a" if tags[names.TAG_TRIAL] == "all/ssv2/seed0" else "tab_b"
        assert tags["mlflow.parentRunId"] == after[own].info.run_id
        assert tags[names.TAG_ABLATION] == own and tags[names.TAG_DATASET_KEY] == "ssv2"
        assert tags[names.TAG_VARIANT] == tags[names.TAG_TRIAL].split("/")[0]
        assert tags[names.TAG_SEED] == "0" and names.VAL_ACC1 in run.data.metrics
    home = next(r for r in runs if r.data.tags[names.TAG_TRIAL] == "all/ssv2/seed0")
    value = home.data.metrics[names.VAL_ACC1]

    # the sweep's results: the run fills tab_a's "all" and tab_b's "d2"
    tables = {t.experiment: t for t in outcome.tables}
    assert tables["tab_a"].table.cell("all", "ssv2").values == [value]
    assert tables["tab_b"].table.cell("d2", "ssv2").values == [value]
    assert tables["tab_b"].trial_runs["d2/ssv2/seed0"] == home.info.run_id
    frame = pd.read_csv(tables["tab_b"].results_dir / "results.csv").set_index("variant")
    assert list(frame.index) == ["d1", "d2", "none", "pe"] and list(frame["n"]) == [1] * 4
    assert frame.loc["d2", "mean"] == pytest.approx(value, abs=1e-4)

    # MLflow: a search by table and row finds it
    [found] = _runs(client, f"tags.`{names.cell_tag('tab_b', 'ssv2')}` = '2'")
    assert found.info.run_id == home.info.run_id

    # the report: Table 8a's row "all" and Table 8b's row "2" (tab_b is 6a+8b, SSv2 -> 8b),
    # also when only tab_b's experiment is asked for (the run lives in tab_a's)
    for chosen in ([], ["--experiment", "tab_b"]):
        out = tmp_path / f"report{len(chosen)}"
        assert main(["report", "--out", str(out), "--tracking-uri", uri, *chosen]) == 0
        header = f"{batch_name}: 2 ablation files in one sweep (tab_a, tab_b),"
        assert (header in (out / "README.md").read_text()) == (not chosen)
        rows = [("table_8b.csv", "2"), ("table_8b.csv", "pe")]
        if not chosen:
            rows.append(("table_8a.csv", "all"))
        for name, row in rows:
            cells = pd.read_csv(out / "tables" / name, dtype=str).set_index("row").loc[row]
            trial = {"2": "all", "pe": "pe", "all": "all"}[row]
            expected = next(r for r in runs if r.data.tags[names.TAG_VARIANT] == trial)
            assert float(cells["SSv2"]) == pytest.approx(
                expected.data.metrics[names.VAL_ACC1], abs=1e-4
            ), (chosen, name, row)
            assert cells["SSv2_n"] == "1"

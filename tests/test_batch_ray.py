"""A batch of two ablation files on real Ray Tune + Ray Train with a real MLflow store.

The two tiny tables of test_batch.py (``tab_b``'s ``d2`` identical to ``tab_a``'s ``all``;
a pack of ``tab_a:all`` + ``tab_b:d1`` across the tables, then ``tab_b:none`` alone) are run
by ``evl-platform sweep`` in a driver killed with SIGKILL mid-pack, then finished with
``--resume``: the store must hold exactly one run per unique trial, and the deduplicated run
must fill its cell in both tables' results, in the report and in an MLflow search by table
and row.
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


def _runs(client: MlflowClient, filter_string: str = "") -> list:
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, filter_string) if ids else []


def _trained(client: MlflowClient) -> list:
    return [r for r in _runs(client) if r.data.tags.get(names.TAG_KIND) == names.KIND_TRAIN]


def test_a_killed_batch_resumes_to_one_run_per_unique_trial_filling_every_cell(
    tmp_path: Path, motion_small: SyntheticLayout
) -> None:
    import ray

    tab_a, tab_b = write_batch(tmp_path, motion_small, num_steps=8, eval_every=4)
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
    try:  # kill the driver once the pack across the two tables is training
        deadline = time.monotonic() + 300
        while True:
            assert driver.poll() is None, f"the batch ended early: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no pack training within 300 s"
            running = [r for r in _trained(client) if names.TRAIN_LOSS in r.data.metrics]
            if len(running) == 2:
                break
            time.sleep(0.3)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    killed = _trained(client)
    before = {r.data.tags[names.TAG_TRIAL]: r.info.run_id for r in killed}
    assert {"all/ssv2/seed0", "d1/ssv2/seed0"} <= set(before), log.read_text()[-3000:]
    assert any(r.info.status != names.STATUS_FINISHED for r in killed)  # killed mid-batch

    batch = plan_batch([tab_a, tab_b])
    options = SweepOptions(
        resume=True, max_concurrent=1, tracking_uri=uri, storage_path=storage, quiet=True
    )
    outcome = run_batch(batch, options)

    runs = _trained(client)
    assert sorted(r.data.tags[names.TAG_TRIAL] for r in runs) == [
        "all/ssv2/seed0",
        "d1/ssv2/seed0",
        "none/ssv2/seed0",
    ]  # one run per unique trial: tab_b's d2 trained nothing
    assert all(r.info.status == names.STATUS_FINISHED for r in runs)
    home = next(r for r in runs if r.data.tags[names.TAG_TRIAL] == "all/ssv2/seed0")
    ids = {r.data.tags[names.TAG_TRIAL]: r.info.run_id for r in runs}
    assert {k: ids[k] for k in before} == before  # continued in the same runs, none restarted
    value = home.data.metrics[names.VAL_ACC1]
    parents = [r for r in _runs(client) if r.data.tags.get(names.TAG_KIND) == names.KIND_SWEEP]
    assert sorted(r.data.tags[names.TAG_ABLATION] for r in parents) == ["tab_a", "tab_b"]
    assert all(r.info.status == names.STATUS_FINISHED for r in parents) and not outcome.failed

    # the sweep's results: the run fills tab_a's "all" and tab_b's "d2"
    tables = {t.experiment: t for t in outcome.tables}
    assert tables["tab_a"].table.cell("all", "ssv2").values == [value]
    assert tables["tab_b"].table.cell("d2", "ssv2").values == [value]
    assert tables["tab_b"].trial_runs["d2/ssv2/seed0"] == home.info.run_id
    frame = pd.read_csv(tables["tab_b"].results_dir / "results.csv").set_index("variant")
    assert list(frame.index) == ["d1", "d2", "none"] and list(frame["n"]) == [1, 1, 1]
    assert frame.loc["d2", "mean"] == pytest.approx(value, abs=1e-4)

    # MLflow: a search by table and row finds it
    [found] = _runs(client, f"tags.`{names.cell_tag('tab_b', 'ssv2')}` = '2'")
    assert found.info.run_id == home.info.run_id

    # the report: Table 8a's row "all" and Table 8b's row "2" (tab_b is 6a+8b, SSv2 -> 8b)
    assert main(["report", "--out", str(tmp_path / "report"), "--tracking-uri", uri]) == 0
    report = tmp_path / "report" / "tables"
    row_a = pd.read_csv(report / "table_8a.csv", dtype=str).set_index("row").loc["all"]
    row_b = pd.read_csv(report / "table_8b.csv", dtype=str).set_index("row").loc["2"]
    for row in (row_a, row_b):
        assert float(row["SSv2"]) == pytest.approx(value, abs=1e-4) and row["SSv2_n"] == "1"

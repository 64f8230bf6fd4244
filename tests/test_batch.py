"""A batch of ablation files planned together: identical trials found across files, packs
across tables, the dry run, and the tags that name every cell a run fills (no Ray here; the
batch on Ray Tune: test_batch_ray.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import layout_data, write_config

from evl_platform.cli import main
from evl_platform.data.synth import SyntheticLayout
from evl_platform.sweep.batch import ablation_files, plan_batch
from evl_platform.sweep.spec import AblationError
from evl_platform.sweep.trials import trial_tags
from evl_platform.tracking import names

FIXED_VIEWS = {"random_resized_crop": None, "rand_augment": None, "horizontal_flip": False}
ON = {"model.decoder.temporal_conv": True, "model.decoder.temporal_pos_embed": True}
OFF = {"model.decoder.temporal_conv": False, "model.decoder.temporal_pos_embed": False}


def write_batch(
    tmp_path: Path, layout: SyntheticLayout, extra: dict | None = None, **train: object
) -> list[Path]:
    """Two tiny ablation files over one experiment (2 decoder layers): ``tab_a`` (Table 8a:
    ``all``) and ``tab_b`` (Table 6a+8b: ``d1``, ``d2`` and ``none``, then the ``extra``
    variants), ``tab_b``'s ``d2`` identical to ``tab_a``'s ``all``; packs of at most 2."""
    schedule = {"num_steps": 2, "batch_size": 4, "log_every": 1, "eval_every": 2, "amp": "none"}
    schedule |= {"checkpoint_every": 2, **train}
    data = layout_data(layout, augment=FIXED_VIEWS)
    write_config(tmp_path / "exp.yaml", data, train=schedule, features={"reuse": False})
    common = {"experiments": {"ssv2": "exp.yaml"}, "sweep": {"pack_size": 2}}
    tab_a = {"name": "tab_a", "table": {"paper": "8a", "columns": {"ssv2": "SSv2"}}}
    tab_a |= common | {"variants": {"all": ON}}
    tab_b = {"name": "tab_b", "table": {"paper": "6a+8b", "columns": {"ssv2": "SSv2"}}}
    tab_b |= common | {
        "variants": {
            "d1": {"row": "1", "set": {"model.decoder.num_layers": 1, **ON}},
            "d2": {"row": "2", "set": {"model.decoder.num_layers": 2, **ON}},
            "none": OFF,
            **(extra or {}),
        }
    }
    paths = []
    for body in (tab_a, tab_b):
        path = tmp_path / "tables" / f"{body['name']}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(body, sort_keys=False).replace("exp.yaml", "../exp.yaml"))
        paths.append(path)
    return paths


def test_identical_trials_train_once_and_pack_across_tables(
    tmp_path: Path, motion_small: SyntheticLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    tab_a, tab_b = write_batch(tmp_path, motion_small)
    batch = plan_batch([tab_a.parent])  # a directory: every ablation file in it
    assert [p.ablation.name for p in batch.plans] == ["tab_a", "tab_b"]
    assert dict(batch.copies) == {("tab_b", "d2/ssv2/seed0"): ("tab_a", "all/ssv2/seed0")}
    assert (batch.cells, batch.unique) == (4, 3)
    [home] = batch.plans[0].trials
    assert [(c.ablation, c.key, c.row) for c in home.also] == [("tab_b", "d2/ssv2/seed0", "2")]

    assert main(["sweep", str(tab_a), str(tab_b), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 table cells trained by 3 runs" in out
    assert "tab_a:all/ssv2/seed0 also fills tab_b:d2/ssv2/seed0 (row 2)" in out
    assert "pack of 2: tab_a:all/ssv2/seed0, tab_b:d1/ssv2/seed0" in out
    assert "alone: tab_b:none/ssv2/seed0" in out and "starts a new pack" in out

    # the run's tags: every cell it fills, searchable by table column and row
    contexts = {
        name: {"ablation": name, "paper_table": table, "parent_run_id": f"p-{name}"}
        for name, table in (("tab_a", "8a"), ("tab_b", "6a+8b"))
    }
    sweep = contexts["tab_a"] | {"run_name": "sweep-a"}
    tags = trial_tags(home, sweep, contexts)
    assert tags[names.cell_tag("tab_a", "ssv2")] == "all"
    assert tags[names.cell_tag("tab_b", "ssv2")] == "2"
    cells = json.loads(tags[names.TAG_CELLS])
    assert [(c["ablation"], c["row"], c["parent_run_id"]) for c in cells] == [
        ("tab_a", "all", "p-tab_a"),
        ("tab_b", "2", "p-tab_b"),
    ]


def test_a_batch_names_its_files_once_and_refuses_a_name_twice(
    tmp_path: Path, motion_small: SyntheticLayout
) -> None:
    tab_a, tab_b = write_batch(tmp_path, motion_small)
    assert ablation_files([tab_a, tab_a.parent]) == [tab_a, tab_b]
    with pytest.raises(AblationError, match="no such ablation file"):
        ablation_files([tmp_path / "missing.yaml"])
    twin = tmp_path / "twin.yaml"
    twin.write_text(tab_a.read_text().replace("../exp.yaml", "exp.yaml"))
    with pytest.raises(AblationError, match=r"twin.yaml: name 'tab_a' is also the name of"):
        plan_batch([tab_a, twin])


def test_a_tables_copies_read_the_run_that_trained_them_and_the_report_every_cell(
    tmp_path: Path, motion_small: SyntheticLayout
) -> None:
    import pandas as pd

    from evl_platform.report.cells import run_cells
    from evl_platform.sweep.batch_runner import table_runs

    batch = plan_batch(write_batch(tmp_path, motion_small))
    home = object()  # stands in for the MLflow run of tab_a's "all"
    own = {"tab_a": {"all/ssv2/seed0": home}, "tab_b": {}}
    runs = table_runs(batch.plans[1], batch, own)
    assert runs == {"d2/ssv2/seed0": home}  # d1 and none have no run yet: not filled

    listed = [{"ablation": "tab_b", "row": "2", "parent_run_id": "p"}]
    tagged = pd.Series({names.TAG_CELLS: json.dumps(listed)})
    assert run_cells(tagged) == listed
    plain = {
        names.TAG_CELLS: None,
        names.TAG_ABLATION: "tab_a",
        names.TAG_PAPER_TABLE: "8a",
        names.TAG_PAPER_ROW: "all",
        names.TAG_DATASET_KEY: "ssv2",
        names.TAG_TRIAL: "all/ssv2/seed0",
        "parent_run_id": "p",
    }
    [cell] = run_cells(pd.Series(plain))  # a run from before batches: its own tags
    assert (cell["ablation"], cell["row"], cell["parent_run_id"]) == ("tab_a", "all", "p")


def _plain(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def test_a_trial_crosses_into_tune_as_plain_data(
    tmp_path: Path, motion_small: SyntheticLayout
) -> None:
    """Tune stands a placeholder in for any other object in a grid value and looks for it at
    the same place in the next grid value: a pack whose trial fills another table's cell
    (``also``) followed by one whose trials fill none crashed the batch there."""
    from evl_platform.sweep.plan import Trial

    batch = plan_batch(write_batch(tmp_path, motion_small))
    [home] = batch.plans[0].trials
    for trial in (home, *batch.plans[1].trials):
        data = trial.to_dict()
        assert _plain(data), data
        assert Trial.from_dict(data) == trial
    assert home.to_dict()["also"] == [
        {"ablation": "tab_b", "key": "d2/ssv2/seed0", "row": "2", "dataset": "ssv2"}
    ]

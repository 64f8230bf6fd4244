"""A sweep's results table from its trials' MLflow runs, and the files it is written to."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Run

from evl_platform.runtime.storage import local_storage
from evl_platform.sweep.plan import SweepPlan, Trial
from evl_platform.sweep.results import ResultsTable
from evl_platform.sweep.runs import SweepParent, run_status
from evl_platform.tracking import names
from evl_platform.tracking.client import Tracker


def trial_row(trial: Trial) -> str:
    """A trial's table row: its variant, plus its grid point if any."""
    return trial.variant + settings_text(trial.grid)


def settings_text(values: Mapping[str, Any]) -> str:
    """`` lr=0.001 dropout=0.5``: dotted keys shortened to their last part."""
    return "".join(f" {k.split('.')[-1]}={v}" for k, v in values.items())


def results_table(plan: SweepPlan, runs: Mapping[str, Run]) -> ResultsTable:
    """Variant x dataset cells of the table's metric, from the FINISHED trial runs (a search
    gets one row per sample, labelled with its sampled values)."""
    spec = plan.ablation.spec
    notes: dict[str, str] = {}
    for trial in plan.trials:
        if trial.dataset not in notes and trial.scores is None:
            notes[trial.dataset] = trial.cfg.data.dataset
    table = ResultsTable(
        title=f"{spec.name} (paper Table {spec.table.paper}, profile {plan.ablation.profile})",
        metric=spec.table.metric,
        rows=[],
        columns=list(spec.experiments),
        column_notes={k: v for k, v in notes.items() if v != k},
    )
    for trial in plan.trials if spec.search is None else ():
        if trial_row(trial) not in table.rows:
            table.rows.append(trial_row(trial))
    by_key = {t.key: t for t in plan.trials}
    for key, run in sorted(runs.items()):
        trial = by_key.get(key)
        value = run.data.metrics.get(spec.table.metric)
        if run.info.status != names.STATUS_FINISHED or value is None:
            continue
        if trial is None and spec.search is not None:  # a search sample: its sampled values
            params = run.data.params
            sampled = settings_text({k: params.get(k) for k in spec.search.space})
            column = run.data.tags[names.TAG_DATASET_KEY]
            table.add(key.split("/")[-1] + sampled, column, value)
        elif trial is not None:
            table.add(trial_row(trial), trial.dataset, value)
    return table


def write_results(
    parent: SweepParent,
    storage: str,
    table: ResultsTable,
    ensembles: ResultsTable | None,
    tracker: Tracker,
) -> Path:
    """Writes results.md/results.csv (and ensembles.csv) under ``<storage>/<sweep>/`` (or
    ``./sweeps/<sweep>/`` for bucket storage) and logs them to the parent run."""
    directory = (local_storage(storage) or Path.cwd() / "sweeps") / parent.name
    directory.mkdir(parents=True, exist_ok=True)
    markdown = table.markdown()
    if ensembles is not None:
        markdown += "\n" + ensembles.markdown()
        ensembles.write_csv(directory / "ensembles.csv")
        tracker.log_artifact(parent.run_id, directory / "ensembles.csv")
    (directory / names.ARTIFACT_RESULTS_MD).write_text(markdown, encoding="utf-8")
    table.write_csv(directory / names.ARTIFACT_RESULTS_CSV)
    for name in (names.ARTIFACT_RESULTS_MD, names.ARTIFACT_RESULTS_CSV):
        tracker.log_artifact(parent.run_id, directory / name)
    return directory


def failed_trials(trials: Sequence[Trial], runs: Mapping[str, Run]) -> list[str]:
    """Keys of the trained trials whose run did not finish."""
    return [
        t.key
        for t in trials
        if t.scores is None and run_status(runs, t.key) != names.STATUS_FINISHED
    ]

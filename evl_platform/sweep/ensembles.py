"""The ensemble stage of an ablation with an ``ensemble`` block (paper Tables 10-11).

After the member models have trained, every pair is ensembled on each dataset and seed from
the members' per-video validation scores (or an external score file), α is chosen on the
validation set, and one ``kind=ensemble`` run per pair is logged under the sweep's parent run.
A resumed sweep skips pairs whose ensemble run already exists.
"""

from __future__ import annotations

from mlflow.entities import Run

from evl_platform.ensemble import EnsembleError, ensemble, load_scores, log_ensemble
from evl_platform.sweep.plan import SweepPlan, Trial
from evl_platform.sweep.results import ResultsTable
from evl_platform.sweep.runs import SweepParent
from evl_platform.tracking import names
from evl_platform.tracking.client import Tracker


def run_ensembles(
    plan: SweepPlan,
    tracker: Tracker,
    parent: SweepParent,
    runs: dict[str, Run],
) -> ResultsTable:
    """Ensembles every pair on every dataset and seed; returns the ensemble table.

    Rows are ``model 1 + model 2``; each cell is the ensemble accuracy at the chosen α with
    the gain over model 1 in the CSV's values; a pair with a member that did not finish is
    reported and left out.
    """
    ablation, trials = plan.ablation, plan.trials
    spec = ablation.spec
    assert spec.ensemble is not None
    table = ResultsTable(
        title=f"{spec.name}: ensembles (paper Table {spec.table.paper}, profile "
        f"{ablation.profile}); cells: model 1 + model 2 top-1 at the α chosen on validation",
        metric=names.ENSEMBLE_ACC1_BEST,
        rows=[],
        columns=list(spec.experiments),
    )
    existing = {
        run.data.tags.get(names.TAG_TRIAL): run
        for run in tracker.children(spec.name, parent.run_id)
        if run.data.tags.get(names.TAG_KIND) == names.KIND_ENSEMBLE
    }
    by_key = {t.key: t for t in trials}
    for first, second in spec.ensemble.pairs:
        row = f"{first} + {second}"
        table.rows.append(row)
        for trial_a in (t for t in trials if t.variant == first):
            key_b = trial_a.key.replace(f"{first}/", f"{second}/", 1)
            trial_b = by_key.get(key_b)
            if trial_b is None:
                continue
            pair_key = f"{first}+{second}/{trial_a.dataset}/seed{trial_a.seed}"
            done = existing.get(pair_key)
            if done is not None:
                table.add(row, trial_a.dataset, done.data.metrics[names.ENSEMBLE_ACC1_BEST])
                continue
            sources = [_source(t, runs) for t in (trial_a, trial_b)]
            if None in sources:
                print(f"ensemble {pair_key}: a member did not finish; skipped", flush=True)
                continue
            try:
                result = ensemble(
                    load_scores(sources[0], tracker.uri),
                    load_scores(sources[1], tracker.uri),
                    spec.ensemble.alphas,
                )
            except EnsembleError as err:
                print(f"ensemble {pair_key}: {err}", flush=True)
                continue
            log_ensemble(
                tracker,
                result,
                experiment=spec.name,
                run_name=f"{parent.name}-{pair_key.replace('/', '-')}",
                tags={
                    names.TAG_ABLATION: spec.name,
                    names.TAG_PAPER_TABLE: spec.table.paper,
                    names.TAG_PAPER_ROW: row,
                    names.TAG_DATASET_KEY: trial_a.dataset,
                    names.TAG_SEED: str(trial_a.seed),
                    names.TAG_TRIAL: pair_key,
                    names.TAG_SWEEP: parent.name,
                    names.TAG_PROFILE: ablation.profile,
                },
                parent_run_id=parent.run_id,
                members=(first, second),
            )
            print(f"ensemble {pair_key}: {result.summary()}", flush=True)
            table.add(row, trial_a.dataset, result.acc)
    return table


def _source(trial: Trial, runs: dict[str, Run]) -> str | None:
    """The member's score source: an external file, or its finished training run's id."""
    if trial.scores is not None:
        return trial.scores
    run = runs.get(trial.key)
    if run is None or run.info.status != names.STATUS_FINISHED:
        return None
    return run.info.run_id

"""Model-based search (an ablation's ``search`` block): Optuna TPE proposes, ASHA stops early.

Each dataset's trial row is searched in its own Tune run of ``num_samples`` samples; every
sample is one training run nested under the sweep's parent, tagged with its sampled values.
On ``--resume`` the finished samples are handed back to Optuna (``points_to_evaluate`` with
their results) and only the missing number of samples runs; a sample that was cut off
mid-run is deleted and sampled afresh, so every sample has exactly one run.
"""

from __future__ import annotations

import time
from typing import Any

from evl_platform.sweep.plan import SweepPlan, Trial
from evl_platform.sweep.progress import TrialProgress
from evl_platform.sweep.runs import SweepParent
from evl_platform.sweep.spec import Ablation, SearchDimension
from evl_platform.sweep.trials import TRIAL_ACTOR_MEMORY, default_concurrency, run_trial
from evl_platform.tracking import names
from evl_platform.tracking.client import Tracker

SEARCH_PARAM = "search."  # sampled values are logged as tags search.<dotted key>


def _domain(dim: SearchDimension) -> Any:
    from ray import tune

    if dim.loguniform is not None:
        return tune.loguniform(*dim.loguniform)
    if dim.uniform is not None:
        return tune.uniform(*dim.uniform)
    return tune.choice(list(dim.choice or ()))


def run_search(
    plan: SweepPlan,
    tracker: Tracker,
    parent: SweepParent,
    sweep: dict[str, Any],
    *,
    max_concurrent: int | None,
) -> None:
    """Runs the remaining samples of every trial row of a search ablation.

    ``sweep`` is the context every trial gets (:func:`~.trials.sweep_context`).
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    ablation = plan.ablation
    search = ablation.spec.search
    assert search is not None
    children = tracker.children(ablation.spec.name, parent.run_id)
    for trial in plan.trials:
        mine = [
            r
            for r in children
            if r.data.tags.get(names.TAG_TRIAL, "").startswith(f"{trial.key}/")
            and r.data.tags.get(names.TAG_KIND) == names.KIND_TRAIN
        ]
        finished = [r for r in mine if r.info.status == names.STATUS_FINISHED]
        for run in mine:
            if run.info.status != names.STATUS_FINISHED:
                tracker.delete(run.info.run_id)  # cut off mid-run: sampled afresh
        remaining = search.num_samples - len(finished)
        if remaining <= 0:
            continue
        points, rewards = [], []
        for run in finished:
            value = run.data.metrics.get(search.metric)
            sampled = {k: _parse(run.data.params.get(k)) for k in search.space}
            if value is not None and None not in sampled.values():
                points.append({"entry": {"search": sampled}})
                rewards.append(value)
        cfg = trial.cfg
        scheduler = None
        if search.asha is not None:
            scheduler = ASHAScheduler(
                time_attr=names.REPORT_STEP,
                max_t=search.asha.max_t or cfg.train.num_steps,
                grace_period=search.asha.grace_period,
                reduction_factor=search.asha.reduction_factor,
            )
        searcher = OptunaSearch(
            points_to_evaluate=points or None,
            evaluated_rewards=rewards or None,
            seed=trial.seed,
        )
        print(
            f"search {trial.key}: {remaining} of {search.num_samples} samples to run "
            f"({len(finished)} finished earlier)",
            flush=True,
        )
        tuner = tune.Tuner(
            tune.with_resources(run_trial, {"memory": TRIAL_ACTOR_MEMORY}),
            param_space={
                "entry": {
                    "trial": trial.to_dict(),
                    "sweep": sweep,
                    "search": {k: _domain(d) for k, d in search.space.items()},
                    # the searcher and ASHA read this metric from every result they get
                    "report_metric": search.metric,
                }
            },
            tune_config=tune.TuneConfig(
                metric=search.metric,
                mode=search.mode,
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=remaining,
                max_concurrent_trials=max_concurrent or default_concurrency(plan),
                # a reused trial actor keeps its finished TorchTrainer's placement group (and
                # CPUs) alive, starving the next samples: one fresh actor per sample
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=f"tune-{parent.name}-{trial.slug}",
                storage_path=sweep["storage"],
                verbose=0,
                callbacks=[
                    TrialProgress(total=search.num_samples, finished=len(finished), quiet=False)
                ],
            ),
        )
        results = tuner.fit()
        # trials that ended without an error: done, or stopped by ASHA
        clean = {r.metrics.get("trial_id") for r in results if r.error is None and r.metrics}
        _close_stopped(tracker, ablation, parent, trial, clean)


def _parse(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


SETTLE_TIMEOUT_S = 30.0
"""How long to wait, after Tune returns, for stopped samples' trial actors to exit."""


def _close_stopped(
    tracker: Tracker,
    ablation: Ablation,
    parent: SweepParent,
    trial: Trial,
    clean: set[str],
    timeout: float = SETTLE_TIMEOUT_S,
) -> None:
    """Closes the runs of samples ASHA stopped as FINISHED, tagged early_stopped.

    ``clean`` holds the Tune trial ids that ended without an error. A sample that ran all
    its steps closed its own run before Tune saw its last result (the trial holds that report
    back), so only samples stopped mid-run are left. Stopping a sample kills its trainer,
    which leaves its run RUNNING or, when the sample's ``train`` sees the trainer die before
    its trial actor is gone, FAILED: either way Tune recorded no error. A run FAILED for a
    reason of its own (a non-finite loss, tagged ``evl.failure``) stays FAILED. Tune returns
    before the stopped trial actors have exited: the runs are closed once no trial actor of
    this job is alive (or, where Ray's state API cannot say, once none is RUNNING or
    ``timeout`` has passed), and a dying trial only closes a run that is still RUNNING
    (:meth:`.Tracker.terminate_open`), so a late write cannot undo this close.
    """

    def stopped() -> list:
        return [
            run
            for run in tracker.children(ablation.spec.name, parent.run_id)
            if run.info.status in (names.STATUS_RUNNING, names.STATUS_FAILED)
            and names.TAG_FAILURE not in run.data.tags
            and (key := run.data.tags.get(names.TAG_TRIAL, "")).startswith(f"{trial.key}/")
            and key.rsplit("/", 1)[-1] in clean
        ]

    deadline = time.monotonic() + timeout
    while True:
        alive = _trial_actors_alive()
        runs = stopped()  # read after the check: holds what exited actors wrote last
        running = any(r.info.status == names.STATUS_RUNNING for r in runs)
        settled = alive is False or (alive is None and not running)
        if not runs or settled or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    for run in runs:
        tracker.set_tags(run.info.run_id, {names.TAG_EARLY_STOPPED: "true"})
        tracker.terminate(run.info.run_id, names.STATUS_FINISHED)


def _trial_actors_alive() -> bool | None:
    """Whether a Tune function-trainable actor of this job is alive; ``None``: unknown."""
    import ray
    from ray.util.state import list_actors

    try:
        actors = list_actors(
            filters=[
                ("job_id", "=", ray.get_runtime_context().get_job_id()),
                ("class_name", "=", "ImplicitFunc"),  # Tune's actor for a function trainable
                ("state", "=", "ALIVE"),
            ],
            timeout=10,
            raise_on_missing_output=False,
        )
    except Exception:  # no state API (e.g. a cluster without its dashboard)
        return None
    return bool(actors)

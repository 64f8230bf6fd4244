"""Sweep trials on Ray Tune: the function trainable that trains one trial or one pack, and the
grid run.

Ray 2.60 runs Ray Train V2, whose trainers cannot be handed to ``Tuner``: each Tune trial is a
function trainable (:func:`run_trial`) that launches the trial's ``TorchTrainer`` through
:func:`evl_platform.train.launcher.train` (a pack's through
:func:`~evl_platform.train.launcher.train_pack`, see :mod:`evl_platform.sweep.packs`) and
forwards its reports to Tune with ``TuneReportCallback``. The trial receives its resolved
config as plain data (planned on the driver, see :mod:`evl_platform.sweep.plan`) and
validates it once; it reads no file. The trial actor itself reserves no CPU (a CPU pack's
actor reserves the pack's estimated memory, :func:`trial_memory`); ``--max-concurrent``
(default: as many trials as the cluster has worker slots once its autoscaler has grown it,
:func:`default_concurrency`) bounds how many TorchTrainers run at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from evl_platform.config import apply_overrides
from evl_platform.sweep.packs import PackTodo
from evl_platform.sweep.plan import SweepPlan, Trial
from evl_platform.sweep.progress import TrialProgress, grid_entry
from evl_platform.sweep.runs import SweepParent
from evl_platform.tracking import names

TRIAL_ACTOR_MEMORY = 64 * 1024**2
"""Memory a trial actor requests: it only drives its TorchTrainer and needs no CPU of its own,
but Tune needs a non-empty resource request."""


def sweep_context(
    plan: SweepPlan, parent: SweepParent, storage: str, tracking_uri: str
) -> dict[str, Any]:
    """The ``sweep`` entry of every trial's Tune config: what all trials share."""
    spec = plan.ablation.spec
    return {
        "ablation": spec.name,
        "paper_table": spec.table.paper,
        "resources": spec.resources.model_dump(),
        "tracking_uri": tracking_uri,
        "storage": storage,
        "experiment": spec.name,
        "parent_run_id": parent.run_id,
        "run_name": parent.name,
        # a search sample's relative path values mean what they would on the driver
        "workdir": os.getcwd(),
    }


def default_concurrency(plan: SweepPlan, resources: Mapping[str, float] | None = None) -> int:
    """Trials that fit the cluster at once: its GPUs (or CPUs) over one trial's needs.

    Args:
        plan: the sweep (its trials' resources).
        resources: the cluster's resources (default: what the connected cluster can grow to,
            :func:`~evl_platform.runtime.capacity.cluster_max_resources`: on a cluster whose
            autoscaler starts GPU workers on demand, its GPUs now may be none).
    """
    if resources is None:
        from evl_platform.runtime.capacity import cluster_max_resources

        resources = cluster_max_resources()
    res = plan.ablation.spec.resources
    if res.use_gpu:
        return max(1, int(resources.get("GPU", 0) // res.num_workers))
    return max(1, int(resources.get("CPU", 1) // (res.num_workers * res.cpus_per_worker)))


def trial_memory(item: PackTodo, *, use_gpu: bool, num_workers: int) -> int:
    """Ray ``memory`` (bytes) a Tune trial's actor reserves: a CPU pack's estimated memory
    over all its workers (:func:`~evl_platform.sweep.memory.pack_memory_bytes`), so that Ray
    starts no two packs that cannot both fit; otherwise :data:`TRIAL_ACTOR_MEMORY`.

    Capped at the largest node's ``memory`` resource (a pack larger than any node still
    runs, alone). The reservation is taken on the node the trial actor runs on, which is
    the workers' node on one machine.
    """
    if use_gpu or not item.packed:
        return TRIAL_ACTOR_MEMORY
    import ray

    from evl_platform.sweep.memory import pack_memory_bytes

    cfgs = [t.cfg for t in item.trials]
    estimate = pack_memory_bytes(cfgs, num_workers=num_workers, device_type="cpu").total
    largest = max(
        (n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0
    )
    return int(max(TRIAL_ACTOR_MEMORY, min(estimate * num_workers, largest)))


def trial_resources(config: dict[str, Any]) -> Any:
    """The placement group of a Tune trial's actor: no CPU, its config's ``memory``."""
    from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

    memory = grid_entry(config).get("memory", TRIAL_ACTOR_MEMORY)
    return resource_dict_to_pg_factory({"memory": memory})


def trial_tags(
    trial: Trial, sweep: dict[str, Any], sweeps: Mapping[str, dict[str, Any]] | None = None
) -> dict[str, str]:
    """The sweep tags of a trial's training run: its own table's, and the cells it fills
    (its own and, in a batch, those of the identical trials of the tables ``sweeps`` names,
    ablation -> its :func:`sweep_context`) as :data:`~names.TAG_CELLS` and one
    :func:`~names.cell_tag` per table column."""
    entries, rows = [], {}
    known = sweeps or {}
    for cell in (trial.cell, *(c for c in trial.also if c.ablation in known)):
        context = known.get(cell.ablation, sweep)
        entries.append(
            {
                "ablation": context["ablation"],
                "paper_table": context["paper_table"],
                "row": cell.row,
                "dataset_key": cell.dataset,
                "trial": cell.key,
                "parent_run_id": context["parent_run_id"],
            }
        )
        rows.setdefault(names.cell_tag(context["ablation"], cell.dataset), []).append(cell.row)
    return {
        names.TAG_ABLATION: sweep["ablation"],
        names.TAG_PAPER_TABLE: sweep["paper_table"],
        names.TAG_PAPER_ROW: trial.row,
        names.TAG_VARIANT: trial.variant,
        names.TAG_DATASET_KEY: trial.dataset,
        names.TAG_SEED: str(trial.seed),
        names.TAG_TRIAL: trial.key,
        names.TAG_SWEEP: sweep["run_name"],
        names.TAG_CELLS: json.dumps(entries),
        **{key: " | ".join(dict.fromkeys(values)) for key, values in rows.items()},
    }


def run_trial(config: dict[str, Any]) -> dict[str, Any]:
    """Tune function trainable: one trial's training run, or one pack's, reported to Tune as
    it goes.

    ``config``: ``trial`` (a :class:`Trial` dict holding its resolved config) or ``pack`` (a
    list of them, trained together), ``sweep`` (:func:`sweep_context` of the first trial's
    ablation), in a batch ``sweeps`` (ablation name -> its context: a member's run goes
    under its own ablation's parent run), ``resume_run`` (a Ray
    Train run name to continue), ``run_name`` and, in a search, ``search`` (sampled dotted
    key -> value) and ``report_metric`` (only results holding this metric reach Tune, and
    the last step's result only once the run is closed, see ``MetricReportCallback``).

    Returns:
        Its run id and last metrics (a pack: each member's under its key's prefix), and the
        time it spent per phase (:data:`~evl_platform.tracking.names.TIME_PHASES`).
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from evl_platform.train.launcher import TrainOptions, train

    class MetricReportCallback(TuneReportCallback):
        """Forwards only the reports that carry ``metric`` (Optuna and ASHA need it in each)
        and come before ``last_step``.

        The last step's report is held back: ASHA answers a result at its ``max_t`` (by
        default the run's last step) with STOP, which would kill the trial while its run
        uploads its final files and model. The trial's return value, sent once its run is
        closed, is the result Tune gets for that step.
        """

        def __init__(self, metric: str, last_step: int) -> None:
            super().__init__()
            self.metric, self.last_step = metric, last_step

        def after_report(
            self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
        ) -> None:
            report = metrics[0]
            if self.metric in report and report.get(names.REPORT_STEP, 0) < self.last_step:
                super().after_report(run_context, metrics, checkpoint)

    config = grid_entry(config)
    sweep = config["sweep"]
    resources = sweep["resources"]
    options = TrainOptions(
        num_workers=resources["num_workers"],
        use_gpu=resources["use_gpu"],
        cpus_per_worker=resources["cpus_per_worker"],
        tracking_uri=sweep["tracking_uri"],
        storage_path=sweep["storage"],
        resume=config.get("resume_run"),
        mlflow_experiment=sweep["experiment"],
        parent_run_id=sweep["parent_run_id"],
        check_storage=False,  # the driver checked once for the whole sweep
        callbacks=[TuneReportCallback()],
    )
    if "pack" in config:
        return _run_pack([Trial.from_dict(t) for t in config["pack"]], config, options)
    trial = Trial.from_dict(config["trial"])
    cfg = trial.cfg
    sampled = config.get("search") or {}
    if sampled:  # a search sample is its own trial: key it by Tune's trial id
        trial_id = tune.get_context().get_trial_id()
        trial = dataclasses.replace(trial, key=f"{trial.key}/{trial_id}")
        cfg = apply_overrides(
            cfg, sampled, source=f"search sample {trial.key}", base_dir=sweep["workdir"]
        )
    if config.get("report_metric"):
        options.callbacks = [MetricReportCallback(config["report_metric"], cfg.train.num_steps)]
    options.run_name = config.get("run_name") or member_run_name(sweep, trial)
    options.tags = trial_tags(trial, sweep, config.get("sweeps"))
    outcome = train(cfg, options)
    return {"run_id": outcome.run_id, **outcome.metrics, **outcome.timings}


def member_run_name(sweep: dict[str, Any], trial: Trial) -> str:
    """A trial's run name: the sweep's, then the trial's slug."""
    return f"{sweep['run_name']}-{trial.slug}"


def _run_pack(trials: list[Trial], config: dict[str, Any], options: Any) -> dict[str, Any]:
    """Trains a pack's trials on one backbone pass; each member is keyed by its slug (in a
    batch over several ablation files, by its :attr:`~Trial.qualified_slug`)."""
    from evl_platform.train.launcher import PackMember, train_pack

    sweeps = config.get("sweeps") or {}
    options.run_name = config.get("run_name")
    members = []
    for t in trials:
        sweep = sweeps.get(t.ablation, config["sweep"])
        members.append(
            PackMember(
                t.qualified_slug if sweeps else t.slug,
                t.cfg,
                member_run_name(sweep, t),
                trial_tags(t, sweep, sweeps),
                experiment=sweep["experiment"],
                parent_run_id=sweep["parent_run_id"],
            )
        )
    outcomes = train_pack(members, options)
    result: dict[str, Any] = {"run_id": ",".join(o.run_id for o in outcomes.values())}
    for key, outcome in outcomes.items():
        result |= {names.member_metric(key, k): v for k, v in outcome.metrics.items()}
        result[names.member_metric(key, "status")] = outcome.status
    return result | next(iter(outcomes.values())).timings


def grid_configs(
    todo: Sequence[PackTodo],
    context: dict[str, Any],
    memory: Sequence[int] | None = None,
    sweeps: Mapping[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Each Tune trial's config: one trial's, or a pack's, with the Ray ``memory`` its actor
    reserves (``memory``, one per Tune trial; default :data:`TRIAL_ACTOR_MEMORY`). In a batch
    over several ablation files, ``sweeps`` maps each ablation to its context; a Tune trial's
    ``sweep`` is then its first trial's."""
    configs = []
    reserve = memory or [TRIAL_ACTOR_MEMORY] * len(todo)
    for item, reserved in zip(todo, reserve, strict=True):
        common = {
            "sweep": (sweeps or {}).get(item.trials[0].ablation, context),
            "resume_run": item.resume_run,
            "run_name": item.run_name,
            "memory": reserved,
        }
        if sweeps:
            common["sweeps"] = dict(sweeps)
        if item.packed:
            configs.append({"pack": [t.to_dict() for t in item.trials], **common})
        else:
            configs.append({"trial": item.trials[0].to_dict(), **common})
    return configs


def run_grid(
    plan: SweepPlan,
    todo: Sequence[PackTodo],
    context: dict[str, Any],
    *,
    max_concurrent: int | None,
    finished_before: int,
    quiet: bool,
    sweeps: Mapping[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Runs the Tune trials of a grid sweep (single trials and packs), ``max_concurrent`` at a
    time (default: what ``plan``'s resources fit in the cluster). ``sweeps``: a batch's
    contexts by ablation (:func:`grid_configs`); ``context`` names the Tune run.

    Returns:
        Each Tune trial's last result (with its time per phase).
    """
    from ray import tune

    concurrent = max_concurrent or default_concurrency(plan)
    memory = []
    for item in todo:
        res = (sweeps or {}).get(item.trials[0].ablation, context)["resources"]
        memory.append(trial_memory(item, use_gpu=res["use_gpu"], num_workers=res["num_workers"]))
    progress = TrialProgress(
        total=sum(len(t.trials) for t in todo) + finished_before,
        finished=finished_before,
        quiet=quiet,
    )
    packs = sum(t.packed for t in todo)
    shown = f" ({packs} packs)" if packs else ""
    print(f"running {len(todo)} Tune trials{shown}, {concurrent} at a time", flush=True)
    tuner = tune.Tuner(
        tune.with_resources(run_trial, trial_resources),
        param_space={"entry": tune.grid_search(grid_configs(todo, context, memory, sweeps))},
        # A finished trial's actor runs the next one: its process, imports and MLflow store
        # carry over (each trial's TorchTrainer has ended, unlike an early-stopped search
        # sample's, see search.py).
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"tune-{context['run_name']}",
            storage_path=context["storage"],
            verbose=0,
            callbacks=[progress],
        ),
    )
    grid = tuner.fit()
    return [result.metrics or {} for result in grid]

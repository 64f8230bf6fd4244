"""Faults injected into the loop of real Ray Train workers, without a production hook.

:class:`InjectIntoWorkers` is a Ray Train ``WorkerCallback`` (handed to the trainer through the
ordinary ``TrainOptions.callbacks``): Ray copies it into every worker process, where it wraps
the worker's :func:`~evl_platform.train.loop.fit_members` so that every member gets one more
loop :class:`~evl_platform.train.loop.Callback`, made by a factory defined in the test. This
module and the tests' factories reach the workers pickled by value (the workers cannot import
the tests).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import ray.cloudpickle
import ray.train
from ray.train.v2._internal.execution.callback import WorkerCallback
from torch import nn

from evl_platform.train.loop import Callback, unwrap

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class WorkerMember:
    """What a fault knows about the member it watches.

    Attributes:
        key: the member's key (``""`` for a run of its own).
        model: its model (not its DDP wrapper).
        rank: this worker's rank.
        world: the number of workers.
    """

    key: str
    model: nn.Module
    rank: int
    world: int


class InjectIntoWorkers(WorkerCallback):
    """Adds ``make(member)`` to every member's loop callbacks in every worker (restarts too).

    Args:
        make: builds the callback of one member in one worker.
    """

    def __init__(self, make: Callable[[WorkerMember], Callback]) -> None:
        self.make = make

    def after_init_train_context(self) -> None:
        from evl_platform.train import worker

        original, make = worker.fit_members, self.make

        def fit_members(members, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            context = ray.train.get_context()
            rank, world = context.get_world_rank(), context.get_world_size()
            for member in members:
                seen = WorkerMember(member.key, unwrap(member.net), rank, world)
                member.callbacks = [*member.callbacks, make(seen)]
            return original(members, *args, **kwargs)

        worker.fit_members = fit_members

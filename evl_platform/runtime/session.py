"""Starting or attaching to Ray, and what every worker process of a job gets.

Ray is started locally on demand (and shut down afterwards) unless an address is given or Ray
is already initialised. Process-wide settings (Ray's output style, log levels) are applied
here, by the functions that start the work, never when a module is imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

WORKER_SETUP_HOOK = "evl_platform.runtime.hooks.quiet_ray_workers"
"""Every worker process of the job runs this hook, so it lives in a module that imports
nothing heavy: importing torch and MLflow for it cost each of Ray Train's helper actors ~3 s
of CPU."""

WORKER_ENV = {
    # Ray Train's print patch sends each worker print to the console twice; plain prints do.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # glibc serves each multi-MB CPU tensor from fresh mmap'ed pages and hands them back on
    # free, so every step pays page faults to zero them again; keeping freed memory in the
    # heap cut a tiny decoder step with T-CA from 63-70 to 54 ms (docs/benchmarks.md).
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024**2),
    "MALLOC_TRIM_THRESHOLD_": str(4 * 1024**3),
}
"""Environment variables of every worker process (local instance and attached cluster)."""

LOCAL_WORKER_ENV = {
    # One actor process less per training: a local machine is not preempted.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # The Train controller polls its workers at this interval, and each step of starting and
    # finishing a run waits for a poll: 2 s by default.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
"""Extra worker environment of a local instance."""

DRIVER_ENV = {
    # The sweep prints its own progress lines; Tune's legacy reporter is silent at verbose=0,
    # while its newer one still prints its experiment banner.
    "RAY_AIR_NEW_OUTPUT": "0",
    # ASHA reads val/acc1 from the reports that carry it; training-only reports lack it.
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    **WORKER_ENV,
}
"""Environment of a driver that runs Tune or Train (values the user set are kept)."""


def configure_driver() -> None:
    """Process settings of a driver about to run Ray Train or Tune: :data:`DRIVER_ENV`
    (unless already set) and Tune's per-trial INFO lines off (result files written,
    hyper-parameters TensorBoard cannot log), which would interleave with the progress lines.
    """
    for key, value in DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)


def ray_init_options(num_cpus: int | None = None) -> dict[str, Any]:
    """``ray.init`` arguments for a local instance.

    The dashboard runs because Ray Train's placement-group cleaner asks the state API (served
    by the dashboard) whether a trainer's controller has died; without it, the CPUs of a
    trainer killed mid-run (a trial stopped by ASHA) are never given back.
    """
    return {
        # A new instance even when `ray start` runs on this machine: attaching is --address's.
        "address": "local",
        "num_cpus": num_cpus,
        "include_dashboard": True,
        "runtime_env": {
            "worker_process_setup_hook": WORKER_SETUP_HOOK,
            "env_vars": WORKER_ENV | LOCAL_WORKER_ENV,
        },
    }


def cluster_runtime_env() -> dict[str, Any]:
    """The job-level runtime environment of a driver attached to a cluster: quiet workers,
    and the driver's own feature/stand-in cache location when it sets one (workers otherwise
    use their node's ``$EVL_PLATFORM_CACHE``, which cluster.yaml sets on every node)."""
    cache = os.environ.get("EVL_PLATFORM_CACHE")
    return {
        "worker_process_setup_hook": WORKER_SETUP_HOOK,
        "env_vars": WORKER_ENV | ({"EVL_PLATFORM_CACHE": cache} if cache else {}),
    }


class Terminated(KeyboardInterrupt):
    """The driver got SIGTERM (a scheduler's preemption): the work stops as on Ctrl-C."""


EXIT_TERMINATED = 128 + signal.SIGTERM
"""Exit status of a driver stopped by SIGTERM (143, as if the signal had ended it)."""


_sigterm = threading.Event()


def received_sigterm() -> bool:
    """Whether SIGTERM arrived in the last :func:`stop_on_sigterm` block. A blocking
    ``ray.get`` turns whatever its signal check raised into a plain ``KeyboardInterrupt``, so
    the exception alone cannot tell SIGTERM from Ctrl-C."""
    return _sigterm.is_set()


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler: raises :class:`Terminated` in the main thread, once; a second SIGTERM
    during the clean-up that follows is ignored (SIGKILL still ends the process)."""
    _sigterm.set()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(f"signal {signum}")


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) in
    the main thread, so the work stops as it does on Ctrl-C: runs marked KILLED, checkpoints
    kept. The handler in place before is restored at the end. Outside the main thread
    (where Python delivers no signals) it does nothing.

    ``ray.init`` installs its own SIGTERM handlers (``sys.exit`` in a driver, kill every
    local Ray process and exit 1 on a node it started), which left the driver to abort in
    Ray's C++ shutdown: enter this after ``ray.init``.
    """
    with _restored_sigterm_handler() as main_thread:
        if main_thread:
            _sigterm.clear()
            signal.signal(signal.SIGTERM, _raise_terminated)
        yield


@contextlib.contextmanager
def _restored_sigterm_handler() -> Iterator[bool]:
    """Puts back the SIGTERM handler of before the block (``ray.init`` replaces it). Yields
    whether this is the main thread, the only one that can set signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield True
    finally:
        signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


@contextlib.contextmanager
def ray_session(address: str | None = None, *, log_to_driver: bool = True) -> Iterator[bool]:
    """Uses the current Ray connection, attaches to ``address`` (or ``$RAY_ADDRESS``), or
    starts a local instance; what this call started or attached is shut down at the end.
    ``log_to_driver=False`` keeps the workers' output off this console (a sweep prints its
    own progress). Yields whether this call attached to an existing cluster.

    Inside the session SIGTERM stops the work as Ctrl-C does (:func:`stop_on_sigterm`); the
    SIGTERM handler of before the session is back once it ends.
    """
    import ray

    configure_driver()
    if ray.is_initialized():
        with stop_on_sigterm():
            yield False
        return
    with _restored_sigterm_handler():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            runtime_env = cluster_runtime_env()
            ray.init(address=address, log_to_driver=log_to_driver, runtime_env=runtime_env)
        else:
            ray.init(**ray_init_options(), log_to_driver=log_to_driver)
        with stop_on_sigterm():  # over the shutdown too: a second SIGTERM cannot cut it short
            try:
                yield bool(address)
            finally:
                ray.shutdown()


def use_cluster_defaults(attached: bool) -> None:
    """On a cluster just attached to, takes the head node's tracking URI, storage and cache
    for whatever this driver's environment does not set (see :mod:`.cluster`)."""
    if not attached:
        return
    from evl_platform.runtime.cluster import adopt_head_environment

    for key, value in sorted(adopt_head_environment().items()):
        print(f"using the cluster's {key}={value} (from the head node)", flush=True)

"""Ray worker process hooks, kept apart from the session code so that every worker process of a
job (Ray Train's controller and helper actors included) runs them without importing torch or
MLflow."""

import logging


def quiet_ray_workers() -> None:
    """Worker setup hook: keeps Ray Train's per-report INFO lines off the console."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)

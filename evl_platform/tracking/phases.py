"""Where a training's or a sweep's wall time went, phase by phase
(:data:`~evl_platform.tracking.names.TIME_PHASES`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping

from evl_platform.tracking import names


class Clock:
    """Wall seconds per phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(names.TIME_PHASES, 0.0)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the block's wall time to phase ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def add(self, seconds: Mapping[str, float]) -> None:
        """Adds another clock's phases (a trial's, as it reported them)."""
        for name in names.TIME_PHASES:
            self.seconds[name] += float(seconds.get(name, 0.0))


def breakdown(seconds: Mapping[str, float], *, wall: float, trials: int) -> str:
    """The lines a sweep ends with: each phase's seconds summed over its Tune trials (and the
    driver), its share of that sum, and the sweep's wall time."""
    total = sum(seconds.values())
    lines = [
        f"where the time went ({trials} Tune trials, summed; the sweep's wall time "
        f"{wall / 60:.1f} min):"
    ]
    for name, label in names.TIME_PHASES.items():
        value = seconds.get(name, 0.0)
        share = value / total * 100 if total > 0 else 0.0
        lines.append(f"  {label:<20} {value:8.1f} s  {share:5.1f}%")
    lines.append(f"  {'sum':<20} {total:8.1f} s")
    return "\n".join(lines)

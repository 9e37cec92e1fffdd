"""Sparsity schedules R(t): the fraction of prunable weights masked at step t.

All times are fractions of the run (`warmup`, `tau`, `final`), so a shorter run keeps
the same shape. Every schedule is 0 before warmup and exactly the target from `final`
on: the exponential of the thesis only approaches its target, so tapc snaps to it at
`final` and trains the rest of the run with a fixed mask (pure recovery).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence


def dynamic(progress: float, target: float, warmup: float, tau: float, final: float) -> float:
    """Thesis eq. 4.6 without the stability factor: target * (1 - exp(-(t - warmup)/tau))."""
    if progress < warmup:
        return 0.0
    if progress >= final:
        return target
    return target * (1.0 - math.exp(-(progress - warmup) / tau))


def cubic(progress: float, target: float, warmup: float, tau: float, final: float) -> float:
    """Gradual magnitude pruning's cubic ramp (Zhu & Gupta 2017) from warmup to final."""
    if progress < warmup:
        return 0.0
    if progress >= final:
        return target
    return target * (1.0 - (1.0 - (progress - warmup) / (final - warmup)) ** 3)


SCHEDULES: dict[str, Callable[[float, float, float, float, float], float]] = {
    "dynamic": dynamic,
    "cubic": cubic,
}


def get_schedule(name: str):
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None


def stability(losses: Sequence[float], lam: float) -> float:
    """alpha(t) = 1 / (1 + lambda * std/mean) of the recent training loss (thesis eq. 4.7).

    A loss that swings hard (large relative spread) slows pruning down.
    """
    if lam == 0 or len(losses) < 2:
        return 1.0
    mean = statistics.fmean(losses)
    if mean <= 0:
        return 1.0
    return 1.0 / (1.0 + lam * statistics.pstdev(losses) / mean)

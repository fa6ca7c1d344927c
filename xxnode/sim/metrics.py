"""Per-class latency records and their summary (median, p99, mean)."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any


def quantile(sorted_xs, q: float) -> float:
    """Nearest-rank quantile of an already sorted sequence (nan if empty)."""
    n = len(sorted_xs)
    if n == 0:
        return math.nan
    return sorted_xs[min(n - 1, max(0, math.ceil(q * n) - 1))]


@dataclass
class Result:
    """What one simulation run produced."""

    scheduler: str
    class_names: tuple[str, ...]
    load: float
    jobs: int = 0  # jobs generated (simulated)
    events: int = 0
    wall_s: float = 0.0
    sim_end: float = 0.0
    measured: list[int] = field(default_factory=list)  # measured arrivals per class
    response: list[array] = field(default_factory=list)  # per class, finished measured jobs
    slowdown: list[array] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.class_names)
        if not self.measured:
            self.measured = [0] * n
            self.response = [array("d") for _ in range(n)]
            self.slowdown = [array("d") for _ in range(n)]

    def summary(self) -> dict[str, Any]:
        per_class = {}
        for i, name in enumerate(self.class_names):
            r = sorted(self.response[i])
            s = sorted(self.slowdown[i])
            per_class[name] = {
                "measured": self.measured[i],
                "finished": len(r),
                "finished_share": len(r) / self.measured[i] if self.measured[i] else math.nan,
                "response_mean": sum(r) / len(r) if r else math.nan,
                "response_p50": quantile(r, 0.5),
                "response_p99": quantile(r, 0.99),
                "slowdown_mean": sum(s) / len(s) if s else math.nan,
                "slowdown_p50": quantile(s, 0.5),
                "slowdown_p99": quantile(s, 0.99),
            }
        return {
            "scheduler": self.scheduler,
            "load": self.load,
            "jobs": self.jobs,
            "events": self.events,
            "wall_s": self.wall_s,
            "jobs_per_s": self.jobs / self.wall_s if self.wall_s else math.nan,
            "sim_end_s": self.sim_end,
            "classes": per_class,
            **self.extra,
        }

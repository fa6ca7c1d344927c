"""The workload of §4.1, generated lazily and reproducibly from a seed.

Each of ``functions`` functions gets a runtime distribution (Pareto with a fixed
alpha and x_m ~ Normal, or exponential) and a price class drawn from the class
weights independently of its runtime.  Jobs arrive open-loop (Poisson or evenly
spaced), pick a function (uniformly, as in the paper, or by Zipf popularity), draw a runtime from it and a total memory
uniform in [min_mb, max_mb].  All draws come from one ``random.Random(seed)`` in
a fixed order, so every scheduler sees the byte-identical job sequence.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from .config import MB, Config


@dataclass(frozen=True)
class Plan:
    """Derived workload facts the schedulers and figures need."""

    mean_runtime: float  # E[S] over the function mix (analytic)
    rate_steps: tuple[tuple[float, float], ...]  # (start_time, rate) pieces
    end_time: float | None  # last arrival time bound for schedule mode
    jobs: int | None  # job count for the non-schedule mode
    fn_class: tuple[int, ...]  # class rank per function
    fn_param: tuple[float, ...]  # x_m (pareto) or mean (exponential) per function


def _truncnormal(rng: random.Random, mu: float, sd: float, lo: float) -> float:
    if sd == 0:
        return mu
    while True:
        x = rng.gauss(mu, sd)
        if x >= lo:
            return x


def plan(cfg: Config) -> Plan:
    rt, cs, ar, cl = cfg.runtime, cfg.classes, cfg.arrivals, cfg.cluster
    # Function table from its own stream, so it does not depend on the job count.
    frng = random.Random(f"functions:{cfg.seed}")
    cum = list(itertools.accumulate(cs.weights))
    fn_class = []
    fn_param = []
    for _ in range(rt.functions):
        if rt.dist == "pareto":
            fn_param.append(_truncnormal(frng, rt.xm_mean, rt.xm_sd, rt.xm_mean * 0.05))
        else:
            fn_param.append(_truncnormal(frng, rt.mean, rt.mean_sd, rt.mean * 0.05))
        fn_class.append(bisect.bisect_right(cum, frng.random() * cum[-1]))
    if rt.popularity == "zipf":  # E[S] over invocations: weighted by popularity
        w = [(k + 1) ** -rt.zipf_s for k in range(rt.functions)]
        mean_param = sum(x * y for x, y in zip(w, fn_param, strict=True)) / sum(w)
    else:
        mean_param = sum(fn_param) / len(fn_param)
    mean_rt = rt.alpha / (rt.alpha - 1) * mean_param if rt.dist == "pareto" else mean_param
    capacity = cl.machines * cl.cores
    if ar.schedule is not None:
        steps, t = [], 0.0
        for dur, load in ar.schedule:
            steps.append((t, load * capacity / mean_rt))
            t += dur
        return Plan(mean_rt, tuple(steps), t, None, tuple(fn_class), tuple(fn_param))
    rate = ar.rate if ar.rate is not None else ar.load * capacity / mean_rt
    return Plan(mean_rt, ((0.0, rate),), None, ar.jobs, tuple(fn_class), tuple(fn_param))


def window(cfg: Config, p: Plan) -> tuple[int, float, float]:
    """(first, end) measured job index (end -1: no bound), and the measured time span."""
    ar = cfg.arrivals
    if p.jobs is not None:
        lo = int(ar.warmup * p.jobs)
        hi = p.jobs - int(ar.cooldown * p.jobs)
        return lo, hi, 0.0, math.inf
    return 0, -1, ar.warmup * p.end_time, (1.0 - ar.cooldown) * p.end_time


def offered_load(cfg: Config, p: Plan) -> float:
    return p.rate_steps[0][1] * p.mean_runtime / (cfg.cluster.machines * cfg.cluster.cores)


def jobs(cfg: Config, p: Plan) -> Iterator[tuple[float, float, int, float, int]]:
    """Yield (arrival_time, runtime_s, class_rank, total_mem_bytes, function) in arrival order.

    Zipf popularity takes the same single draw per job as uniform, so the rest of the
    stream (runtimes, classes, memory) is drawn in the same order either way."""
    rng = random.Random(cfg.seed)
    r = rng.random
    pareto = cfg.runtime.dist == "pareto"
    inv_alpha = 1.0 / cfg.runtime.alpha
    fn_class, fn_param = p.fn_class, p.fn_param
    nfn = len(fn_param)
    zipf = None
    if cfg.runtime.popularity == "zipf":
        zipf = list(itertools.accumulate((k + 1) ** -cfg.runtime.zipf_s for k in range(nfn)))
        zipf_total = zipf[-1]
        bisect_right = bisect.bisect_right
    per_job = cfg.classes.per == "job"
    cum = list(itertools.accumulate(cfg.classes.weights))
    total_w = cum[-1]
    mem_lo = cfg.memory.min_mb * MB
    mem_span = (cfg.memory.max_mb - cfg.memory.min_mb) * MB
    poisson = cfg.arrivals.process == "poisson"
    steps = p.rate_steps
    si = 0
    rate = steps[0][1]
    next_change = steps[1][0] if len(steps) > 1 else math.inf
    end = p.end_time if p.end_time is not None else math.inf
    remaining = p.jobs if p.jobs is not None else -1
    log = math.log
    t = 0.0
    while remaining != 0:
        # Memorylessness makes restarting the gap at a rate change exact for Poisson.
        gap = -log(1.0 - r()) / rate if poisson else 1.0 / rate
        while t + gap >= next_change:
            t = next_change
            si += 1
            rate = steps[si][1]
            next_change = steps[si + 1][0] if si + 1 < len(steps) else math.inf
            gap = -log(1.0 - r()) / rate if poisson else 1.0 / rate
        t += gap
        if t >= end:
            return
        if zipf is None:
            f = int(r() * nfn)
        else:
            f = min(bisect_right(zipf, r() * zipf_total), nfn - 1)
        if pareto:
            runtime = fn_param[f] * (1.0 - r()) ** -inv_alpha
        else:
            runtime = -log(1.0 - r()) * fn_param[f] or 1e-12  # a 0 draw would break slowdown
        rank = bisect.bisect_right(cum, r() * total_w) if per_job else fn_class[f]
        yield t, runtime, rank, mem_lo + r() * mem_span, f
        remaining -= 1

"""Denial of wallet in simulation: several tenants on one XX cluster over a (scaled) month,
one of them attacked, with and without the monthly budget policy (paper §3.1,
``xxnode.policy.budget``).

Tenants and their work:

- ``others`` well-behaved tenants, each with high-class and low-class functions at steady
  (Poisson) rates;
- one *attacked* tenant with high-class functions at a small rate, which jumps to
  ``attack_factor`` x that rate between month fractions ``attack_start`` and
  ``attack_end``: a denial-of-wallet burst (someone floods its public endpoint).

Every tenant has a monthly budget of ``headroom`` x what its normal rate costs in a month.
Billing is CPU-seconds x the price of the class the invocation *ran* in (the classes and
prices of the shipped default config, ``xxnode/config/default.toml``: low 0.5, medium 1.5,
high 2.0 µ¢ per CPU-second).  Spend is what finished invocations recorded -- the ledger
sees an invocation when it ends, so queued and running work is in flight, not yet spent.

With the policy on, every arrival asks ``budget.decide`` with its tenant's spend so far,
the month fraction and the tenant's previous state, exactly as a gateway does: normal ->
the function's own class; degrade -> the cheapest class; throttle -> refused (a 429 with
Retry-After; here a dropped arrival, counted).  The flood does not obey Retry-After.

Three scenarios on the same seed (so the well-behaved tenants' invocations are
byte-identical in all three): ``a`` no attack (policy on: it must touch no one), ``b``
the attack with no budget policy, ``c`` the attack with the policy.

Each invocation stream is the simulator's own workload (``workload.jobs``: Pareto runtimes,
per-function x_m, Poisson arrivals, piecewise-constant rate) for one tenant and class, with
its own seed; the streams are merged and run by ``xx.run`` through its arrival and finish
hooks, so placement, queues and preemption are the XX policy code as everywhere else.
Placement is power-of-k (memory is not modelled, so the memory-driven idle list is off,
as in §4.2).
"""

from __future__ import annotations

import heapq
import math
import time
from array import array
from dataclasses import dataclass, field, replace
from typing import Any

from xxnode.policy.budget import DEGRADE, NORMAL, RULE, THROTTLE, BudgetRule, decide

from . import xx
from .config import Arrivals, Classes, Cluster, Config, Runtime, Scheduler
from .metrics import quantile
from .workload import jobs as gen_jobs
from .workload import plan

SCENARIOS = {  # name: (attack, budget policy)
    "a": (False, True),
    "b": (True, False),
    "c": (True, True),
}
LABELS = {
    "a": "a: no attack",
    "b": "b: attack, no budget policy",
    "c": "c: attack, budget policy",
}


def _default_classes() -> Classes:
    """The shipped classes (default.toml), lowest first, as the simulator orders them."""
    from xxnode.config.defaults import builtin_classes

    cs = sorted(builtin_classes(), key=lambda c: c.rank)
    return Classes(
        names=tuple(c.name for c in cs),
        prices=tuple(c.price for c in cs),
        weights=(1.0,) * len(cs),
    )


@dataclass(frozen=True)
class DowConfig:
    seed: int = 1
    month_s: float = 7200.0  # the scaled month: 2 simulated hours
    cluster: Cluster = field(default_factory=Cluster)  # the paper's: 100 x 8 cores, 4 shards, k=3
    # The paper's runtime shape (Pareto alpha 2.5, x_m ~ Normal), 10x longer (mean ~1.7 s),
    # so that a month of hours on the paper's cluster is ~1.7M invocations, not 17M.
    runtime: Runtime = field(default_factory=lambda: Runtime(xm_mean=1.0, xm_sd=0.3))
    classes: Classes = field(default_factory=_default_classes)
    others: int = 4  # well-behaved tenants
    other_high_load: float = 0.05  # each: offered load (share of the cluster) in high class
    other_low_load: float = 0.07  # each: in the cheapest class
    functions_per_stream: int = 20  # functions per tenant and class
    attacked_load: float = 0.01  # the attacked tenant's normal load, all high class
    attack_factor: float = 100.0
    attack_start: float = 0.30  # month fractions
    attack_end: float = 0.45
    headroom: float = 1.5  # budget = headroom x the normal rate's monthly cost
    rule: BudgetRule = RULE
    samples: int = 240  # spend samples over the month
    drain: float = 0.1  # keep simulating this share of the month after it ends


@dataclass(frozen=True)
class _Stream:
    tenant: int
    rank: int  # the class of all its functions
    schedule: tuple[tuple[float, float], ...]  # (duration_s, load)
    seed: int


def _streams(dc: DowConfig, attack: bool) -> list[_Stream]:
    m = dc.month_s
    top, low = len(dc.classes.names) - 1, 0
    out = []
    for t in range(dc.others):
        out.append(_Stream(t, top, ((m, dc.other_high_load),), dc.seed * 1009 + 2 * t))
        out.append(_Stream(t, low, ((m, dc.other_low_load),), dc.seed * 1009 + 2 * t + 1))
    n, a0, a1 = dc.attacked_load, dc.attack_start * m, dc.attack_end * m
    sched = ((a0, n), (a1 - a0, n * dc.attack_factor), (m - a1, n)) if attack else ((m, n),)
    # the attacked tenant's stream has the same seed in every scenario: identical up to
    # the attack
    out.append(_Stream(dc.others, top, sched, dc.seed * 1009 + 999))
    return out


def _stream_cfg(dc: DowConfig, s: _Stream) -> Config:
    w = [0.0] * len(dc.classes.names)
    w[s.rank] = 1.0
    return Config(
        seed=s.seed,
        cluster=dc.cluster,
        runtime=replace(dc.runtime, functions=dc.functions_per_stream),
        classes=replace(dc.classes, weights=tuple(w)),
        arrivals=Arrivals(schedule=s.schedule, warmup=0.0, cooldown=0.0),
    )


def _offset(gen, off: int):
    for t, runtime, rank, mem, f in gen:
        yield t, runtime, rank, mem, f + off


def _pct(xs) -> dict[str, float]:
    s = sorted(xs)
    return {
        "n": len(s),
        "p50": quantile(s, 0.5),
        "p99": quantile(s, 0.99),
        "mean": sum(s) / len(s) if s else math.nan,
    }


def run(dc: DowConfig, scenario: str) -> dict[str, Any]:
    """One scenario ('a', 'b' or 'c'); a JSON-able summary."""
    t_wall = time.perf_counter()
    attack, policy = SCENARIOS[scenario]
    M = dc.month_s
    prices = dc.classes.prices
    capacity = dc.cluster.machines * dc.cluster.cores
    ntenants = dc.others + 1
    att = dc.others
    streams = _streams(dc, attack)

    gens, fn_tenant, fn_class = [], [], []
    normal_cost = [0.0] * ntenants  # what the normal rate costs in a month
    for s in streams:
        cfg = _stream_cfg(dc, s)
        normal_load = s.schedule[0][1]
        normal_cost[s.tenant] += normal_load * capacity * M * prices[s.rank]
        gens.append(_offset(gen_jobs(cfg, plan(cfg)), len(fn_tenant)))
        fn_tenant += [s.tenant] * cfg.runtime.functions
        fn_class += [s.rank] * cfg.runtime.functions
    budget = [dc.headroom * c for c in normal_cost]

    spend = [0.0] * ntenants  # billed: finished invocations
    state = [NORMAL] * ntenants
    arrivals = [0] * ntenants
    degraded = [0] * ntenants
    throttled = [0] * ntenants
    transitions = [0] * ntenants
    in_flight = [0, 0]  # the attacked tenant's admitted, unfinished invocations: now, max
    after = {DEGRADE: 0, THROTTLE: 0}  # attacked tenant, arrivals after the attack ended
    first = {DEGRADE: None, THROTTLE: None}  # month fraction the attacked tenant first hit
    warned: dict[float, float] = {}  # attacked tenant: warn level -> month fraction
    retry = []  # Retry-After values the attacked tenant got (s)
    dt = M / dc.samples
    series_t: list[float] = []
    series_spend: list[list[float]] = []  # per sample: every tenant's spend
    series_state: list[str] = []  # the attacked tenant's state at each sample
    next_sample = [0.0]
    spend_at_end = [None]
    rule = dc.rule
    cheapest = 0
    a0, a1 = dc.attack_start * M, dc.attack_end * M
    settled = a0 + 0.01 * M  # the burst's first 1% of the month: before the policy bites

    def sample(now):
        while next_sample[0] <= now and next_sample[0] <= M + 1e-9:
            series_t.append(next_sample[0])
            series_spend.append(list(spend))
            series_state.append(state[att])
            next_sample[0] += dt

    def admitted(t):
        if t == att:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])

    def on_arrival(now, fn, rank):
        if now >= next_sample[0]:
            sample(now)
        t = fn_tenant[fn]
        arrivals[t] += 1
        if not policy:
            admitted(t)
            return rank
        d = decide(spend[t], budget[t], now / M, state[t], rule, M)
        if d.state != state[t]:
            transitions[t] += 1
            if t == att and first.get(d.state, 0) is None:
                first[d.state] = now / M
            state[t] = d.state
        if t == att:
            for w in d.warnings:
                warned.setdefault(w, now / M)
            if d.state != NORMAL and now >= a1:
                after[d.state] += 1
        if d.state == NORMAL:
            admitted(t)
            return rank
        if d.state == DEGRADE:
            degraded[t] += 1
            admitted(t)
            return cheapest
        throttled[t] += 1
        if t == att:
            retry.append(d.retry_after)
        return None

    lat = {
        key: array("d")
        for key in (
            "others_high",
            "others_low",
            "others_high_attack",
            "others_low_attack",
            "others_high_settled",
        )
    }
    slow_high = array("d")
    att_lat = array("d")

    def on_finish(j, now):
        t = fn_tenant[j.fn]
        if now > M and spend_at_end[0] is None:
            sample(M)
            spend_at_end[0] = list(spend)
        spend[t] += j.runtime * prices[j.rank]
        r = now - j.arrival
        if t == att:
            att_lat.append(r)
            in_flight[0] -= 1
            return
        during = a0 <= j.arrival < a1
        if fn_class[j.fn] == cheapest:
            lat["others_low"].append(r)
            if during:
                lat["others_low_attack"].append(r)
        else:
            lat["others_high"].append(r)
            slow_high.append(r / j.runtime)
            if during:
                lat["others_high_attack"].append(r)
                if j.arrival >= settled:
                    lat["others_high_settled"].append(r)

    total_load = sum(s.schedule[0][1] for s in streams)
    sim_cfg = Config(
        seed=dc.seed,
        cluster=dc.cluster,
        runtime=dc.runtime,
        classes=dc.classes,
        arrivals=Arrivals(schedule=((M, total_load),), warmup=0.0, cooldown=0.0, drain=dc.drain),
        scheduler=Scheduler(name="xx", idle_list=False),
    )
    res = xx.run(sim_cfg, heapq.merge(*gens), on_arrival, on_finish)
    sample(M)
    if spend_at_end[0] is None:
        spend_at_end[0] = list(spend)

    r = dc.rule
    bound = budget[att] * (1.0 + r.burst + r.throttle_margin)
    # the attacked tenant's billed spend against its lines, over the month
    over_pace = over_throttle = -math.inf
    for t, sp in zip(series_t, series_spend, strict=True):
        f = t / M
        over_pace = max(over_pace, (sp[att] - budget[att] * (f + r.burst)) / budget[att])
        over_throttle = max(
            over_throttle,
            (sp[att] - budget[att] * (f + r.burst + r.throttle_margin)) / budget[att],
        )
    others = range(dc.others)
    return {
        "scenario": scenario,
        "label": LABELS[scenario],
        "attack": attack,
        "policy": policy,
        "seed": dc.seed,
        "month_s": M,
        "rule": {
            "burst": r.burst,
            "throttle_margin": r.throttle_margin,
            "hysteresis": r.hysteresis,
            "warn_at": list(r.warn_at),
        },
        "budget": budget,
        "attacked": {
            "budget": budget[att],
            "normal_cost": normal_cost[att],
            "spend_at_month_end": spend_at_end[0][att],
            "spend_total": spend[att],  # incl. in-flight work that finished after the month
            "spend_over_budget": spend_at_end[0][att] / budget[att],
            "bound": bound,  # B * (1 + burst + throttle_margin)
            "max_over_degrade_line": over_pace,  # in units of B
            "max_over_throttle_line": over_throttle,
            "arrivals": arrivals[att],
            "degraded": degraded[att],
            "throttled": throttled[att],
            "transitions": transitions[att],
            "degraded_after_attack": after[DEGRADE],
            "throttled_after_attack": after[THROTTLE],
            "max_in_flight": in_flight[1],
            "first_degrade_f": first[DEGRADE],
            "first_throttle_f": first[THROTTLE],
            "warned_f": {str(k): v for k, v in sorted(warned.items())},
            "retry_after_s": {"min": min(retry), "max": max(retry)} if retry else None,
            "latency": _pct(att_lat),
        },
        "others": {
            "spend_over_budget": [spend_at_end[0][t] / budget[t] for t in others],
            "degraded": sum(degraded[t] for t in others),
            "throttled": sum(throttled[t] for t in others),
            "arrivals": sum(arrivals[t] for t in others),
            "high": _pct(lat["others_high"]),
            "high_slowdown": _pct(slow_high),
            "high_during_attack": _pct(lat["others_high_attack"]),
            "high_during_attack_settled": _pct(lat["others_high_settled"]),
            "low": _pct(lat["others_low"]),
            "low_during_attack": _pct(lat["others_low_attack"]),
        },
        "series": {
            "t": series_t,
            "attacked_spend": [sp[att] for sp in series_spend],
            "attacked_state": series_state,
        },
        "jobs_simulated": res.jobs,
        "unfinished_jobs": res.extra["unfinished_jobs"],
        "wall_s": time.perf_counter() - t_wall,
    }


def run_all(dc: DowConfig, scenarios=tuple(SCENARIOS), workers: int = 1) -> dict[str, dict]:
    """Every scenario on the same seed; ``workers`` > 1 runs them in parallel processes."""
    if workers <= 1:
        return {s: run(dc, s) for s in scenarios}
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(workers, len(scenarios))) as ex:
        futs = {s: ex.submit(run, dc, s) for s in scenarios}
        return {s: f.result() for s, f in futs.items()}

"""The ideal baseline (§4.2): global preemptive earliest-deadline-first over all
cores as one pool, with perfect knowledge of each job's true runtime.

deadline = arrival + runtime * maxPrice / price, so the top class's relative
deadline is its runtime and cheaper classes get proportionally more slack.
Placement, communication and memory are free: this is the bound, not a design.
"""

from __future__ import annotations

import heapq
import math
import time

from .config import Config
from .metrics import Result
from .workload import jobs as gen_jobs
from .workload import offered_load, plan, window


def run(cfg: Config) -> Result:
    t_wall = time.perf_counter()
    p = plan(cfg)
    names = cfg.classes.names
    prices = cfg.classes.prices
    slack = [max(prices) / pr for pr in prices]
    res = Result("edf", names, offered_load(cfg, p))
    ncores = cfg.cluster.machines * cfg.cluster.cores
    free = ncores
    # A job is a list [deadline, seq, rem, seg_start, tok, arrival, runtime, rank, meas].
    waiting: list = []  # min-heap by deadline
    running: list = []  # max-heap by deadline: (-deadline, -seq, job, tok); lazy deletion
    events_heap: list = []  # (finish_time, seq, job, tok)
    push, pop = heapq.heappush, heapq.heappop
    seq = 0
    events = 0
    resp, slow, measured = res.response, res.slowdown, res.measured

    def start(job, now):
        nonlocal seq
        job[4] += 1
        job[3] = now
        seq += 1
        push(running, (-job[0], -job[1], job, job[4]))
        push(events_heap, (now + job[2], seq, job, job[4]))

    arrivals = gen_jobs(cfg, p)
    lo_j, hi_j, lo_t, hi_t = window(cfg, p)
    nxt = next(arrivals, None)
    jid = 0
    cutoff = math.inf
    now = 0.0
    preemptions = 0
    while True:
        if nxt is not None and (not events_heap or nxt[0] <= events_heap[0][0]):
            now, runtime, rank, _mem, _fn = nxt
            meas = lo_j <= jid and (jid < hi_j or hi_j < 0) and lo_t <= now < hi_t
            if meas:
                measured[rank] += 1
            job = [now + runtime * slack[rank], jid, runtime, -1.0, 0, now, runtime, rank, meas]
            jid += 1
            if free:
                free -= 1
                start(job, now)
            else:
                while running[0][3] != running[0][2][4]:  # drop stale entries
                    pop(running)
                victim = running[0][2]
                if job[0] < victim[0]:
                    pop(running)
                    preemptions += 1
                    victim[2] -= now - victim[3]
                    victim[4] += 1  # its FINISH event is now stale
                    push(waiting, (victim[0], victim[1], victim))
                    start(job, now)
                else:
                    push(waiting, (job[0], job[1], job))
            nxt = next(arrivals, None)
            if nxt is None:
                cutoff = now * (1.0 + cfg.arrivals.drain)
            continue
        if not events_heap:
            break
        now, _, job, tok = pop(events_heap)
        if now > cutoff:
            break
        if tok != job[4]:
            continue
        events += 1
        job[4] += 1  # its entry in ``running`` is now stale
        if job[8]:
            r = now - job[5]
            resp[job[7]].append(r)
            slow[job[7]].append(r / job[6])
        if waiting:
            start(pop(waiting)[2], now)
        else:
            free += 1
        if len(running) > 4 * ncores:  # finished jobs' stale entries: compact
            running[:] = [e for e in running if e[3] == e[2][4]]
            heapq.heapify(running)
    res.jobs = jid
    res.events = events + jid
    res.sim_end = now
    res.extra["unfinished_jobs"] = len(waiting) + (cfg.cluster.machines * cfg.cluster.cores - free)
    res.extra["preemptions"] = preemptions
    res.wall_s = time.perf_counter() - t_wall
    return res

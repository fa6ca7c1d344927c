"""Hermod as the paper simulates it (§4.2): least-loaded over power-of-k probes,
early binding to a machine, processor sharing on the machine, class ignored.

Processor sharing on c cores with n jobs gives each job rate min(1, c/n).  Each
machine keeps a virtual clock V (service each of its jobs has received since an
arbitrary origin); a job finishes when V reaches its V-at-arrival plus its size,
so only the machine's next completion needs an event.
"""

from __future__ import annotations

import heapq
import math
import random
import time

from xxnode.policy.probe import least_loaded, sample

from .config import Config
from .metrics import Result
from .workload import jobs as gen_jobs
from .workload import offered_load, plan, window


class PSMachine:
    __slots__ = ("v", "last", "n", "rate", "jobs", "ver", "cores")

    def __init__(self, cores):
        self.v = 0.0
        self.last = 0.0
        self.n = 0
        self.rate = 1.0
        self.jobs = []  # heap of (v_finish, seq, arrival, runtime, rank, measured)
        self.ver = 0
        self.cores = cores


def run(cfg: Config) -> Result:
    t_wall = time.perf_counter()
    p = plan(cfg)
    cl = cfg.cluster
    names = cfg.classes.names
    res = Result("hermod", names, offered_load(cfg, p))
    rng = random.Random(f"hermod:{cfg.seed}")
    machines = [PSMachine(cl.cores) for _ in range(cl.machines)]
    nm, k, cores = cl.machines, cl.k, cl.cores
    heap: list = []
    push, pop = heapq.heappush, heapq.heappop
    seq = 0
    events = 0
    resp, slow, measured = res.response, res.slowdown, res.measured

    def n_of(i):
        return machines[i].n

    arrivals = gen_jobs(cfg, p)
    lo_j, hi_j, lo_t, hi_t = window(cfg, p)
    nxt = next(arrivals, None)
    jid = 0
    cutoff = math.inf
    now = 0.0
    while True:
        if nxt is not None and (not heap or nxt[0] <= heap[0][0]):
            now, runtime, rank, _mem, _fn = nxt
            meas = lo_j <= jid and (jid < hi_j or hi_j < 0) and lo_t <= now < hi_t
            if meas:
                measured[rank] += 1
            jid += 1
            m = machines[least_loaded(sample(nm, k, rng), n_of)]
            if m.n:
                m.v += (now - m.last) * m.rate
            m.last = now
            seq += 1
            heapq.heappush(m.jobs, (m.v + runtime, seq, now, runtime, rank, meas))
            m.n += 1
            m.rate = 1.0 if m.n <= cores else cores / m.n
            m.ver += 1
            push(heap, (now + (m.jobs[0][0] - m.v) / m.rate, seq, m, m.ver))
            nxt = next(arrivals, None)
            if nxt is None:
                cutoff = now * (1.0 + cfg.arrivals.drain)
            continue
        if not heap:
            break
        now, _, m, ver = pop(heap)
        if now > cutoff:
            break
        if ver != m.ver:
            continue
        events += 1
        m.v += (now - m.last) * m.rate
        m.last = now
        mj = m.jobs
        eps = 1e-9 * (1.0 + abs(m.v))
        while mj and mj[0][0] <= m.v + eps:
            _, _, arr, runtime, rank, meas = heapq.heappop(mj)
            m.n -= 1
            if meas:
                r = now - arr
                resp[rank].append(r)
                slow[rank].append(r / runtime)
        if m.n:
            m.rate = 1.0 if m.n <= cores else cores / m.n
            m.ver += 1
            seq += 1
            push(heap, (now + (mj[0][0] - m.v) / m.rate, seq, m, m.ver))
    res.jobs = jid
    res.events = events + jid
    res.sim_end = now
    res.extra["unfinished_jobs"] = sum(m.n for m in machines)
    res.wall_s = time.perf_counter() - t_wall
    return res

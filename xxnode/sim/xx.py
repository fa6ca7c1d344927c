"""XX in simulation: shards with a per-class multi-queue, idle list or power-of-k
placement, machines with preemptive priority (FIFO within a class), and, when
memory is limited, class-based swapping (§3.2, §4.3), and with ``warm.enabled``
warm execution environments per machine and function (``warm``: keep-alive, idle
cap, reuse and memory victims by ``xxnode.policy.warm_pool``, as on the node).

Every decision is made by ``xxnode.policy``; this module only keeps time, moves
jobs and keeps books.  Swap time is not simulated (§4.1 assumption 3); the
bytes swapped out and in are tracked.
"""

from __future__ import annotations

import heapq
import math
import random
import time

from xxnode.policy.dispatcher import LEAVE, IdleParams, Listing, choose_shard, idle_action
from xxnode.policy.idle_list import IdleList
from xxnode.policy.multiqueue import MultiQueue
from xxnode.policy.node_queue import NodeQueue
from xxnode.policy.probe import least_loaded, sample
from xxnode.policy.swap_victims import JobMemory, choose_victims

from . import warm as warm_envs
from .config import GB, MB, Config
from .metrics import Result
from .workload import jobs as gen_jobs
from .workload import offered_load, plan, window

FINISH, TICK, SHARD_DONE, KEEPALIVE = 0, 1, 2, 3


class SimJob:
    """One simulated invocation, mutable as the event loop moves it (slots: millions of them)."""

    __slots__ = (
        "id",
        "rank",
        "cls",
        "arrival",
        "runtime",
        "mem",
        "rem",
        "tok",
        "seg",
        "meas",
        "swapped",
        "m",
        "fn",
        "env",
        "cold",
    )

    def __init__(self, jid, rank, cls, arrival, runtime, mem, meas, fn):
        self.id = jid
        self.rank = rank
        self.cls = cls
        self.arrival = arrival
        self.runtime = runtime
        self.mem = mem
        self.rem = runtime  # work left at the start of the current run segment
        self.tok = 0  # bumps on every start/preempt: stale FINISH events are skipped
        self.seg = -1.0  # start of the current run segment, -1 when not running
        self.meas = meas
        self.swapped = 0.0
        self.m = None
        self.fn = fn
        self.env = None  # its environment's id (warm mode)
        self.cold = 0.0  # cold start (s) added to its work, 0.0 when it ran warm


class Machine:
    __slots__ = (
        "idx", "free", "running", "q", "njobs", "jobs", "listing", "free_mem",
        "swap_out", "swap_in", "swapped_now", "first_swap_util", "envs",
    )  # fmt: skip

    def __init__(self, idx, cores, ranks, cap):
        self.idx = idx
        self.free = cores
        self.running = []
        self.q = NodeQueue(ranks)
        self.njobs = 0  # running + waiting: what a probe reports
        self.jobs = {}  # every job on the machine, insertion-ordered (memory mode only)
        self.listing = None  # dispatcher.Listing while on a shard's idle list
        self.free_mem = cap
        self.swap_out = 0.0
        self.swap_in = 0.0
        self.swapped_now = 0.0
        self.first_swap_util = None
        self.envs = None  # warm.MachineEnvs in warm mode


def run(cfg: Config, stream=None, on_arrival=None, on_finish=None) -> Result:
    """Simulate XX on ``cfg``'s workload.  Hooks for experiments built on this loop (the
    denial-of-wallet run in ``dow``), all optional: ``stream`` replaces the workload's job
    iterator (the same tuples, in arrival order); ``on_arrival(now, fn, rank)`` returns the
    class rank the job runs in, or None to drop it before it reaches a shard; and
    ``on_finish(job, now)`` is called as each job finishes."""
    t_wall = time.perf_counter()
    p = plan(cfg)
    cl, sc, cs = cfg.cluster, cfg.scheduler, cfg.classes
    names = cs.names
    ranks = {n: i for i, n in enumerate(names)}
    top_rank = len(names) - 1
    res = Result("xx", names, offered_load(cfg, p))
    rng = random.Random(f"xx:{cfg.seed}")
    mem_mode = cl.memory_gb is not None
    cap = cl.memory_gb * GB if mem_mode else 1.0
    init_mem = cfg.memory.initial_mb * MB
    machines = [Machine(i, cl.cores, ranks, cap) for i in range(cl.machines)]
    nm, ns, k = cl.machines, cl.shards, cl.k
    weights = dict(zip(names, cs.prices, strict=True))
    shards = [MultiQueue(ranks, sc.head_policy, weights) for _ in range(ns)]
    idles = [IdleList() for _ in range(ns)]
    shard_busy = [None] * ns  # job being placed when place_time > 0
    use_idle = sc.idle_list
    ip = IdleParams()
    heap: list = []
    push, pop = heapq.heappush, heapq.heappop
    seq = 0
    events = 0
    resp, slow = res.response, res.slowdown
    swap_class = [0.0] * len(names)
    swap_running = [0.0]  # bytes taken from jobs holding a core (they fault straight back)
    samples: list = []  # (t, [util per machine], [swap_out per machine])
    warm_mode = cfg.warm.enabled
    if warm_mode:
        wp = warm_envs.params(cfg)
        wstats = warm_envs.Stats()

        def schedule(envs, when, fn, token):
            nonlocal seq
            seq += 1
            push(heap, (when, seq, KEEPALIVE, envs, (fn, token)))

        for m in machines:
            m.envs = warm_envs.MachineEnvs(f"m{m.idx}", wp, wstats, schedule)
    cold_meas = [0] * len(names)  # measured jobs that paid a cold start, per class
    warm_meas = [0] * len(names)
    cold_paid = [0.0]  # seconds of cold start paid by measured jobs

    def njobs_of(i):
        return machines[i].njobs

    def start(j, m, now):
        nonlocal seq
        if j.swapped:  # swap back in when it is about to run (§3.2)
            m.swap_in += j.swapped
            m.swapped_now -= j.swapped
            j.swapped = 0.0
        j.tok += 1
        j.seg = now
        m.running.append(j)
        seq += 1
        push(heap, (now + j.rem, seq, FINISH, j, j.tok))

    preemptions = 0

    def admit(j, m, now):
        nonlocal preemptions
        j.m = m
        m.njobs += 1
        if warm_mode:
            j.env, is_cold, cold = m.envs.acquire(j.fn, now)
            if cold:
                j.cold = cold
                j.rem += cold
            if j.meas:
                if is_cold:
                    cold_meas[j.rank] += 1
                    cold_paid[0] += cold
                else:
                    warm_meas[j.rank] += 1
        if mem_mode:
            m.jobs[j] = None
        if m.free:
            m.free -= 1
            start(j, m, now)
            return
        low = m.running[0]
        for r in m.running:  # lowest class; among equals, the latest started
            if r.rank < low.rank or (r.rank == low.rank and r.seg > low.seg):
                low = r
        if low.rank < j.rank:
            preemptions += 1
            low.rem -= now - low.seg
            low.tok += 1
            low.seg = -1.0
            m.running.remove(low)
            m.q.push_front(low, low.cls, now)  # SCHED_FIFO: preempted goes to its head
            start(j, m, now)
        else:
            m.q.push(j, j.cls, now)

    def dispatcher(m):
        """The node's idle-list bookkeeping, using its last measured free memory."""
        lst = m.listing
        if lst is not None:
            e = idles[lst.shard].entry(m.idx)
            lst = Listing(lst.shard, lst.free_bytes, e[1])
        act = idle_action(lst, m.free_mem, cap, m.njobs, ip)
        if act is None:
            return
        if act == LEAVE:
            idles[lst.shard].remove(m.idx)
            m.listing = None
            return
        if lst is None:  # JOIN: power-of-k over shards' idle-list lengths
            s = choose_shard([(s, len(idles[s])) for s in sample(ns, k, rng)])
        else:
            s = lst.shard
        idles[s].upsert(m.idx, m.free_mem, m.njobs)
        m.listing = Listing(s, m.free_mem, m.njobs)

    def place(j, s, now):
        idle = idles[s]
        if use_idle and len(idle):
            i = idle.choose()
            idle.note_placed(i, init_mem if mem_mode else 0)
        else:
            i = least_loaded(sample(nm, k, rng), njobs_of)
        m = machines[i]
        admit(j, m, now)
        if use_idle:
            dispatcher(m)

    def footprint(j, now):
        done = j.runtime - (j.rem - (now - j.seg) if j.seg >= 0 else j.rem)
        if j.cold:  # rem includes the cold start, which comes first and grows no memory
            done = max(0.0, done)
        return init_mem + (j.mem - init_mem) * (done / j.runtime)

    next_sample = 0.0

    def tick(now):
        """Memory manager on every machine: measure, swap lowest classes, re-announce."""
        nonlocal next_sample
        want_sample = now >= next_sample
        if want_sample:
            next_sample += sc.sample_every
            utils = []
        for m in machines:
            used = 0.0
            for j in m.jobs:
                used += footprint(j, now) - j.swapped
            if used > sc.swap_high * cap:
                if m.first_swap_util is None:
                    m.first_swap_util = used / cap
                jm = [
                    JobMemory(
                        j.id, j.rank, j.seg >= 0, int(footprint(j, now) - j.swapped), j.arrival
                    )
                    for j in m.jobs
                ]
                byid = {j.id: j for j in m.jobs}
                for jid, nbytes in choose_victims(jm, int(used - sc.swap_target * cap), top_rank):
                    v = byid[jid]
                    v.swapped += nbytes
                    m.swap_out += nbytes
                    m.swapped_now += nbytes
                    swap_class[v.rank] += nbytes
                    if v.seg >= 0:
                        swap_running[0] += nbytes
                    used -= nbytes
            # Swapped-out memory is demand that comes back when its job runs: a machine
            # holding it is not idle, or the idle list would steer new jobs onto it.
            m.free_mem = cap - used - m.swapped_now
            if use_idle:
                dispatcher(m)
            if want_sample:
                utils.append(used / cap)
        if want_sample:
            samples.append((now, utils, [m.swap_out for m in machines]))

    arrivals = gen_jobs(cfg, p) if stream is None else iter(stream)
    lo_j, hi_j, lo_t, hi_t = window(cfg, p)
    nxt = next(arrivals, None)
    jid = 0
    last_arrival = 0.0
    place_time = sc.place_time
    if mem_mode:
        push(heap, (0.0, 0, TICK, None, None))
    cutoff = math.inf
    measured = res.measured
    while True:
        if nxt is not None and (not heap or nxt[0] <= heap[0][0]):
            now, runtime, rank, mem, fn = nxt
            if on_arrival is not None and (rank := on_arrival(now, fn, rank)) is None:
                last_arrival = now  # dropped: never placed, never measured
                nxt = next(arrivals, None)
                if nxt is None:
                    cutoff = last_arrival * (1.0 + cfg.arrivals.drain)
                continue
            meas = lo_j <= jid and (jid < hi_j or hi_j < 0) and lo_t <= now < hi_t
            j = SimJob(jid, rank, names[rank], now, runtime, mem, meas, fn)
            if meas:
                measured[rank] += 1
            jid += 1
            last_arrival = now
            s = int(rng.random() * ns)  # the load balancer in front of the shards
            if place_time == 0.0:  # instant placement: the queue holds only this job
                shards[s].push(j, j.cls, now)
                place(shards[s].pop_next(now)[0], s, now)
            else:
                shards[s].push(j, j.cls, now)
                if shard_busy[s] is None:
                    shard_busy[s] = shards[s].pop_next(now)[0]
                    seq += 1
                    push(heap, (now + place_time, seq, SHARD_DONE, s, None))
            nxt = next(arrivals, None)
            if nxt is None:
                cutoff = last_arrival * (1.0 + cfg.arrivals.drain)
            continue
        if not heap:
            break
        now, _, kind, j, tok = pop(heap)
        if now > cutoff:
            break
        events += 1
        if kind == FINISH:
            if tok != j.tok:
                continue
            m = j.m
            m.running.remove(j)
            m.njobs -= 1
            if mem_mode:
                del m.jobs[j]
            j.seg = -1.0
            if warm_mode:
                m.envs.release(j.fn, j.env, now)
            if on_finish is not None:
                on_finish(j, now)
            if j.meas:
                r = now - j.arrival
                resp[j.rank].append(r)
                slow[j.rank].append(r / j.runtime)
            nq = m.q.pop_next()
            if nq is None:
                m.free += 1
            else:
                start(nq[0], m, now)
            if use_idle:
                dispatcher(m)
        elif kind == KEEPALIVE:
            j.deadline(tok[0], tok[1], now)
        elif kind == TICK:
            tick(now)
            if nxt is not None or any(m.njobs for m in machines):
                seq += 1
                push(heap, (now + sc.mem_tick, seq, TICK, None, None))
        else:  # SHARD_DONE: the shard finished placing its current job
            s = j
            place(shard_busy[s], s, now)
            head = shards[s].pop_next(now)
            shard_busy[s] = None if head is None else head[0]
            if head is not None:
                seq += 1
                push(heap, (now + place_time, seq, SHARD_DONE, s, None))
    res.jobs = jid
    res.events = events + jid
    res.sim_end = now
    res.extra["unfinished_jobs"] = sum(m.njobs for m in machines)
    res.extra["preemptions"] = preemptions
    if mem_mode:
        res.extra["memory"] = {
            "capacity_gb": cl.memory_gb,
            "swap_out_gb_per_machine": [m.swap_out / GB for m in machines],
            "swap_in_gb_per_machine": [m.swap_in / GB for m in machines],
            "swap_out_gb_per_class": {n: swap_class[i] / GB for i, n in enumerate(names)},
            "swap_out_gb_from_running": swap_running[0] / GB,
            "first_swap_util": [m.first_swap_util for m in machines],
            "samples": samples,
        }
    if warm_mode:
        res.extra["warm"] = _warm_summary(
            cfg, names, wstats, machines, cold_meas, warm_meas, cold_paid[0]
        )
    res.wall_s = time.perf_counter() - t_wall
    return res


def _warm_summary(cfg, names, st, machines, cold_meas, warm_meas, cold_paid) -> dict:
    """Cold-start fraction and the latency it adds, over measured jobs placed on a machine."""
    w = cfg.warm
    n = sum(cold_meas) + sum(warm_meas)
    per_class = {}
    for i, c in enumerate(names):
        k = cold_meas[i] + warm_meas[i]
        per_class[c] = cold_meas[i] / k if k else math.nan
    return {
        "keep_alive_s": math.inf if w.keep_alive_s is None else w.keep_alive_s,
        "max_idle_per_function": w.max_idle_per_function,
        "cold_start_ms": w.cold_start_ms,
        "cold_start_max_ms": w.cold_start_max_ms,
        "measured_invocations": n,
        "cold_invocations": sum(cold_meas),
        "cold_fraction": sum(cold_meas) / n if n else math.nan,
        "cold_fraction_per_class": per_class,
        # Cold-start time itself, averaged over every measured invocation (warm ones add
        # 0); the queueing it causes for others shows in the response percentiles.
        "added_latency_mean_ms": 1000.0 * cold_paid / n if n else math.nan,
        "all_invocations": {"warm": st.warm, "cold": st.cold},
        "evicted": dict(st.evicted),
        "idle_max_per_function": st.idle_max_per_function,
        "idle_mb_max_per_machine": st.idle_bytes_max / MB,
        "idle_envs_at_end": sum(m.envs.idle_count() for m in machines),
    }

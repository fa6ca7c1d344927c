"""Warm execution environments of simulated machines, decided by ``xxnode.policy.warm_pool``.

The node daemon (``xxnode/node/env/pool.py``) asks ``warm_pool`` which idle environment
serves an invocation (``pick_idle``), which idle ones to evict (``expired``) and when to
look again (``next_deadline``); here every machine asks the same functions the same
questions, and ``victims`` keeps its idle environments within a memory budget.  What the
simulator adds is time and bookkeeping:

- An invocation placed on a machine takes an idle environment of its function if
  ``pick_idle`` finds one (warm: no extra work), else it starts a new one (cold: the
  function's cold start is added to the job's work, so it holds a core meanwhile and
  can be preempted like any other work).  As in the daemon the choice is made when
  the invocation reaches the machine, even if it then waits for a core.  A job keeps
  its environment while preempted.
- When a job finishes its environment becomes idle (``idle_since = now``); ``expired``
  then enforces the per-function cap, and ``victims`` the memory budget, at once.
- Keep-alive expiry is an event at ``next_deadline`` -- no polling.  The daemon keeps one
  timer per node; the simulator keeps one per (machine, function) with idle
  environments.  That is the same schedule, because both functions decompose by
  function exactly (keep-alive is per environment, the cap per function): the union
  of ``expired(group)`` over the functions' groups is ``expired(all)`` and, once those
  are evicted, the minimum of ``next_deadline(group)`` is ``next_deadline(all)``.  It
  saves scanning every idle environment of the machine on every change.
- Victim value needs each function's recent invocation rate: an exponentially decayed
  count per machine (time constant ``rate_tau_s``), kept only when there is a budget.

Not modelled: the daemon's ``max_concurrency`` (here a function never waits for one of
its own environments), swapping idle environments (``swapped`` is always False), and
the memory of idle environments in the job-memory/swap model of ``cluster.memory_gb``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from xxnode.policy import warm_pool

from .config import MB, Config


@dataclass(frozen=True)
class Params:
    policy: warm_pool.PoolPolicy
    keys: tuple[str, ...]  # function index -> function key
    init_ms: tuple[float, ...]  # function index -> its cold start (ms)
    env_bytes: int
    budget: int | None  # bytes of idle environments per machine, None: unlimited
    tau: float


def params(cfg: Config) -> Params:
    w = cfg.warm
    n = cfg.runtime.functions
    if w.cold_start_max_ms is None:
        init = (w.cold_start_ms,) * n
    else:  # own stream: the job sequence stays byte-identical
        rng = random.Random(f"coldstart:{cfg.seed}")
        init = tuple(rng.uniform(w.cold_start_ms, w.cold_start_max_ms) for _ in range(n))
    keep = math.inf if w.keep_alive_s is None else w.keep_alive_s
    return Params(
        policy=warm_pool.PoolPolicy(keep, w.max_idle_per_function),
        keys=tuple(f"f{i}" for i in range(n)),
        init_ms=init,
        env_bytes=int(w.env_mb * MB),
        budget=None if w.idle_memory_mb is None else int(w.idle_memory_mb * MB),
        tau=w.rate_tau_s,
    )


class Stats:
    """Counters over every machine (all jobs, measured or not)."""

    __slots__ = ("warm", "cold", "evicted", "idle_max_per_function", "idle_bytes_max")

    def __init__(self) -> None:
        self.warm = 0
        self.cold = 0
        self.evicted = {"keep_alive": 0, "cap": 0, "memory": 0}
        self.idle_max_per_function = 0  # most idle envs of one function on one machine, ever
        self.idle_bytes_max = 0  # most idle bytes on one machine, ever


# schedule(machine_envs, when, function, token): push one keep-alive event.
Schedule = Callable[["MachineEnvs", float, int, int], None]


class MachineEnvs:
    """The environments of one machine: idle ones per function, and their deadlines."""

    __slots__ = (
        "name", "p", "stats", "schedule", "idle", "idle_bytes", "due", "tokens", "rates", "made",
    )  # fmt: skip

    def __init__(self, name: str, p: Params, stats: Stats, schedule: Schedule) -> None:
        self.name = name
        self.p = p
        self.stats = stats
        self.schedule = schedule
        self.idle: dict[int, list[warm_pool.IdleEnv]] = {}  # function -> its idle envs
        self.idle_bytes = 0
        self.due: dict[int, tuple[float, int]] = {}  # function -> (deadline, token) armed
        self.tokens = 0  # unique per event: one whose token is not in ``due`` is stale
        self.rates: dict[int, list[float]] = {}  # function -> [decayed count, at]
        self.made = 0

    # -- invocations -----------------------------------------------------------------------
    def acquire(self, fn: int, now: float) -> tuple[str, bool, float]:
        """(environment id, cold?, cold start in seconds) for an invocation of ``fn``."""
        if self.p.budget is not None:
            self._note_rate(fn, now)
        group = self.idle.get(fn)
        e = warm_pool.pick_idle(group, self.p.keys[fn]) if group else None
        if e is None:
            self.stats.cold += 1
            self.made += 1
            return f"{self.name}e{self.made}", True, self.p.init_ms[fn] / 1000.0
        self.stats.warm += 1
        group.remove(e)
        self.idle_bytes -= e.memory_bytes
        self._arm(fn, now)
        return e.env_id, False, 0.0

    def release(self, fn: int, env_id: str, now: float) -> None:
        """The invocation running in ``env_id`` finished: the environment is idle from now."""
        p = self.p
        group = self.idle.setdefault(fn, [])
        group.append(warm_pool.IdleEnv(env_id, p.keys[fn], now, p.env_bytes, p.init_ms[fn]))
        self.idle_bytes += p.env_bytes
        self._expire(fn, now)  # keep_alive 0, or over the per-function cap
        if p.budget is not None and self.idle_bytes > p.budget:
            self._reclaim(now)
        st = self.stats
        n = len(self.idle.get(fn, ()))
        if n > st.idle_max_per_function:
            st.idle_max_per_function = n
        if self.idle_bytes > st.idle_bytes_max:
            st.idle_bytes_max = self.idle_bytes
        self._arm(fn, now)

    def deadline(self, fn: int, token: int, now: float) -> None:
        """A keep-alive event for ``fn``; stale ones (re-armed since) are ignored."""
        armed = self.due.get(fn)
        if armed is None or armed[1] != token:
            return
        del self.due[fn]
        self._expire(fn, now)
        self._arm(fn, now)

    # -- policy ----------------------------------------------------------------------------
    def _drop(self, fn: int, ids: list[str]) -> None:
        gone = set(ids)
        keep = []
        for e in self.idle[fn]:
            if e.env_id in gone:
                self.idle_bytes -= e.memory_bytes
            else:
                keep.append(e)
        if keep:
            self.idle[fn] = keep
        else:
            del self.idle[fn]

    def _expire(self, fn: int, now: float) -> None:
        group = self.idle.get(fn)
        if not group:
            return
        policy = self.p.policy
        ids = warm_pool.expired(group, now, policy)
        if ids:
            ev = self.stats.evicted
            gone = set(ids)
            for e in group:
                if e.env_id in gone:
                    why = "keep_alive" if now >= warm_pool.expires_at(e, policy) else "cap"
                    ev[why] += 1
            self._drop(fn, ids)

    def _arm(self, fn: int, now: float) -> None:
        """Keep exactly one live event for ``fn``, at ``next_deadline`` of its idle envs."""
        group = self.idle.get(fn)
        d = warm_pool.next_deadline(group, now, self.p.policy) if group else None
        armed = self.due.get(fn)
        if d is None:
            if armed is not None:
                del self.due[fn]  # its event turns stale
            return
        if not d > now:  # expired() has just run: nothing may be due now
            raise RuntimeError(f"warm_pool.next_deadline: {d!r} is not after now={now!r}")
        if armed is not None and armed[0] == d:
            return
        self.tokens += 1
        self.due[fn] = (d, self.tokens)
        self.schedule(self, d, fn, self.tokens)

    def _note_rate(self, fn: int, now: float) -> None:
        r = self.rates.get(fn)
        if r is None:
            self.rates[fn] = [1.0, now]
        else:
            r[0] = r[0] * math.exp((r[1] - now) / self.p.tau) + 1.0
            r[1] = now

    def rate(self, fn: int, now: float) -> float:
        """Invocations per second of ``fn`` on this machine, decayed to ``now``."""
        r = self.rates.get(fn)
        if r is None:
            return warm_pool.UNKNOWN_RATE
        return r[0] * math.exp((r[1] - now) / self.p.tau) / self.p.tau

    def _reclaim(self, now: float) -> None:
        every = [e for g in self.idle.values() for e in g]
        keys = self.p.keys
        rates = {keys[fn]: self.rate(fn, now) for fn in self.idle}
        ids = warm_pool.victims(every, self.idle_bytes - self.p.budget, rates)
        if not ids:
            return
        self.stats.evicted["memory"] += len(ids)
        gone = set(ids)
        hit = [fn for fn, g in self.idle.items() if any(e.env_id in gone for e in g)]
        for fn in hit:
            self._drop(fn, ids)
            self._arm(fn, now)

    def idle_count(self) -> int:
        return sum(len(g) for g in self.idle.values())

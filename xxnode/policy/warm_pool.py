"""Keep-alive and eviction of warm (idle, frozen) execution environments on one node.

Between invocations an environment stays frozen so the next invocation of the same
function skips the cold start; idle costs only memory.  This module decides which
idle environments to keep, which to serve the next invocation from and which to
kill under memory pressure.  Like the rest of ``xxnode.policy`` it is pure: the
environments and the time come in as arguments, decisions go out.

1. Keep-alive: an environment idle for ``keep_alive_s`` or longer is evicted.  The
   boundary is inclusive on purpose: the daemon sleeps until ``next_deadline`` and
   must find that environment due when it wakes, not one float step later.
2. Per-function cap: at most ``max_idle_per_function`` idle environments per function;
   the most recently used are kept (warmest caches, LRU), the older ones evicted.
3. Memory pressure (``victims``): kill the least valuable first, where the value of
   an environment is the cold-start time its loss is expected to cost per byte it
   holds -- see ``value``.  Ties go to the longest idle, the one LRU would drop.
4. Reuse (``pick_idle``): a resident environment before a swapped one, then the most
   recently used -- see ``pick_key``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Defaults of ``PoolPolicy``.  Providers keep sandboxes for minutes: OpenWhisk's
# default idle container timeout is 10 min, Lambda's observed keep-alive 5-15 min.
DEFAULT_KEEP_ALIVE_S = 600.0
# Spare environments only pay off for concurrent bursts of one function; a handful
# covers a burst while bounding the memory a single function can park on the node.
DEFAULT_MAX_IDLE_PER_FUNCTION = 4
# Invocation rate assumed for a function absent from ``rates``: not invoked recently,
# so its environments are worth nothing and go first.
UNKNOWN_RATE = 0.0


@dataclass(frozen=True, slots=True)
class IdleEnv:
    """One idle (frozen) execution environment, as the policy sees it."""

    env_id: str
    function: str  # the function key (tenant/name/version/digest); reuse needs an exact match
    idle_since: float  # seconds, same clock as ``now``: when its last invocation ended
    memory_bytes: int  # bytes freed by killing it (what it holds in RAM)
    init_ms: float  # what its cold start cost: the time a replacement would cost again
    swapped: bool = False  # memory pushed to swap: resuming it faults pages back in


@dataclass(frozen=True, slots=True)
class PoolPolicy:
    """Keep-alive limits.  ``keep_alive_s`` may be ``math.inf`` (never expire);
    ``max_idle_per_function = 0`` keeps no idle environment at all."""

    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
    max_idle_per_function: int = DEFAULT_MAX_IDLE_PER_FUNCTION

    def __post_init__(self) -> None:
        if not self.keep_alive_s >= 0:  # also rejects NaN
            raise ValueError(f"keep_alive_s must be >= 0, got {self.keep_alive_s!r}")
        if self.max_idle_per_function < 0:
            raise ValueError(
                f"max_idle_per_function must be >= 0, got {self.max_idle_per_function!r}"
            )


def expires_at(env: IdleEnv, policy: PoolPolicy) -> float:
    """When ``env``'s keep-alive runs out.  ``expired`` compares ``now`` against this
    very expression, so waking at it is guaranteed to find the environment due."""
    return env.idle_since + policy.keep_alive_s


def _recency_key(e: IdleEnv) -> tuple[float, bool, str]:
    """Sort key, most worth keeping first: newest idle, then resident, then id."""
    return (-e.idle_since, e.swapped, e.env_id)


def expired(envs: Iterable[IdleEnv], now: float, policy: PoolPolicy) -> list[str]:
    """Ids of the environments to evict at ``now``, longest idle first.

    Those whose keep-alive ran out (``now >= expires_at``), then, per function, those
    beyond the ``max_idle_per_function`` most recently used survivors.  Within equal
    ``idle_since`` a swapped environment goes before a resident one.  Evicting the
    result leaves every function at or under the cap and nothing past its keep-alive.
    """
    out: list[IdleEnv] = []
    alive: defaultdict[str, list[IdleEnv]] = defaultdict(list)
    for e in envs:
        if now >= expires_at(e, policy):
            out.append(e)
        else:
            alive[e.function].append(e)
    cap = policy.max_idle_per_function
    for group in alive.values():
        if len(group) > cap:
            group.sort(key=_recency_key)
            out.extend(group[cap:])
    out.sort(key=lambda e: (e.idle_since, not e.swapped, e.env_id))
    return [e.env_id for e in out]


def next_deadline(envs: Iterable[IdleEnv], now: float, policy: PoolPolicy) -> float | None:
    """The earliest time ``t >= now`` at which ``expired(envs, t, policy)`` is non-empty.

    ``now`` if something is due already (call ``expired`` first); None if nothing will
    ever be (no environments, or an infinite keep-alive).  For every ``now <= t <``
    the result, ``expired`` returns nothing, so the daemon can sleep exactly until it
    and the simulator can schedule one event, without polling.
    """
    envs = list(envs)
    if not envs:
        return None
    if expired(envs, now, policy):
        return now
    d = min(expires_at(e, policy) for e in envs)
    return None if math.isinf(d) else d


def pick_key(e: IdleEnv) -> tuple[bool, float, str]:
    """Sort key, the environment to reuse first.

    Resident before swapped: resuming a swapped environment faults its pages back in
    on the invocation's critical path, which costs more than the difference in cache
    warmth between two resident ones.  Then the most recently used: its caches are
    the warmest, and always reusing the newest lets the older spares age out under
    the keep-alive.  Then ``env_id``, so the choice is deterministic.
    """
    return (e.swapped, -e.idle_since, e.env_id)


def pick_idle(envs: Iterable[IdleEnv], function: str) -> IdleEnv | None:
    """The idle environment of ``function`` that should serve its next invocation, or
    None if there is none (a cold start).  Expiry is not checked here: the caller
    evicts ``expired`` ones first."""
    return min((e for e in envs if e.function == function), key=pick_key, default=None)


def value(env: IdleEnv, rates: Mapping[str, float]) -> float:
    """Expected cost of killing ``env``, per byte it frees.

    ``rates[function]`` is the recent invocation rate of its function (invocations/s,
    e.g. an EWMA kept by the caller; absent -> ``UNKNOWN_RATE``).  Losing the
    environment means, roughly, that the next invocation pays ``init_ms`` again, and
    that comes sooner the more often the function is invoked; dividing by the memory
    ranks by cold-start time saved per byte held, so a fixed amount of memory is
    freed at the least cost.  The unit is ms/s/byte; only the order matters.

    All idle environments of one function carry its full rate, although spares matter
    only for concurrent invocations; the per-function cap bounds that overestimate,
    and within a function the longest idle (the least used spare) still goes first.
    An environment holding no memory costs nothing to keep: ``math.inf``.
    """
    if env.memory_bytes <= 0:
        return math.inf
    return max(rates.get(env.function, UNKNOWN_RATE), 0.0) * env.init_ms / env.memory_bytes


def victim_key(env: IdleEnv, rates: Mapping[str, float]) -> tuple[float, float, str]:
    """Sort key, killed first: least valuable, then longest idle, then ``env_id``."""
    return (value(env, rates), env.idle_since, env.env_id)


def victims(envs: Iterable[IdleEnv], need_bytes: int, rates: Mapping[str, float]) -> list[str]:
    """Ids of idle environments to kill to free ``need_bytes``, least valuable first.

    Stops as soon as the total reaches ``need_bytes``: dropping the last victim would
    leave too little.  If all of them hold less, all are returned and the caller sees
    the shortfall.  Environments holding no memory free nothing and are never chosen;
    ``need_bytes <= 0`` -> no victims.  The time plays no part beyond ``idle_since``
    (the tie-break), so there is no ``now`` argument.
    """
    if need_bytes <= 0:
        return []
    eligible = sorted((e for e in envs if e.memory_bytes > 0), key=lambda e: victim_key(e, rates))
    out: list[str] = []
    left = need_bytes
    for e in eligible:
        out.append(e.env_id)
        left -= e.memory_bytes
        if left <= 0:
            break
    return out

"""The shard's multi-queue: one FIFO per price class, and which head goes next.

Paper §3.2: the shard looks at the job at the head of each class queue and
weighs its class against the time it has waited.  Two policies are offered:

``strict`` (the default)
    the head of the highest non-empty class.  Everything else in XX is
    strictly by class (the machine's SCHED_FIFO, swap victims), so a fair-ish
    shard would be the one place a paying high-class job can be overtaken by a
    low one -- exactly when load is high and it matters.  The shard queue is
    also short-lived (it only holds jobs while placement is the bottleneck), so
    ageing buys low classes little: they wait on the machine anyway.

``aging``
    class-weighted ageing: the head with the largest ``weight[cls] * waited``
    goes next (ties -> higher class).  With weights = prices, a low-class job
    that has waited ``w_hi / w_lo`` times longer than a high-class head is
    placed first, so no class waits unboundedly at the shard.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping

POLICIES = ("strict", "aging")


def select_head(
    heads: list[tuple[str, float]],
    now: float,
    policy: str,
    ranks: Mapping[str, int],
    weights: Mapping[str, float] | None = None,
) -> int | None:
    """Index into ``heads`` -- (cls, enqueued_at) of each non-empty queue -- to serve next."""
    best = None
    best_key = None
    for i, (cls, t_enq) in enumerate(heads):
        if policy == "strict":
            key = (ranks[cls],)
        elif policy == "aging":
            w = weights[cls] if weights is not None else ranks[cls] + 1
            key = (w * (now - t_enq), ranks[cls])
        else:
            raise ValueError(f"unknown head policy {policy!r}")
        if best_key is None or key > best_key:
            best, best_key = i, key
    return best


class MultiQueue:
    """Jobs waiting at a shard for placement, one FIFO per class."""

    def __init__(
        self,
        class_ranks: Mapping[str, int],
        policy: str = "strict",
        weights: Mapping[str, float] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown head policy {policy!r}; choose from {POLICIES}")
        self.policy = policy
        self._ranks = dict(class_ranks)
        self._weights = dict(weights) if weights is not None else None
        order = sorted(self._ranks, key=lambda c: -self._ranks[c])
        self._queues: dict[str, deque[tuple[Hashable, float]]] = {c: deque() for c in order}
        self._n = 0

    def push(self, job: Hashable, cls: str, now: float) -> None:
        """Queue ``job`` at the tail of its class; unknown class -> ValueError."""
        q = self._queues.get(cls)
        if q is None:
            raise ValueError(f"unknown price class {cls!r}")
        q.append((job, now))
        self._n += 1

    def _pick(self, now: float) -> str | None:
        if self.policy == "strict":  # fast path: first non-empty in rank order
            for cls, q in self._queues.items():
                if q:
                    return cls
            return None
        heads = [(cls, q[0][1]) for cls, q in self._queues.items() if q]
        i = select_head(heads, now, self.policy, self._ranks, self._weights)
        return None if i is None else heads[i][0]

    def peek_next(self, now: float) -> tuple[Hashable, str] | None:
        cls = self._pick(now)
        return None if cls is None else (self._queues[cls][0][0], cls)

    def pop_next(self, now: float) -> tuple[Hashable, str] | None:
        """Remove and return (job, cls) chosen by the head policy at time ``now``."""
        cls = self._pick(now)
        if cls is None:
            return None
        job, _ = self._queues[cls].popleft()
        self._n -= 1
        return job, cls

    def remove(self, job: Hashable, cls: str) -> bool:
        """Take a queued ``job`` out (a cancel: rare, so a scan); False if not queued."""
        q = self._queues.get(cls, ())
        for i, (j, _) in enumerate(q):
            if j == job:
                del q[i]
                self._n -= 1
                return True
        return False

    def by_class(self) -> dict[str, int]:
        return {cls: len(q) for cls, q in self._queues.items()}

    def __len__(self) -> int:
        return self._n

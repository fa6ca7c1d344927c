"""The node's run queue: one FIFO per price class, highest class first.

This mirrors what the kernel enforces on the machine (SCHED_FIFO priority per
class): a waiting job of a higher class always goes before any lower one, and
within a class jobs go in arrival order.  Starving low classes is intended
(paper §3.2): their owners paid for exactly that.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping


class NodeQueue:
    """Jobs waiting for a core on one machine, ordered by (class rank desc, arrival).

    ``class_ranks`` maps class name -> rank; a higher rank is a higher class.
    ``now`` is recorded at push so callers can ask how long a job has waited.
    """

    def __init__(self, class_ranks: Mapping[str, int]) -> None:
        self._ranks = dict(class_ranks)
        # One OrderedDict per class: O(1) push, pop-oldest and remove-by-id.
        # Kept sorted by rank descending so pop scans at most len(classes).
        order = sorted(self._ranks, key=lambda c: -self._ranks[c])
        self._queues: dict[str, OrderedDict[str, float]] = {c: OrderedDict() for c in order}
        self._where: dict[str, str] = {}

    def push(self, job_id: str, cls: str, now: float) -> None:
        """Append ``job_id`` to the tail of its class; unknown class or duplicate id -> ValueError."""
        q = self._queues.get(cls)
        if q is None:
            raise ValueError(f"unknown price class {cls!r}")
        if job_id in self._where:
            raise ValueError(f"job {job_id!r} is already queued")
        q[job_id] = now
        self._where[job_id] = cls

    def push_front(self, job_id: str, cls: str, now: float) -> None:
        """Put a *preempted* job at the head of its class, as SCHED_FIFO does.

        A preempted job has already waited its turn; sending it to the tail would
        let later arrivals of the same class overtake it.
        """
        self.push(job_id, cls, now)
        self._queues[cls].move_to_end(job_id, last=False)

    def peek_next(self) -> tuple[str, str] | None:
        """The (job_id, cls) that ``pop_next`` would return, without removing it."""
        for cls, q in self._queues.items():
            if q:
                return next(iter(q)), cls
        return None

    def pop_next(self) -> tuple[str, str] | None:
        """Remove and return the oldest job of the highest non-empty class, or None."""
        for cls, q in self._queues.items():
            if q:
                job_id, _ = q.popitem(last=False)
                del self._where[job_id]
                return job_id, cls
        return None

    def remove(self, job_id: str) -> bool:
        """Drop a queued job (cancelled, migrated); False if it was not queued."""
        cls = self._where.pop(job_id, None)
        if cls is None:
            return False
        del self._queues[cls][job_id]
        return True

    def enqueued_at(self, job_id: str) -> float | None:
        """The ``now`` given at push, or None if not queued."""
        cls = self._where.get(job_id)
        return None if cls is None else self._queues[cls][job_id]

    def by_class(self) -> dict[str, int]:
        """Queued job count per class (every known class, zeros included)."""
        return {cls: len(q) for cls, q in self._queues.items()}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._where

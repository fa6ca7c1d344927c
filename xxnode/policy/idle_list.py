"""The shard's idle list: machines that announced spare memory (paper §3.2).

Inspired by Join-Idle-Queue, but keyed on memory: probing k random machines
cannot find the rare machine that is really idle in a busy cluster, so idle
machines announce themselves.  Each entry carries the machine's free memory and
its job count; the shard places on the entry with the fewest jobs.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from itertools import count


class IdleList:
    """machine -> free bytes and job count; the shard's view, refreshed by dispatchers.

    ``choose`` is on every placement, so it is a heap (jobs, -free, listing order) with
    lazy deletion -- O(log n), where a scan was O(n) per placement: 50 us at 500
    listed machines, the shard's whole budget at 10 000 placements/s.  Every change
    pushes a fresh entry with a new version; stale ones are dropped when they surface,
    and the heap is rebuilt when they outnumber the live ones.
    """

    def __init__(self) -> None:
        self._e: dict[Hashable, list[int]] = {}  # machine -> [free, jobs, order, version]
        self._heap: list[tuple[int, int, int, int, Hashable]] = []
        self._order = count()  # listing order: the last tie-break
        self._version = count()

    def _push(self, machine: Hashable, e: list[int]) -> None:
        e[3] = next(self._version)
        heapq.heappush(self._heap, (e[1], -e[0], e[2], e[3], machine))
        self._compact()

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._e) + 64:
            self._heap = [(v[1], -v[0], v[2], v[3], m) for m, v in self._e.items()]
            heapq.heapify(self._heap)

    def upsert(self, machine: Hashable, free_bytes: int, jobs: int) -> None:
        """Join or update (the dispatcher's report overrides the shard's estimate)."""
        e = self._e.get(machine)
        if e is None:
            e = self._e[machine] = [free_bytes, jobs, next(self._order), 0]
        else:
            e[0], e[1] = free_bytes, jobs
        self._push(machine, e)

    def remove(self, machine: Hashable) -> bool:
        gone = self._e.pop(machine, None) is not None
        self._compact()
        return gone

    def choose(self) -> Hashable | None:
        """The machine with the shortest queue; ties -> more free memory, then the
        earlier listed; empty -> None."""
        heap = self._heap
        while heap:
            _, _, _, version, machine = heap[0]
            e = self._e.get(machine)
            if e is not None and e[3] == version:
                return machine
            heapq.heappop(heap)
        return None

    def note_placed(self, machine: Hashable, bytes_estimate: int = 0) -> None:
        """Count a placement locally so a burst does not all land on one stale entry."""
        e = self._e.get(machine)
        if e is not None:
            e[1] += 1
            e[0] -= bytes_estimate
            self._push(machine, e)

    def entry(self, machine: Hashable) -> tuple[int, int] | None:
        e = self._e.get(machine)
        return None if e is None else (e[0], e[1])

    def machines(self) -> list[Hashable]:
        """The listed machines, in listing order (for inspection and sweeps)."""
        return list(self._e)

    def __len__(self) -> int:
        return len(self._e)

    def __contains__(self, machine: object) -> bool:
        return machine in self._e

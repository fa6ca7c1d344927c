"""The shard's idle list: machines that announced spare memory (paper §3.2).

Inspired by Join-Idle-Queue, but keyed on memory: probing k random machines
cannot find the rare machine that is really idle in a busy cluster, so idle
machines announce themselves.  Each entry carries the machine's free memory and
its job count; the shard places on the entry with the fewest jobs.
"""

from __future__ import annotations

from collections.abc import Hashable


class IdleList:
    """machine -> [free_bytes, jobs]; the shard's view, refreshed by dispatchers."""

    def __init__(self) -> None:
        self._e: dict[Hashable, list[int]] = {}

    def upsert(self, machine: Hashable, free_bytes: int, jobs: int) -> None:
        """Join or update (the dispatcher's report overrides the shard's estimate)."""
        self._e[machine] = [free_bytes, jobs]

    def remove(self, machine: Hashable) -> bool:
        return self._e.pop(machine, None) is not None

    def choose(self) -> Hashable | None:
        """The machine with the shortest queue; ties -> more free memory; empty -> None."""
        best = None
        best_jobs = best_free = 0
        for m, (free, jobs) in self._e.items():
            if best is None or jobs < best_jobs or (jobs == best_jobs and free > best_free):
                best, best_jobs, best_free = m, jobs, free
        return best

    def note_placed(self, machine: Hashable, bytes_estimate: int = 0) -> None:
        """Count a placement locally so a burst does not all land on one stale entry."""
        e = self._e.get(machine)
        if e is not None:
            e[1] += 1
            e[0] -= bytes_estimate

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

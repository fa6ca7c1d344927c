"""Class-based swap victim choice (paper §3.2, "class-based swapping").

Under memory pressure the node pushes memory of the *lowest* classes to swap.
Priority scheduling is what makes this cheap: a low-class job will not run until
every higher job on the machine is done, so its pages will not be touched soon.
The order below follows that argument:

1. lowest class first -- it runs last;
2. within a class, jobs that are not running (preempted or waiting) before
   running ones -- a running job would fault its pages straight back in;
3. then largest resident set first -- fewest jobs disturbed per byte reclaimed;
4. then most recently started first -- FIFO within a class means it runs last.

The top class is never a victim: its jobs were promised the machine.
Only as much as needed is taken: the last victim gives a partial amount.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class JobMemory:
    """What the victim choice needs to know about one job on the machine."""

    job_id: str
    rank: int  # higher = higher price class
    running: bool  # holds a core right now
    resident_bytes: int  # memory still in RAM (already swapped bytes excluded)
    started_at: float  # when the job arrived on the machine


def victim_order_key(j: JobMemory) -> tuple[int, bool, int, float]:
    """Sort key: earlier in the order = swapped first."""
    return (j.rank, j.running, -j.resident_bytes, -j.started_at)


def choose_victims(
    jobs: Sequence[JobMemory], need_bytes: int, top_rank: int
) -> list[tuple[str, int]]:
    """Pick (job_id, bytes_to_reclaim) pairs that together free ``need_bytes``.

    Jobs with ``rank >= top_rank`` are never chosen.  If the eligible jobs hold
    less than ``need_bytes`` they are all returned in full; the caller sees the
    shortfall from the sum.  ``need_bytes <= 0`` -> no victims.
    """
    if need_bytes <= 0:
        return []
    eligible = [j for j in jobs if j.rank < top_rank and j.resident_bytes > 0]
    eligible.sort(key=victim_order_key)
    out: list[tuple[str, int]] = []
    left = need_bytes
    for j in eligible:
        take = min(j.resident_bytes, left)
        out.append((j.job_id, take))
        left -= take
        if left <= 0:
            break
    return out


def choose_precleans(
    jobs: Sequence[JobMemory], clean: Mapping[str, int], want_bytes: int, top_rank: int
) -> list[tuple[str, int]]:
    """Whose resident memory to make clean (written to swap, kept in RAM), ``want_bytes``
    in all: the jobs reclaim would take first, so what is made clean is what a higher class
    will be given. Running jobs are left out: they would dirty their pages again. ``clean``
    is each job's already-clean bytes."""
    waiting = [
        replace(j, resident_bytes=j.resident_bytes - clean.get(j.job_id, 0))
        for j in jobs
        if not j.running
    ]
    return choose_victims(waiting, want_bytes, top_rank)


def clean_release_order(
    jobs: Sequence[JobMemory], clean: Mapping[str, int], need_bytes: int, top_rank: int
) -> list[tuple[str, int]]:
    """Whose clean memory to give up first for ``need_bytes``: the same order as reclaim
    (lowest class, waiting, largest, newest), over what each job holds clean."""
    holding = [replace(j, resident_bytes=clean.get(j.job_id, 0)) for j in jobs]
    return choose_victims(holding, need_bytes, top_rank)


def class_ceilings(
    current: Mapping[str, int], ranks: Mapping[str, int], available: int, target: int
) -> dict[str, int]:
    """memory.high for every class below the top: what it holds now plus an equal share of
    the free memory above ``target``. A lower class that grows past it reclaims its own
    pages (its allocations wait), so it cannot eat the free target a higher class arrives
    into; the shares sum to the slack, so classes growing at once do not overshoot it either.
    Under the target the share is 0: a lower class may not grow at all without paying.
    Re-computed every wake-up, a class's ceiling rises as reclaim or an ending job frees
    memory and falls as a higher class grows."""
    top = max(ranks.values(), default=0)
    below = [c for c, r in ranks.items() if r < top]
    share = max(available - target, 0) // len(below) if below else 0
    return {c: current.get(c, 0) + share for c in below}

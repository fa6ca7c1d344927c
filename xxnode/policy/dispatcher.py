"""The node dispatcher's idle-list decisions (paper §3.2).

A machine announces itself on one shard's idle list while it has a lot of free
memory.  Join and leave use two thresholds (hysteresis) so a machine hovering
around one threshold does not flap in and out; while listed it re-reports only
when its free memory moved significantly, or its job count drifted from what the
shard believes (the shard counts its own placements, see ``IdleList.note_placed``),
which bounds the message rate.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

JOIN, UPDATE, LEAVE = "join", "update", "leave"


@dataclass(frozen=True, slots=True)
class IdleParams:
    join_free_frac: float = 0.5  # join when at least this share of memory is free
    leave_free_frac: float = 0.3  # leave when free share drops below this (< join)
    update_free_frac: float = 0.1  # re-report when free memory moved this share of total
    update_jobs: int = 4  # ... or the job count drifted this far from the shard's view

    def __post_init__(self) -> None:
        if not 0.0 <= self.leave_free_frac < self.join_free_frac <= 1.0:
            raise ValueError("need 0 <= leave_free_frac < join_free_frac <= 1")


@dataclass(frozen=True, slots=True)
class Listing:
    """What the dispatcher last told its shard; None when not listed."""

    shard: Hashable
    free_bytes: int
    jobs: int  # reported count plus placements the shard has made since


def idle_action(
    listing: Listing | None, free_bytes: int, total_bytes: int, jobs: int, p: IdleParams
) -> str | None:
    """JOIN, UPDATE, LEAVE or None given the machine's state now."""
    free_frac = free_bytes / total_bytes
    if listing is None:
        return JOIN if free_frac >= p.join_free_frac else None
    if free_frac < p.leave_free_frac:
        return LEAVE
    if abs(free_bytes - listing.free_bytes) >= p.update_free_frac * total_bytes:
        return UPDATE
    if abs(jobs - listing.jobs) >= p.update_jobs:
        return UPDATE
    return None


def choose_shard(probed: Sequence[tuple[Hashable, int]]) -> Hashable:
    """Of k probed (shard, idle-list length) pairs, the shard with the fewest machines."""
    best, best_len = probed[0]
    for s, n in probed[1:]:
        if n < best_len:
            best, best_len = s, n
    return best

"""Power-of-k choices: ask k random members, take the least loaded.

Used twice in XX: the shard probes k machines for their running-job count when
its idle list is empty, and the dispatcher probes k shards' idle-list lengths.
Sampling is without replacement (k distinct members); ties go to the first in
sample order, which is already random, so no second random draw is needed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Sequence


def sample(n: int, k: int, rng: random.Random) -> list[int]:
    """k distinct indices from range(n) (all of them, shuffled, if k >= n)."""
    if k >= n:
        out = list(range(n))
        rng.shuffle(out)
        return out
    if k <= 4:  # rejection is cheaper than rng.sample for the tiny k we use
        out = []
        r = rng.random
        while len(out) < k:
            i = int(r() * n)
            if i not in out:
                out.append(i)
        return out
    return rng.sample(range(n), k)


def least_loaded(candidates: Sequence[Hashable], load: Callable[[Hashable], float]) -> Hashable:
    """The candidate with the smallest ``load``; ties -> earliest in ``candidates``."""
    best = candidates[0]
    best_load = load(best)
    for c in candidates[1:]:
        lc = load(c)
        if lc < best_load:
            best, best_load = c, lc
    return best

"""Each tenant's budget state, decided by policy/budget.py from the shared ledger.

Every gateway decides for itself from the same ledger, so they agree but for the last
TTL seconds of spend; the hysteresis state is each gateway's own. A tenant's spend is read
at most once per TTL: how far past a line it can get before it bites is what it spends in
TTL, plus what the nodes have metered and not yet sent (docs/budgets.md measures both).
"""

from __future__ import annotations

import asyncio
import time

from xxnode.ledger.store import Store
from xxnode.policy import budget as policy

TTL = 1.0


class Budgets:
    def __init__(self, store: Store, rule: policy.BudgetRule = policy.RULE, clock=time.time):
        self.store, self.rule, self.clock = store, rule, clock
        self._cache: dict[str, tuple[float, policy.Decision, float]] = {}  # tenant -> ...
        self._state: dict[str, str] = {}  # tenant -> its last state (hysteresis)

    async def decide(self, tenant: str) -> policy.Decision:
        now = self.clock()
        hit = self._cache.get(tenant)
        if hit is not None and now - hit[0] < TTL:
            return hit[1]
        t = await asyncio.to_thread(self.store.get_tenant, tenant)
        if t.budget is None:
            d = policy.decide(0.0, None, 0.0)
            spend = 0.0
        else:
            spend = await asyncio.to_thread(self.store.month_spend, tenant, policy.month_of(now))
            start, end = policy.month_bounds(now)
            d = policy.decide(
                spend, t.budget, policy.month_fraction(now), self._state.get(tenant, policy.NORMAL),
                self.rule, end - start,
            )  # fmt: skip
        self._state[tenant] = d.state
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[tenant] = (now, d, spend)
        return d

    def spend(self, tenant: str) -> float | None:
        """The spend behind the last decision (for the bill's header), if any."""
        hit = self._cache.get(tenant)
        return None if hit is None else hit[2]

    def forget(self, tenant: str) -> None:
        """Its budget changed: decide afresh."""
        self._cache.pop(tenant, None)

"""Each tenant's budget state, decided by policy/budget.py from the shared ledger.

Every gateway decides for itself from the same ledger, so they agree but for the last
TTL seconds of spend; the hysteresis state is each gateway's own. A tenant's spend is read
at most once per TTL: how far past a line it can get before it bites is what it spends in
TTL, plus what the nodes have metered and not yet sent (docs/budgets.md measures both).
"""

from __future__ import annotations

import asyncio
import logging
import time

from xxnode.ledger.store import Store
from xxnode.policy import budget as policy

log = logging.getLogger("xxgate")
TTL = 1.0


class Budgets:
    def __init__(self, store: Store, rule: policy.BudgetRule = policy.RULE, clock=time.time):
        self.store, self.rule, self.clock = store, rule, clock
        self._cache: dict[str, tuple[float, policy.Decision]] = {}  # tenant -> (when, what)
        self._state: dict[tuple[str, str], str] = {}  # (tenant, month) -> last state
        self._warned: dict[tuple[str, str], tuple] = {}  # what the log said last

    async def decide(self, tenant: str) -> policy.Decision:
        now = self.clock()
        hit = self._cache.get(tenant)
        if hit is not None and now - hit[0] < TTL:
            return hit[1]
        t = await asyncio.to_thread(self.store.get_tenant, tenant)
        if t.budget is None:
            d = policy.decide(0.0, None, 0.0)
        else:
            month = policy.month_of(now)
            spend = await asyncio.to_thread(self.store.month_spend, tenant, month)
            start, end = policy.month_bounds(now)
            key = (tenant, month)  # a new month starts from normal, as its spend from 0
            was = self._state.get(key, policy.NORMAL)
            d = policy.decide(spend, t.budget, policy.month_fraction(now), was, self.rule,
                              end - start)  # fmt: skip
            if len(self._state) > 100_000:
                self._state.clear()
            self._state[key] = d.state
            if d.state != was or d.warnings != self._warned.get(key, ()):
                log.warning("tenant %s: budget %s, %.1f%% of %g spent (%s)", tenant, d.state,
                            100 * spend / t.budget, t.budget,
                            ", ".join(f"{w:.0%}" for w in d.warnings) or "no warning")  # fmt: skip
                self._warned[key] = d.warnings
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[tenant] = (now, d)
        return d

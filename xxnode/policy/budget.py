"""Monthly budgets as the paper (§3.1) has them: a guideline, not a cap. Spend is compared
with the budget's *pace* (the fraction of the month gone, plus a burst allowance), so a
tenant that spends at a steady rate that fits its budget is never touched, and one whose
spend runs out of reason for it — a denial-of-wallet burst, a runaway loop — is first
degraded (its invocations run in the cheapest class), then throttled (429 with
Retry-After).

The lines, in fractions of the month's budget B, at month fraction f:

    degrade  when spend > B * (f + burst)
    throttle when spend > B * (f + burst + throttle_margin)

and each state is left only once spend is `hysteresis * B` below its line, so a tenant on
the line does not flap. At the month's end the most a tenant can spend is about
B * (1 + burst + throttle_margin), plus what is in flight when it bites: that is the
"small amount" XX does not promise to stay under.

Pure: the gateways (from the shared ledger) and the simulator call the same function.
"""

from __future__ import annotations

import calendar
import math
from dataclasses import dataclass
from datetime import UTC, datetime

NORMAL, DEGRADE, THROTTLE = "normal", "degrade", "throttle"
STATES = (NORMAL, DEGRADE, THROTTLE)


@dataclass(frozen=True)
class BudgetRule:
    burst: float = 0.05  # of B: spend allowed ahead of pace before degrading
    throttle_margin: float = 0.05  # of B: beyond the degrade line, before throttling
    hysteresis: float = 0.02  # of B: how far under a line spend must fall to leave its state
    warn_at: tuple[float, ...] = (0.75, 0.90)  # of B: warnings as spend crosses these
    max_retry_after: float = 3600.0  # seconds; Retry-After is at least 1


RULE = BudgetRule()


@dataclass(frozen=True)
class Decision:
    state: str  # normal | degrade | throttle
    warnings: tuple[float, ...]  # the warn_at fractions of B that spend has reached
    pace: float  # the degrade line now, in the budget's unit
    retry_after: float  # throttle: seconds until the pace lets the tenant in again; else 0


def month_bounds(t: float) -> tuple[float, float]:
    """(start, end) of t's calendar month in UTC, as epoch seconds."""
    d = datetime.fromtimestamp(t, UTC)
    start = datetime(d.year, d.month, 1, tzinfo=UTC)
    days = calendar.monthrange(d.year, d.month)[1]
    return start.timestamp(), start.timestamp() + days * 86400.0


def month_of(t: float) -> str:
    """YYYY-MM of t, in UTC: the month a usage record is billed in."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m")


def month_fraction(t: float) -> float:
    start, end = month_bounds(t)
    return min(1.0, max(0.0, (t - start) / (end - start)))


def decide(
    spend: float,
    budget: float | None,
    fraction: float,
    previous: str = NORMAL,
    rule: BudgetRule = RULE,
    month_seconds: float = 30 * 86400.0,
) -> Decision:
    """The state a tenant's invocations are in, given its spend so far this month, its
    monthly budget (None or <= 0: no budget), the fraction of the month gone, and the state
    it was in (for hysteresis)."""
    if budget is None or budget <= 0 or not math.isfinite(budget):
        return Decision(NORMAL, (), math.inf, 0.0)
    spend = max(0.0, spend)
    used = spend / budget
    warnings = tuple(w for w in rule.warn_at if used >= w)
    degrade_line = fraction + rule.burst
    throttle_line = degrade_line + rule.throttle_margin
    h = rule.hysteresis
    if used > throttle_line or (previous == THROTTLE and used > throttle_line - h):
        # in again once the pace has moved the line past spend (plus the hysteresis), or
        # when the month ends and spend starts again from 0, whichever comes first
        wait = min(used - (throttle_line - h), 1.0 - fraction) * month_seconds
        retry = min(rule.max_retry_after, max(1.0, math.ceil(wait)))
        return Decision(THROTTLE, warnings, budget * degrade_line, retry)
    if used > degrade_line or (previous in (DEGRADE, THROTTLE) and used > degrade_line - h):
        return Decision(DEGRADE, warnings, budget * degrade_line, 0.0)
    return Decision(NORMAL, warnings, budget * degrade_line, 0.0)

"""A tenant's bill for a month: what `xxctl bill` prints and GET /xx/bill answers.

Lines per function and class it owns (invocations, CPU-seconds, GB-seconds, cost), then the
premiums it paid for raising other tenants' functions along call chains, the total, and
where the month stands against its budget (policy/budget.py). Amounts are in µ¢, the unit
the classes' prices are in.
"""

from __future__ import annotations

import re
import time

from xxnode.ledger.store import Store
from xxnode.policy import budget as policy

MONTH_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


def bill_doc(store: Store, tenant: str, month: str, now: float | None = None) -> dict:
    if not MONTH_RE.match(month):
        raise ValueError(f"month: YYYY-MM, not {month[:16]!r}")
    now = time.time() if now is None else now
    t = store.get_tenant(tenant)
    lines = store.bill(tenant, month)
    total = sum(x.cost for x in lines)
    current = policy.month_of(now)
    fraction = policy.month_fraction(now) if month == current else float(month < current)
    d = policy.decide(total, t.budget, fraction)
    doc = {
        "tenant": tenant, "month": month, "unit": "µ¢",
        "lines": [x.doc() for x in lines], "total": round(total, 9),
        "invocations": sum(x.invocations for x in lines if not x.premium),
        "budget": t.budget,
    }  # fmt: skip
    if t.budget is not None:
        doc |= {
            "budget_used": round(total / t.budget, 6) if t.budget > 0 else None,
            "budget_state": d.state if month == current else None,
            "warnings": [f"{w:.0%}" for w in d.warnings],
        }
    return doc


def bill_text(doc: dict) -> str:
    out = [f"tenant {doc['tenant']}, {doc['month']} (amounts in {doc['unit']})"]
    out.append(
        f"{'function':<28} {'class':<8} {'invocations':>11} {'cpu s':>12} {'GB-s':>12} {'cost':>14}"
    )
    for x in doc["lines"]:
        name = x["function"] if not x.get("premium") else f"{x['owner']}/{x['function']} +"
        out.append(
            f"{name:<28} {x['class']:<8} {x['invocations']:>11} {x['cpu_seconds']:>12.6f} "
            f"{x['gb_seconds']:>12.6f} {x['cost']:>14.6f}"
        )
    out.append(
        f"{'total':<28} {'':<8} {doc['invocations']:>11} {'':>12} {'':>12} {doc['total']:>14.6f}"
    )
    if any(x.get("premium") for x in doc["lines"]):
        out.append("+ : a premium, for raising another tenant's function to your class")
    if doc.get("budget") is not None:
        used = doc.get("budget_used")
        state = doc.get("budget_state")
        out.append(
            f"budget {doc['budget']:g} per month: {used:.1%} used"
            + (f", {state}" if state else "")
            + (f" (warning: {', '.join(doc['warnings'])})" if doc["warnings"] else "")
        )
    return "\n".join(out)

"""Usage records as nodes send them, and who pays what for one (paper §3.1).

A record is the node's metering of one finished invocation, keyed by the invocation's
cluster job id, carrying the prices in force when the node accepted it. The split is pure:

- CPU at the effective class's price, memory at the one memory price — paid by the
  function's owner when the call stayed inside its tenant (or came from outside XX);
- when a caller in another tenant raised the callee's class (inheritance), the owner pays
  its own class's CPU price and the caller's tenant (`payer`) pays the difference, so no
  tenant can raise another's bill.

Prices are in µ¢ (per CPU-second, per GB-second), as the classes' configuration has them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from xxnode.policy.budget import month_of

MAX_DEPTH = 16  # nested calls a chain may make: the 17th is refused, as Lambda's loop detection

_TEXT = ("id", "tenant", "function", "version", "class", "own_class", "payer", "node")
_NUMBERS = ("finished_at", "cpu_ms", "gb_s", "cpu_price", "own_cpu_price", "memory_price")


class BadRecord(ValueError):
    """A record the ledger will not take; its message names the field."""


@dataclass(frozen=True)
class Usage:
    id: str
    tenant: str  # the function's owner
    function: str
    version: str
    price_class: str  # the effective class it ran at
    own_class: str  # the function's own class (after its tenant's budget)
    payer: str  # whose tenant made the call: pays the premium if it is not the owner
    depth: int
    node: str
    finished_at: float
    cpu_s: float
    gb_s: float
    cpu_price: float
    own_cpu_price: float
    memory_price: float

    @property
    def month(self) -> str:
        return month_of(self.finished_at)

    @property
    def cost(self) -> float:
        """What the owner pays."""
        cpu = self.own_cpu_price if self.crosses else self.cpu_price
        return self.cpu_s * cpu + self.gb_s * self.memory_price

    @property
    def premium(self) -> float:
        """What the payer pays on top, for raising another tenant's function's class."""
        return self.cpu_s * max(0.0, self.cpu_price - self.own_cpu_price) if self.crosses else 0.0

    @property
    def crosses(self) -> bool:
        return self.payer != self.tenant


def parse(doc: object) -> Usage:
    """A record from a node, checked field by field."""
    if not isinstance(doc, dict):
        raise BadRecord("a usage record is a JSON object")
    for k in _TEXT:
        v = doc.get(k)
        if not isinstance(v, str) or not v or len(v) > 256:
            raise BadRecord(f"{k}: a non-empty string of at most 256 characters")
    nums = {}
    for k in _NUMBERS:
        v = doc.get(k)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise BadRecord(f"{k}: a finite number >= 0")
        nums[k] = float(v)
    depth = doc.get("depth", 0)
    if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= MAX_DEPTH:
        raise BadRecord(f"depth: an integer from 0 to {MAX_DEPTH}")
    return Usage(
        id=doc["id"], tenant=doc["tenant"], function=doc["function"], version=doc["version"],
        price_class=doc["class"], own_class=doc["own_class"], payer=doc["payer"],
        depth=depth, node=doc["node"], finished_at=nums["finished_at"],
        cpu_s=nums["cpu_ms"] / 1000.0, gb_s=nums["gb_s"], cpu_price=nums["cpu_price"],
        own_cpu_price=nums["own_cpu_price"], memory_price=nums["memory_price"],
    )  # fmt: skip


def parse_all(records) -> tuple[list[Usage], dict[str, str]]:
    """(the records taken, {id: why} for the rest); records already parsed pass through."""
    good: list[Usage] = []
    rejected: dict[str, str] = {}
    for doc in records:
        if isinstance(doc, Usage):
            good.append(doc)
            continue
        try:
            good.append(parse(doc))
        except BadRecord as e:
            rid = doc.get("id") if isinstance(doc, dict) else None
            rejected[str(rid)[:256] if rid else "?"] = str(e)
    return good, rejected


@dataclass(frozen=True)
class BillLine:
    """One function and class in a tenant's month. `premium`: lines for calls that raised
    another tenant's function (`owner`) — this tenant pays only the difference."""

    function: str
    price_class: str
    invocations: int
    cpu_seconds: float
    gb_seconds: float
    cost: float
    owner: str = ""  # premium lines: the function's tenant
    premium: bool = False

    def doc(self) -> dict:
        out = {
            "function": self.function, "class": self.price_class,
            "invocations": self.invocations, "cpu_seconds": round(self.cpu_seconds, 6),
            "gb_seconds": round(self.gb_seconds, 6), "cost": round(self.cost, 9),
        }  # fmt: skip
        if self.premium:
            out |= {"premium": True, "owner": self.owner}
        return out

"""Price classes: a fixed set, each a name, a price per CPU-second and the kernel scheduling
that price buys (paper §2.3, §3.1).

The machine scheduler of the paper is preemptive priority, FIFO within a class: Linux's
SCHED_FIFO. Paying classes get SCHED_FIFO at a priority that grows with the price; the
cheapest class may instead be SCHED_BATCH (the default config does this) — see docs/node.md:
it keeps the RT bandwidth budget for the classes that paid for it and leaves the system's own
SCHED_OTHER work its normal share on a node saturated by cheap work, while every RT class
still preempts it.

Rules checked here, each error naming its key:
  * names are short identifiers ([a-z][a-z0-9_-]*), unique; prices are positive, unique;
  * policy is fifo | other | batch | idle; fifo needs a priority;
  * a dearer class never gets weaker scheduling, and no two classes share a kernel level
    (two non-RT classes of the same CFS kind would be shared, not prioritised);
  * FIFO priorities are >= 2 apart and below the daemon's: each job's shim runs at the
    class priority + 1 so it can always enforce its job's timeout.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from xxnode.schema import ConfigError, Key, check

POLICIES = {
    "fifo": os.SCHED_FIFO,
    "other": os.SCHED_OTHER,
    "batch": os.SCHED_BATCH,
    "idle": os.SCHED_IDLE,
}
NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
RT_MIN, RT_MAX = 1, 99


# One [[class]] table's keys (checks between classes are in parse_classes).
KEYS = (
    Key("name", "str", "", "a short identifier, [a-z][a-z0-9_-]*, unique", required=True),
    Key("price", "float", 0.0, "µ¢ per CPU-second; unique: the classes are ranked by price", least=0, above=True, required=True),
    Key("policy", "str", "fifo", "kernel scheduling the price buys; a dearer class gets strictly stronger scheduling", choices=tuple(POLICIES)),
    Key("priority", "int", 0, "SCHED_FIFO priority (fifo only): >= 2 above the next cheaper fifo class, below the daemon's minus 1", least=RT_MIN, most=RT_MAX - 1),
    Key("description", "str", "", "shown by xxctl classes"),
)  # fmt: skip


@dataclass(frozen=True)
class PriceClass:
    name: str
    price: float  # µ¢ per CPU-second
    policy: str  # key of POLICIES
    priority: int  # SCHED_FIFO priority; 0 for the CFS policies
    rank: int = 0  # 0 = lowest class; higher = higher class
    description: str = ""

    @property
    def sched_policy(self) -> int:
        return POLICIES[self.policy]

    @property
    def is_rt(self) -> bool:
        return self.policy == "fifo"

    @property
    def shim_sched(self) -> tuple[int, int]:
        """The job's shim: one step above its job, so a job spinning at its class priority
        cannot keep its own shim from enforcing the timeout."""
        if self.is_rt:
            return os.SCHED_FIFO, self.priority + 1
        return os.SCHED_OTHER, 0

    def level(self) -> tuple[int, int]:
        """Kernel scheduling strength: FIFO above CFS (other/batch alike) above idle."""
        if self.is_rt:
            return 2, self.priority
        return (0, 0) if self.policy == "idle" else (1, 0)

    def sched_text(self) -> str:
        return f"SCHED_FIFO {self.priority}" if self.is_rt else f"SCHED_{self.policy.upper()}"


class ClassTable(Sequence[PriceClass]):
    """The configured classes, highest first."""

    def __init__(self, classes: list[PriceClass]):
        self._list = sorted(classes, key=lambda c: -c.rank)
        self._by_name = {c.name: c for c in self._list}

    def __getitem__(self, i):  # type: ignore[override]
        return self._list[i]

    def __len__(self) -> int:
        return len(self._list)

    def get(self, name: str) -> PriceClass | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return [c.name for c in self._list]

    def ranks(self) -> dict[str, int]:
        """For NodeQueue: higher rank = higher class."""
        return {c.name: c.rank for c in self._list}

    def max_rt_priority(self) -> int:
        return max((c.priority for c in self._list if c.is_rt), default=0)


def _key(where: str, field: str) -> str:
    return f"{where}.{field}"


def parse_class(raw: object, where: str) -> PriceClass:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a table with name, price, policy")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"{_key(where, 'name')}: must match [a-z][a-z0-9_-]*, got {name!r}")
    where = f"{where}({name})"
    priority = raw.get("priority")
    if priority == 0 and raw.get("policy", "fifo") != "fifo":  # "no priority", said explicitly
        raw = {k: x for k, x in raw.items() if k != "priority"}
        priority = None
    v = check(where, KEYS, raw)
    policy = v["policy"]
    if policy == "fifo" and not priority:
        raise ConfigError(f"{_key(where, 'priority')}: fifo needs an integer priority 1..98")
    if policy != "fifo" and priority is not None:
        raise ConfigError(f"{_key(where, 'priority')}: only fifo classes take a priority")
    return PriceClass(
        name, v["price"], policy, v["priority"] if policy == "fifo" else 0, 0, v["description"]
    )


def parse_classes(
    raw: object, where: str = "class", daemon_priority: int | None = None
) -> ClassTable:
    """[[class]] tables -> ClassTable with ranks by price; raises ConfigError."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: need at least one [[{where}]] table")
    parsed = [parse_class(c, f"{where}[{i}]") for i, c in enumerate(raw)]
    seen: dict[str, int] = {}
    for i, c in enumerate(parsed):
        if c.name in seen:
            raise ConfigError(f"{where}[{i}].name: duplicate class {c.name!r}")
        seen[c.name] = i
    by_price = sorted(parsed, key=lambda c: c.price)
    for lo, hi in zip(by_price, by_price[1:], strict=False):
        w = f"{where}[{seen[hi.name]}]({hi.name})"
        if lo.price == hi.price:
            raise ConfigError(f"{w}.price: same price as {lo.name!r}; classes are ordered by price")
        if hi.level() <= lo.level():
            raise ConfigError(
                f"{w}.policy: costs more than {lo.name!r} but gets {hi.sched_text()} "
                f"against its {lo.sched_text()}; a dearer class needs strictly stronger scheduling"
            )
        if lo.is_rt and hi.priority - lo.priority < 2:
            raise ConfigError(
                f"{w}.priority: must be at least 2 above {lo.name!r} ({lo.priority}): "
                "a job's shim runs at its class priority + 1"
            )
    top = by_price[-1]
    if daemon_priority is not None and top.is_rt and top.priority + 1 >= daemon_priority:
        raise ConfigError(
            f"{where}[{seen[top.name]}]({top.name}).priority: must be below the daemon's "
            f"priority {daemon_priority} minus 1, got {top.priority}"
        )
    ranked = [
        PriceClass(c.name, c.price, c.policy, c.priority, rank, c.description)
        for rank, c in enumerate(by_price)
    ]
    return ClassTable(ranked)

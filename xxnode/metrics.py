"""Prometheus metrics of xxnode, xxshard and xxgate (every name: docs/metrics.md).

Two kinds, kept apart on purpose:

* what happens once per invocation — its outcome, its time in queue and its latency — is
  recorded as it happens (`finished()`: a dict lookup, a counter and a histogram, 1.4 µs
  measured; `queued()` 0.9 µs);
* everything that is already state somewhere (queues, running jobs, environments, the memory
  manager's counters, the wire's drop counters, budgets, PSI) is read when Prometheus scrapes,
  by a collector per daemon: nothing on the hot path keeps a second copy of it.

Each series of the per-invocation metrics carries ``stage`` (gateway | shard | node: who
measured it — the same invocation is seen by all three) and ``kind`` (function | job). /metrics
is served on an address of its own (``metrics_listen``, off by default) on the daemon's event
loop, so a collector reads the daemon's tables between its callbacks, never while one of them
is changing them; that address is for the monitoring network, not the public API port.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from xxnode import wire

log = logging.getLogger("xxnode.metrics")

# From a warm function's sub-millisecond round trip to a batch job's minutes.
BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0, 1800.0,
)  # fmt: skip

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

_LABELS = ("stage", "class", "kind")
INVOCATIONS = Counter(
    "xx_invocations", "Invocations (functions) and jobs finished, by outcome",
    (*_LABELS, "outcome"), registry=REGISTRY,
)  # fmt: skip
QUEUE = Histogram(
    "xx_queue_seconds", "Time from arrival to start (node) or to a node's ACCEPT (shard)",
    _LABELS, buckets=BUCKETS, registry=REGISTRY,
)  # fmt: skip
LATENCY = Histogram(
    "xx_latency_seconds",
    "Arrival to result: the gateway's request, the shard's SUBMIT to DONE, the node's run",
    _LABELS, buckets=BUCKETS, registry=REGISTRY,
)  # fmt: skip

_children: dict[tuple, tuple] = {}  # (stage, class, kind, outcome) -> (counter, latency)
_queues: dict[tuple, object] = {}  # (stage, class, kind) -> its queue histogram


def finished(
    stage: str, cls: str, kind: str, outcome: str, latency_s: float, queue_s: float | None = None
) -> None:
    """One invocation or job done: its outcome, latency and (when this stage measured it
    then) its time in queue. With `queued()`, the hot path's only calls into metrics."""
    key = (stage, cls, kind, outcome)
    ch = _children.get(key)
    if ch is None:
        ch = _children[key] = (INVOCATIONS.labels(*key), LATENCY.labels(stage, cls, kind))
    ch[0].inc()
    ch[1].observe(max(latency_s, 0.0))
    if queue_s is not None:  # a stage that does not queue shows no queue series at all
        queued(stage, cls, kind, queue_s)


def queued(stage: str, cls: str, kind: str, seconds: float) -> None:
    """Time in queue, where it ends before the invocation does (the shard: a node's ACCEPT)."""
    key = (stage, cls, kind)
    h = _queues.get(key)
    if h is None:
        h = _queues[key] = QUEUE.labels(*key)
    h.observe(max(seconds, 0.0))


def declare(stage: str, classes: Iterable[str], kinds: Iterable[str], queues: bool) -> None:
    """Every class's series at zero before its first invocation, so that rate() sees that
    first one too (a series born with its first count shows no increase)."""
    for cls in classes:
        for kind in kinds:
            LATENCY.labels(stage, cls, kind)
            INVOCATIONS.labels(stage, cls, kind, "succeeded")
            if queues:
                QUEUE.labels(stage, cls, kind)


def kind_of(spec: object) -> str:
    """A cluster job's kind: a function invocation, or a command (job)."""
    return "function" if isinstance(spec, dict) and "function" in spec else "job"


def outcome_of_status(status: int) -> str:
    """A DONE's status in the words xx_invocations_total's outcome uses."""
    if status == 0:
        return "succeeded"
    if status > 0:
        return "failed"
    return _STATUS.get(status, "failed")


_STATUS = {wire.NODE_LOST: "lost", wire.FAILED_START: "not_started", wire.CANCELLED: "cancelled"}


# -- serving ------------------------------------------------------------------------------
class StateCollector(Collector):
    """Families read from a daemon's state at scrape time. A read that fails costs this
    collector's families for that one scrape (logged), never the scrape itself."""

    def __init__(self, name: str, read: Callable[[], Iterable[Metric]]):
        self.name, self.read = name, read

    def collect(self) -> Iterator[Metric]:
        try:
            yield from list(self.read())
        except Exception:  # a scrape must not take the daemon's logs down with it
            log.exception("metrics: reading %s failed", self.name)

    def describe(self) -> list:
        return []  # no fixed set: what exists at scrape time


async def serve(addr: str, collectors: Iterable[Collector] = (), registry=REGISTRY):
    """Serve GET /metrics at HOST:PORT on the running loop; returns (runner, bound address).
    ``collectors`` join ``registry`` (and leave it again at runner.cleanup())."""
    from aiohttp import web

    added = list(collectors)
    for c in added:
        registry.register(c)

    async def metrics(request: web.Request) -> web.Response:
        encode, ctype = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(registry), headers={"Content-Type": ctype})

    async def index(request: web.Request) -> web.Response:
        return web.Response(text="XX metrics: /metrics\n")

    async def unregister(app) -> None:
        for c in added:
            with contextlib.suppress(KeyError):
                registry.unregister(c)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", index)
    app.on_cleanup.append(unregister)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    host, port = wire.parse_addr(addr)
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        await runner.cleanup()
        why = os.strerror(e.errno) if e.errno else str(e)
        raise OSError(f"metrics_listen {addr}: {why}") from None
    bound = runner.addresses[0]
    log.info("metrics on http://%s:%d/metrics", bound[0], bound[1])
    return runner, (bound[0], bound[1])


# -- what every daemon shares ---------------------------------------------------------------
def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def wire_families(endpoints: Iterable) -> list[Metric]:
    """xx_wire_drops_total{reason}: datagrams refused on the way in (codec: bad MAC, stale,
    replayed, ...) and lost on the way out (send buffer full, injected loss); and
    xx_wire_events_total{event}: the endpoint's other counters (retransmits, ...)."""
    drops: dict[str, int] = {}
    events: dict[str, int] = {}
    for ep in endpoints:
        if ep is None:
            continue
        for reason, n in ep.codec.dropped.items():
            drops[reason] = drops.get(reason, 0) + n
        for name, n in ep.stats.items():
            if name in ("send_full", "dropped_out"):
                r = "injected_loss" if name == "dropped_out" else name
                drops[r] = drops.get(r, 0) + n
            else:
                events[name] = events.get(name, 0) + n
    d = _counter("xx_wire_drops", "UDP datagrams dropped, by reason", ("reason",))
    for reason, n in sorted(drops.items()):
        d.add_metric((reason,), n)
    e = _counter("xx_wire_events", "The UDP endpoint's counters (retransmits, ...)", ("event",))
    for name, n in sorted(events.items()):
        e.add_metric((name,), n)
    return [d, e]


def _per_class(name: str, doc: str, stage: str, counts: dict[str, int]) -> GaugeMetricFamily:
    g = _gauge(name, doc, ("stage", "class"))
    for cls, n in counts.items():
        g.add_metric((stage, cls), n)
    return g


# -- xxnode ---------------------------------------------------------------------------------
PSI_RESOURCES = ("cpu", "memory", "io")


def psi_families(pressure_dir: Path, class_dirs: dict[str, Path]) -> list[Metric]:
    """PSI of the machine (/proc/pressure/*) and of each class's cgroup (memory.pressure)."""
    from xxnode.kernel import psi

    total = _counter(
        "xx_psi_stall_seconds", "Time some/all tasks stalled on a resource (PSI total)",
        ("resource", "kind"),
    )  # fmt: skip
    avg = _gauge(
        "xx_psi_avg10_ratio", "Share of the last 10 s stalled (PSI avg10 / 100)",
        ("resource", "kind"),
    )  # fmt: skip
    for res in PSI_RESOURCES:
        try:
            p = psi.read_pressure(pressure_dir / res)
        except (OSError, ValueError, KeyError):
            continue
        for kind, v in p.items():
            total.add_metric((res, kind), v.total_us / 1e6)
            avg.add_metric((res, kind), v.avg10 / 100)
    cls_total = _counter(
        "xx_class_memory_psi_stall_seconds", "Memory stall time of a class's cgroup (PSI)",
        ("class", "kind"),
    )  # fmt: skip
    for cls, d in class_dirs.items():
        try:
            p = psi.read_pressure(d / "memory.pressure")
        except (OSError, ValueError, KeyError):
            continue
        for kind, v in p.items():
            cls_total.add_metric((cls, kind), v.total_us / 1e6)
    return [total, avg, cls_total]


def node_families(node) -> Iterator[Metric]:
    """What `xxctl status`, `memory` and `fn envs` show, as metrics."""
    names = node.classes.names()
    running = dict.fromkeys(names, 0)
    for j in node.jobs.values():
        if j.state == "running":
            running[j.cls] = running.get(j.cls, 0) + 1
    queued = dict(node.queue.by_class())
    pool = node.functions
    envs: dict[str, int] = {}
    if pool is not None:
        for e in pool.envs.values():
            if e.current is not None:
                running[e.current.cls] = running.get(e.current.cls, 0) + 1
            try:
                s = e.describe()["state"]
            except OSError:  # it died between the listing and the read: gone, not counted
                continue
            envs[s] = envs.get(s, 0) + 1
        for q in pool.waiting.values():
            for _, _, inv in q:
                queued[inv.cls] = queued.get(inv.cls, 0) + 1
    yield _per_class("xx_running", "Jobs and invocations running now", "node", running)
    yield _per_class("xx_queued", "Jobs and invocations waiting to start", "node", queued)
    g = _gauge("xx_environments", "Function environments by state", ("state",))
    for s in ("starting", "running", "idle", "frozen", "swapped"):
        g.add_metric((s,), envs.pop(s, 0))
    for s, n in envs.items():
        g.add_metric((s,), n)
    yield g
    if pool is not None:
        c = _counter("xx_function_events", "The warm pool's counters", ("event",))
        for k, n in pool.stats.items():
            if k != "invocations":
                c.add_metric((k,), n)
        yield c
    yield from memory_families(node.memory, names)
    root = node.host.root.path
    yield from psi_families(Path("/proc/pressure"), {c: root / c for c in names})
    if node.dispatcher is not None:
        yield from wire_families([node.dispatcher.ep])


def memory_families(mem, names: Iterable[str]) -> Iterator[Metric]:
    """The memory manager's counters (Stats) and its last sample; read only."""
    st = mem.stats
    r = _counter("xx_reclaimed_bytes", "Bytes reclaimed (memory.reclaim) by class", ("class",))
    s = _counter(
        "xx_swapin_bytes", "Bytes swapped back in ahead of need (prefetch) by class", ("class",)
    )
    for cls in (*names, "idle"):
        r.add_metric((cls,), st.reclaimed_by_class.get(cls, 0))
        s.add_metric((cls,), st.prefetched_by_class.get(cls, 0))
    yield r
    yield s
    c = _counter("xx_memory_events", "The memory manager's counters", ("event",))
    for k in ("reclaims", "psi_events", "shortfall_events", "idle_evictions", "tick_errors"):
        c.add_metric((k,), getattr(st, k, 0))
    yield c
    last = mem.last
    if last is not None:
        yield GaugeMetricFamily("xx_memory_total_bytes", "MemTotal", value=last.total)
        yield GaugeMetricFamily("xx_memory_available_bytes", "MemAvailable", value=last.available)
        used = _gauge("xx_class_memory_bytes", "memory.current of jobs, by class", ("class",))
        swp = _gauge("xx_class_swap_bytes", "memory.swap.current of jobs, by class", ("class",))
        per = {c: [0, 0] for c in (*names, "idle")}
        for j in last.jobs:
            p = per.setdefault(j.cls, [0, 0])
            p[0] += j.current
            p[1] += j.swap
        for cls, (cur, sw) in per.items():
            used.add_metric((cls,), cur)
            swp.add_metric((cls,), sw)
        yield used
        yield swp


# -- xxshard --------------------------------------------------------------------------------
def shard_families(shard) -> Iterator[Metric]:
    queued = dict.fromkeys(shard.classes.names(), 0)
    running = dict(queued)
    for j in shard.jobs.values():
        table = queued if j.state == "queued" else running
        table[j.cls] = table.get(j.cls, 0) + 1
    yield _per_class("xx_queued", "Jobs held, not yet accepted by a node", "shard", queued)
    yield _per_class("xx_running", "Jobs placed (or being placed) on a node", "shard", running)
    n = _gauge("xx_shard_nodes", "Nodes the shard knows, and those on its idle list", ("list",))
    n.add_metric(("known",), len(shard.nodes))
    n.add_metric(("idle",), len(shard.idle))
    yield n
    c = _counter("xx_shard_events", "The shard's counters (submitted, placed, ...)", ("event",))
    for k, v in shard.counts.items():
        c.add_metric((k,), v)
    yield c
    yield from wire_families([shard.ep])


# -- xxgate ---------------------------------------------------------------------------------
BUDGET_STATES = ("normal", "degrade", "throttle")


def gateway_families(gate) -> Iterator[Metric]:
    """xx_budget_state{tenant,state}: 1 for each tenant's state now, 0 for the others — the
    tenants this gateway decided for within the budget cache's reach (budgets.Budgets)."""
    g = _gauge("xx_budget_state", "A tenant's budget state (1: current)", ("tenant", "state"))
    for tenant, (_, d) in list(gate.budgets._cache.items()):
        for s in BUDGET_STATES:
            g.add_metric((tenant, s), 1.0 if d.state == s else 0.0)
    yield g
    b = _gauge("xx_gateway_body_bytes", "Request bytes being read or held now")
    b.add_metric((), gate.body_bytes)
    yield b
    client = getattr(gate.invocations.invoker, "client", None)
    yield from wire_families([getattr(client, "ep", None)])


def node_collector(node) -> Collector:
    return StateCollector("xxnode", lambda: node_families(node))


def shard_collector(shard) -> Collector:
    return StateCollector("xxshard", lambda: shard_families(shard))


def gateway_collector(gate) -> Collector:
    return StateCollector("xxgate", lambda: gateway_families(gate))

"""The node's side of the cluster: the dispatcher, run inside xxnode.

The dispatcher (xxnode/cluster/dispatcher.py) joins shard idle lists, answers probes and takes
placements; here its executor is this daemon itself — a placed job is admitted like a local
`xxctl run`, with its class's cgroup, SCHED_FIFO priority and OOM rank, and the free
memory and job count it publishes are the memory manager's, not a guess from /proc.

It is also the dispatcher's ledger, in the node's journal, so the cluster's side of a job
survives a restart of the node (records in xxnode/journal.py):

  placed       fsync'd before the shard hears ACCEPT: the PLACE and the shard that sent it
  accepted     the local job, with cluster = {job, arbiter, shard}, once the arbiter granted it
  invoked      a function invocation began (not fsync'd: it guards against a rerun after the
               daemon's kill -9, whose writes the page cache keeps)
  done_acked   every receiver acknowledged the job's DONE: nothing more is owed
  done_abandoned  no receiver answered for the dispatcher's whole delivery horizon

On restart, each placement without done_acked/done_abandoned goes back to the dispatcher: with
no local job yet it runs from the claim on (the arbiter grants the same node again); with one
it waits for that job (adopted or re-queued by recovery) or takes its journaled result, and
sends DONE with it. Either way the job ran once. A function invocation (spec.function) runs
in the warm pool, not as a job: one that a restart interrupted is reported failed, never run
twice — the environments of the earlier run are gone, and a caller waiting on it retries as
Lambda's callers do.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from collections import OrderedDict

import msgspec

from xxnode import logs, wire
from xxnode.cluster import code
from xxnode.cluster.dispatcher import ClusterJob, Dispatcher
from xxnode.config import ClusterConfig
from xxnode.node.crash import crash_point
from xxnode.node.env.local import RequestError, function_of
from xxnode.node.jobs import SpecError
from xxnode.node.recovery import Placement
from xxnode.node.usage import UsageOutbox

OUTPUT_BUDGET = wire.MAX_PAYLOAD - 4096  # both streams, as the DONE's payload carries them
TAIL = 2048  # bytes of each stream `xxctl job` shows: with the rest, one datagram
KEEP_LOCAL_IDS = 10_000
log = logging.getLogger("xxnode")


def place_record(m: wire.Place) -> dict:
    return {
        "job": m.job.hex(), "cls": m.cls, "arbiter": m.arbiter, "spec": m.spec, "size": m.size,
        "digest": m.digest.hex(), "inline": base64.b64encode(m.inline).decode(),
    }  # fmt: skip


def place_from_record(r: dict) -> wire.Place:
    return wire.Place(
        bytes.fromhex(r["job"]), r["cls"], r["arbiter"], r["spec"], r["size"],
        bytes.fromhex(r["digest"]), base64.b64decode(r["inline"]),
    )  # fmt: skip


class NodeExecutor:
    """Runs placed jobs on this node (the Executor the dispatcher drives) and keeps the
    dispatcher's ledger in the node's journal."""

    def __init__(
        self, node, placements: dict[str, Placement] | None = None, key: bytes = b"",
        node_id: str = "",
    ) -> None:  # fmt: skip
        self.node = node
        self.key = key  # the cluster key: proves this node to the code store and the ledger
        self.node_id = node_id or os.uname().nodename
        self.usage = UsageOutbox(node.cfg.state_dir / "usage.db", key, self.node_id)
        self._fetching: dict[str, asyncio.Future] = {}  # digest -> its one pull in flight
        self.total_bytes = node.memory.sample().total
        self.placements = dict(placements or {})  # cluster job hex -> unsettled placement
        # cluster job hex -> our job id, for `xxctl job` / `cancel` (bounded; a restart
        # keeps only the unsettled ones)
        self.local_of: OrderedDict[str, str] = OrderedDict(
            (h, p.local) for h, p in self.placements.items() if p.local
        )
        self.refusals: OrderedDict[str, str] = OrderedDict()  # cluster job hex -> why not run
        # cluster job hex -> a finished invocation's status, error and report: what `job`
        # queries (a detached Event's gateway) learn of it; bounded, in memory
        self.invoked: OrderedDict[str, dict] = OrderedDict()

    # -- ledger -------------------------------------------------------------------------
    def placed(self, m: wire.Place, shard: wire.Addr) -> None:
        hexid, addr = m.job.hex(), wire.fmt_addr(shard)
        self.placements[hexid] = Placement(place_record(m), addr)
        self.node.journal.append(
            {"ev": "placed", "job": hexid, "t": time.time(), "shard": addr,
             "place": self.placements[hexid].place}, sync=True,
        )  # fmt: skip
        crash_point("after-place")

    def settled(self, job: bytes, acked: bool) -> None:
        hexid = job.hex()
        self.placements.pop(hexid, None)
        ev = "done_acked" if acked else "done_abandoned"
        self.node.journal.append({"ev": ev, "job": hexid, "t": time.time()}, sync=True)

    def unsettled(self) -> list[tuple[wire.Place, wire.Addr, bool]]:
        """(PLACE, shard, granted) of every placement a restart left unreported; granted:
        we had admitted it, so the arbiter had granted it to us."""
        return [
            (place_from_record(p.place), wire.parse_addr(p.shard), p.local is not None)
            for p in self.placements.values()
        ]

    # -- executor -----------------------------------------------------------------------
    def snapshot(self) -> tuple[int, int]:
        s = self.node.memory.last or self.node.memory.sample()
        return s.available, sum(1 for j in self.node.jobs.values() if j.state == "running")

    def admit(self, cls: str) -> str | None:
        """Refuse only when memory is critically short *and* work of this class or better
        holds it: lower classes would be swapped out for this job, equals and betters not."""
        node, mem = self.node, self.node.memory
        c = node.classes.get(cls)
        if c is None:
            return f"unknown class {cls!r}"
        s = mem.last or mem.sample()
        if s.available >= s.total * mem.cfg.low_free_fraction:
            return None
        if any(
            j.state == "running" and node.classes.get(j.cls).rank >= c.rank
            for j in node.jobs.values()
        ):
            return "memory critically short, held by equal or higher classes"
        return None

    async def run(self, job: ClusterJob) -> dict:
        p = self.placements.get(job.id.hex())
        if "function" in job.spec:
            return await self._invoke(job, p)
        if p is not None and p.result is not None:  # finished before a restart
            return self._reported(p.local, p.result)
        if p is not None and p.local is not None:  # adopted or re-queued by recovery
            res = await self.node.wait(p.local)
            if res is None:
                return {"status": wire.FAILED_START, "error": f"job {p.local} lost on restart"}
            return self._reported(p.local, res)
        req = {"class": job.cls, "argv": job.spec.get("argv", [])}
        for k in ("env", "cwd", "timeout"):
            if k in job.spec:
                req[k] = job.spec[k]
        if job.payload:
            req["stdin"] = base64.b64encode(job.payload).decode()
        cluster = {"job": job.id.hex(), "arbiter": job.arbiter, "shard": job.shard}
        try:
            local = self.node.submit(req, cluster=cluster)
        except SpecError as e:
            _keep(self.refusals, job.id.hex(), str(e))
            return {"status": wire.FAILED_START, "error": f"job refused: {e}"}
        if p is not None:
            p.local = local.id
        _keep(self.local_of, job.id.hex(), local.id)
        return self._reported(local.id, await self.node.wait(local.id))

    async def _invoke(self, job: ClusterJob, p: Placement | None) -> dict:
        """A placed invocation, run as `xxctl fn run` runs one: the job's input is the event.
        The response rides as JSON text (a DONE too big for a datagram carries it by
        digest), beside the error, the usage report and the log."""
        hexid = job.id.hex()
        if p is not None and p.invoked:
            return {"status": wire.FAILED_START,
                    "error": "the node restarted during the invocation; it was not run again"}  # fmt: skip
        pool = self.node.functions
        if pool is None:
            return {
                "status": wire.FAILED_START,
                "error": "functions are not available on this node",
            }
        req = {**job.spec["function"], "class": job.cls, "env": job.spec.get("env") or {}}
        if "timeout" in job.spec:
            req["timeout"] = job.spec["timeout"]
        url = req.pop("code_url", None)
        try:
            fn = await function_of(pool, req, lambda d: self._fetch(url, d))
        except RequestError as e:
            _keep(self.refusals, hexid, str(e))
            return {"status": wire.FAILED_START, "error": f"function refused: {e}"}
        if p is not None:
            p.invoked = True
            self.node.journal.append({"ev": "invoked", "job": hexid, "t": time.time()})
        chain = dict(job.spec.get("caller") or {}, gateway=url or "")
        res = await pool.invoke(fn, job.payload or b"{}", job.cls, chain)
        # metered before the result leaves: a result the caller saw is always billed
        self.usage.add(self._usage_record(hexid, job, res["report"]), url or "")
        err = res["error"]
        _observe(job, res["report"], err)
        _keep(self.invoked, hexid, {
            "status": 0 if err is None else 1,
            "error": None if err is None else {k: str(v)[:1024] for k, v in err.items() if k != "stackTrace"},
            "report": res["report"],
        })  # fmt: skip
        return {
            "status": 0 if res["error"] is None else 1,
            "response": json.dumps(res["response"]),
            "content_type": res["content_type"],
            "error": res["error"],
            "report": res["report"],
            "log": res["log"],
        }

    def _usage_record(self, hexid: str, job: ClusterJob, rep: dict) -> dict:
        """The ledger's record of one invocation (ledger/usage.py reads it). The caller's
        context (class inheritance) says whose the premium is; without one the call came
        from outside XX and the function's own tenant pays all."""
        ctx = job.spec.get("caller") or {}
        own = ctx.get("own_class") or job.cls
        c = self.node.classes.get(own)
        return {
            "id": hexid, "tenant": rep["tenant"], "function": rep["function"],
            "version": rep["version"], "class": job.cls, "own_class": own,
            "payer": ctx.get("payer") or rep["tenant"], "depth": int(ctx.get("depth", 0)),
            "node": self.node_id, "finished_at": time.time(), "cpu_ms": rep["cpu_ms"],
            "gb_s": rep["gb_s"], "cpu_price": rep["cpu_price"],
            "own_cpu_price": rep["cpu_price"] if c is None else min(c.price, rep["cpu_price"]),
            "memory_price": rep["memory_price"], "duration_ms": rep["duration_ms"],
            "billed_ms": rep["billed_ms"], "max_memory_mb": rep["max_memory_mb"],
            "memory_source": rep["memory_source"], "cold": rep["cold"],
        }  # fmt: skip

    async def _fetch(self, url: str, digest: str) -> bytes:
        """One pull per digest however many invocations want it at once."""
        fut = self._fetching.get(digest)
        if fut is None:
            limit = self.node.functions.cfg.max_code_zipped
            fut = asyncio.ensure_future(asyncio.to_thread(code.fetch, url, digest, self.key, limit))
            self._fetching[digest] = fut
            fut.add_done_callback(lambda _: self._fetching.pop(digest, None))
        return await asyncio.shield(fut)

    # -- `xxctl job` / `xxctl cancel`, through the job's shard ----------------------------
    def describe(self, job: bytes) -> dict:
        """Our job for this cluster job: its state, and once done its result and the tail
        of each stream (what fits a datagram; `submit --wait` gets them whole)."""
        if (inv := self.invoked.get(job.hex())) is not None:
            return {"result": inv}
        local = self.local_of.get(job.hex())
        if local is None:
            why = self.refusals.get(job.hex())
            refused = {"status": wire.FAILED_START, "error": f"job refused: {why}"}
            return {} if why is None else {"result": refused}
        out: dict = {"local": local}
        running = self.node.jobs.get(local)
        if running is not None:
            out["local_state"] = running.state
            return out
        res = self.node.finished.get(local)
        if res is None:
            return out
        keep = ("state", "reason", "exit_code", "signal", "cpu_ms", "wall_ms", "charge_uc")
        out["result"] = {k: res[k] for k in keep if k in res}
        for stream in ("stdout", "stderr"):
            size, tail = self._tail(local, stream)
            out[stream] = tail.decode(errors="replace")
            out[f"{stream}_cut"] = size - len(tail)
        return out

    def _tail(self, local: str, stream: str) -> tuple[int, bytes]:
        """(size, last TAIL bytes) of a stream: only the tail is read."""
        try:
            with open(self.node.host.job_dir(local) / stream, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(size - TAIL, 0))
                return size, f.read(TAIL)
        except FileNotFoundError:
            return 0, b""

    def cancel(self, job: bytes, reason: str) -> dict:
        local = self.local_of.get(job.hex())
        if local is None:
            return {"ok": False, "reason": "no job of that id on this node"}
        r = self.node.kill(local, f"cancelled: {reason}")
        return {"ok": bool(r.get("ok")), "reason": r.get("error", ""), "local": local}

    def _reported(self, local: str, res: dict) -> dict:
        """The result a DONE carries: the node's record, the cluster status, and both
        streams up to the node's output_limit — cut further, and counted as dropped, only
        where the two together would pass what a DONE can carry (MAX_PAYLOAD)."""
        res = dict(res)
        code, sig = res.get("exit_code"), res.get("signal")
        res["status"] = code if code is not None else (128 + sig if sig else wire.FAILED_START)
        lim = self.node.cfg.output_limit
        raw = {s: self._read(local, s, lim) for s in ("stdout", "stderr")}
        while True:
            text = {s: b.decode(errors="replace") for s, b in raw.items()}
            over = len(msgspec.msgpack.encode(text)) - OUTPUT_BUDGET
            if over <= 0:
                break
            longest = max(raw, key=lambda s: len(raw[s]))
            cut = min(len(raw[longest]), over + 16)
            raw[longest] = raw[longest][: len(raw[longest]) - cut]
            res[f"{longest}_dropped"] = res.get(f"{longest}_dropped", 0) + cut
        res.update(text)
        return res

    def _read(self, local: str, stream: str, limit: int) -> bytes:
        try:
            with open(self.node.host.job_dir(local) / stream, "rb") as f:
                return f.read(limit)
        except FileNotFoundError:
            return b""


async def start(node, cfg: ClusterConfig, placements: dict[str, Placement]) -> Dispatcher:
    key = wire.load_key(cfg.key_file)
    node_id = cfg.node_id or f"{os.uname().nodename}-{node.host.root.path.name}"
    ex = NodeExecutor(node, placements, key, node_id)
    ex.usage.start()
    if node.functions is not None:
        node.functions.proxy.key = key  # it vouches for callers with the cluster key
    d = Dispatcher(node_id, [wire.parse_addr(s) for s in cfg.shards], ex, ledger=ex)
    try:
        await d.start(wire.parse_addr(cfg.listen), wire.Codec(key))
    except OSError as e:
        raise RuntimeError(f"cluster.listen {cfg.listen}: {e.strerror}") from None
    for m, shard, granted in ex.unsettled():
        d.resume(m, shard, granted)
    return d


def _observe(job: ClusterJob, rep: dict, err: dict | None) -> None:
    """An invocation's log line (the pool counts its metrics): at debug when it succeeded
    (a line per invocation costs what the warm path is measured in), at info when not."""
    outcome = "succeeded" if err is None else "failed"
    if err is not None and err.get("errorType") == "Sandbox.Timedout":
        outcome = "timeout"
    level = logging.DEBUG if err is None else logging.INFO
    if log.isEnabledFor(level):
        log.log(
            level, "invocation %s of %s (%s) %s in %.1f ms%s%s", rep["request_id"],
            rep["function"], job.cls, outcome, rep["duration_ms"],
            " (cold)" if rep["cold"] else "", f": {err.get('errorType')}" if err else "",
            extra=logs.about(invocation=logs.invocation_id(job.id), cls=job.cls,
                             tenant=rep["tenant"], function=rep["function"], env=rep["env"]),
        )  # fmt: skip


def _keep(table: OrderedDict, key: str, value) -> None:
    """Remember ``key``, forgetting the oldest past KEEP_LOCAL_IDS."""
    table[key] = value
    while len(table) > KEEP_LOCAL_IDS:
        table.popitem(last=False)

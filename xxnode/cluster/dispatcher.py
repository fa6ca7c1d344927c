"""The node's dispatcher (paper §3.2): the node's voice towards the shards.

* idle list: from the executor's ``snapshot()`` it joins (power-of-k over shards by
  idle-list length), updates and leaves a shard's idle list with the hysteresis of
  ``xxnode.policy.dispatcher.idle_action``; a shard that stops answering is dropped
  and the next snapshot joins another.  A HELLO heartbeat goes to every shard so each
  can probe us and notice our death.
* PLACE: deduped by job id (a repeat is answered ACCEPT again and starts nothing);
  refused when the executor says so (``admit``); otherwise the input is pulled from
  the shard if it did not ride inline, the job is CLAIMed from its arbiter and runs
  only if granted -- so two placements of one job (after a shard or node failure)
  never both run.  DONE, with the executor's accounting, goes to the arbiter and the
  shard, retransmitted until acknowledged (or for ``deliver_for`` seconds).
* ledger (optional): ``placed(place, shard)`` is called, and must be durable, before
  the shard hears ACCEPT; ``settled(job, acked)`` once DONE is delivered or given up.
  A restarted node hands the unsettled placements back through ``resume`` -- so a
  job accepted before a crash is still run (once) and reported after it.

The executor is small on purpose so the node daemon, a test or the benchmark can
drive it: ``async run(job) -> dict`` (must hold ``status``), ``snapshot() -> (free_bytes,
running_jobs)``, ``total_bytes`` and optionally ``admit(cls) -> reason | None``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Protocol

import msgspec

from xxnode import wire
from xxnode.policy.dispatcher import JOIN, LEAVE, UPDATE, IdleParams, Listing, choose_shard
from xxnode.policy.dispatcher import idle_action as _idle_action
from xxnode.wire import Addr, Message

KEEP_JOBS = 100_000


@dataclass(slots=True)
class ClusterJob:
    id: bytes
    cls: str
    spec: dict
    payload: bytes
    arbiter: str = ""  # host:port that granted it
    shard: str = ""  # host:port of the shard that placed it


class Executor(Protocol):
    total_bytes: int

    async def run(self, job: ClusterJob) -> dict: ...

    def snapshot(self) -> tuple[int, int]: ...


class Ledger(Protocol):
    def placed(self, m: wire.Place, shard: Addr) -> None: ...

    def settled(self, job: bytes, acked: bool) -> None: ...


class Dispatcher(wire.Service):
    def __init__(
        self,
        node_id: str,
        shards: list[Addr],
        executor: Executor,
        params: IdleParams | None = None,
        k: int = 2,
        heartbeat_s: float = 0.25,
        claim_timeout: float = 10.0,
        seed: int | None = None,
        ledger: Ledger | None = None,
        deliver_for: float = 600.0,
    ) -> None:
        self.node_id = node_id
        self.ledger = ledger
        self.deliver_for = deliver_for  # a DONE nobody acknowledges this long is given up
        self.shards = list(shards)
        self.ex = executor
        self.params = params or IdleParams()
        self.k = k
        self.heartbeat_s = heartbeat_s
        self.claim_timeout = claim_timeout
        self.rng = random.Random(seed)
        self.listing: Listing | None = None
        self.jobs: OrderedDict[bytes, str] = OrderedDict()  # id -> accepted|running|done|denied
        self.counts = dict.fromkeys(("accepted", "refused", "ran", "denied", "failed"), 0)
        self.ep: wire.Endpoint | None = None
        self._kick = asyncio.Event()
        self._confirmed = 0.0
        self.refresh_s = 1.0  # confirm a listing at least this often

    async def start(self, bind: Addr, codec: wire.Codec, drop: float = 0.0, seed=None) -> Addr:
        self.ep = await wire.open_endpoint(bind, codec, self.handle, drop, seed)
        self._spawn(self._loop())
        return self.ep.addr

    # requests from shards --------------------------------------------------------------
    def handle(self, msg: Message, addr: Addr):
        kind = type(msg)
        if kind is wire.Place:
            return self._on_place(msg, addr)
        if kind is wire.Probe:
            free, running = self.ex.snapshot()
            return wire.ProbeReply(running, max(free, 0))
        if kind is wire.Status:
            free, running = self.ex.snapshot()
            data = {
                "node": self.node_id,
                "free": free,
                "running": running,
                "listed": None if self.listing is None else str(self.listing.shard),
                "counts": self.counts,
                "dropped": dict(self.ep.codec.dropped),
            }
            return wire.StatusReply(data)
        if kind is wire.JobQuery or kind is wire.Cancel:
            return self._on_job_request(msg)
        return wire.Error(f"dispatcher does not take {msg.kind}")

    def _on_job_request(self, m: wire.JobQuery | wire.Cancel) -> Message:
        """`xxctl job` / `xxctl cancel`, through the job's shard: the executor answers
        (an executor without ``describe``/``cancel`` says so)."""
        state = self.jobs.get(m.job, "unknown")
        if type(m) is wire.JobQuery:
            describe = getattr(self.ex, "describe", None)
            more = describe(m.job) if describe is not None else {}
            return wire.StatusReply({"node": self.node_id, "state": state, **more})
        cancel = getattr(self.ex, "cancel", None)
        if cancel is None:
            return wire.StatusReply({"ok": False, "reason": "this executor cannot cancel"})
        return wire.StatusReply(cancel(m.job, m.reason))

    def _on_place(self, m: wire.Place, shard: Addr) -> Message:
        if m.job in self.jobs:
            return wire.Accept(m.job)  # a repeat: already ours
        admit = getattr(self.ex, "admit", None)
        reason = admit(m.cls) if admit is not None else None
        if reason:
            self.counts["refused"] += 1
            return wire.Refuse(m.job, reason)
        if self.ledger is not None:
            self.ledger.placed(m, shard)
        self.jobs[m.job] = "accepted"
        while len(self.jobs) > KEEP_JOBS:
            self.jobs.popitem(last=False)
        self.counts["accepted"] += 1
        if self.listing is not None and self.listing.shard == shard:
            self.listing = replace(self.listing, jobs=self.listing.jobs + 1)
        self._spawn(self._run(m, shard))
        return wire.Accept(m.job)

    def resume(self, m: wire.Place, shard: Addr, granted: bool) -> None:
        """Finish a placement accepted before a restart (from the ledger); ``granted``: the
        arbiter had granted it and the executor holds it, so it is not claimed again."""
        self.jobs[m.job] = "running" if granted else "accepted"
        self._spawn(self._run(m, shard, granted))

    async def _run(self, m: wire.Place, shard: Addr, granted: bool = False) -> None:
        status, result = await self._execute(m, shard, granted)
        self.jobs[m.job] = "done"
        self._kick.set()
        await self._report(m, shard, status, result)

    def _arbiter(self, m: wire.Place, shard: Addr) -> Addr:
        return wire.parse_addr(m.arbiter) if m.arbiter else shard

    async def _execute(self, m: wire.Place, shard: Addr, granted: bool) -> tuple[int, dict]:
        """Fetch the input, claim the job from its arbiter, run it: (status, result)."""
        arbiter = self._arbiter(m, shard)
        try:
            payload = m.inline
            if m.size > len(m.inline) and not granted:  # granted: the executor has it
                payload = await self.ep.fetch(shard, m.digest, m.size)
            if not granted:
                rep = await self.ep.request(
                    arbiter, wire.Claim(m.job, self.node_id), timeout=self.claim_timeout
                )
                if type(rep) is not wire.Grant or not rep.ok:
                    self.jobs[m.job] = "denied"
                    self.counts["denied"] += 1
                    return wire.DENIED, {}
        except (TimeoutError, wire.WireError) as e:
            self.jobs[m.job] = "denied"
            return wire.DENIED, {"error": f"not started: {e}"}  # nobody is waiting for it
        self.jobs[m.job] = "running"
        job = ClusterJob(m.job, m.cls, m.spec, payload, wire.fmt_addr(arbiter),
                         wire.fmt_addr(shard))  # fmt: skip
        try:
            result = await self.ex.run(job)
            self.counts["ran"] += 1
            return int(result.get("status", 0)), result
        except Exception as e:  # the executor's failure is the job's, not ours
            self.counts["failed"] += 1
            return wire.FAILED_START, {"error": f"{type(e).__name__}: {e}"}

    async def _report(self, m: wire.Place, shard: Addr, status: int, result: dict) -> None:
        """DONE to the arbiter and the shard, each until it acknowledges; then settled.
        Output that does not fit a datagram rides as a payload the receivers pull by
        digest (``result["output"] = {digest, size}``), as inputs do."""
        arbiter = self._arbiter(m, shard)
        blob_digest = None
        done = wire.Done(m.job, self.node_id, status, result)
        try:
            wire.check(done)
        except ValueError:
            result, blob_digest = self._output_aside(result)
            done = wire.Done(m.job, self.node_id, status, result)
        try:
            wire.check(done)
        except ValueError as e:  # the job is still reported, without its accounting
            if not -(1 << 31) <= status < 1 << 31:
                status = wire.FAILED_START
            done = wire.Done(m.job, self.node_id, status, {"error": f"unreportable: {e}"})
        targets = [shard] if (arbiter == shard or status == wire.DENIED) else [arbiter, shard]
        try:
            acked = await asyncio.gather(*(self._deliver(t, done) for t in targets))
        finally:
            if blob_digest is not None:
                self.ep.payloads.pop(blob_digest, None)
        if self.ledger is not None:
            self.ledger.settled(m.job, all(acked))

    def _output_aside(self, result: dict) -> tuple[dict, bytes | None]:
        streams = {k: result[k] for k in wire.OUTPUT_FIELDS if isinstance(result.get(k), str)}
        if not streams:
            return result, None
        blob = msgspec.msgpack.encode(streams)
        if len(blob) > wire.MAX_OUTPUT:
            return result, None  # the executor should have cut it; reported without it
        dig = wire.digest(blob)
        self.ep.payloads[dig] = blob
        rest = {k: v for k, v in result.items() if k not in streams}
        rest["output"] = {"digest": dig.hex(), "size": len(blob)}
        return rest, dig

    async def _deliver(self, addr: Addr, msg: Message) -> bool:
        """Retransmit until acknowledged; False if nobody answered for deliver_for seconds
        (the receiver has failed over or given up). A shard restarting from its state dir
        answers the retransmission once it is back."""
        deadline = time.monotonic() + self.deliver_for
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await self.ep.request(addr, msg, timeout=min(left, 60.0))
                return True
            except TimeoutError:
                continue

    # idle list -------------------------------------------------------------------------
    async def _loop(self) -> None:
        self._spawn(self._heartbeat())
        while True:
            free, running = self.ex.snapshot()
            await self._idle_step(max(free, 0), running)
            self._kick.clear()
            try:
                await asyncio.wait_for(self._kick.wait(), self.heartbeat_s)
            except TimeoutError:
                pass

    async def _heartbeat(self) -> None:
        """HELLO to every shard on its own timer: an idle-list exchange stuck on a dead
        shard must not silence us towards the live ones (they would declare us dead)."""
        while True:
            free, running = self.ex.snapshot()
            hello = wire.Hello(self.node_id, max(free, 0), self.ex.total_bytes, running)
            for s in self.shards:
                self.ep.send(s, hello)
            await asyncio.sleep(self.heartbeat_s)

    async def _idle_step(self, free: int, running: int) -> None:
        act = _idle_action(self.listing, free, self.ex.total_bytes, running, self.params)
        now = time.monotonic()
        if act is None and self.listing is not None and now - self._confirmed > self.refresh_s:
            act = UPDATE  # keep-alive: a listing on a dead shard must not go unnoticed
        load = (self.node_id, free, self.ex.total_bytes, running)
        try:
            if act == JOIN:
                shard = await self._choose_shard()
                if shard is not None:
                    await self.ep.request(shard, wire.IdleJoin(*load), timeout=1.0)
                    self.listing = Listing(shard, free, running)
                    self._confirmed = now
            elif act == UPDATE:
                await self.ep.request(self.listing.shard, wire.IdleUpdate(*load), timeout=1.0)
                self.listing = Listing(self.listing.shard, free, running)
                self._confirmed = now
            elif act == LEAVE:
                shard, self.listing = self.listing.shard, None
                await self.ep.request(shard, wire.IdleLeave(self.node_id), timeout=1.0)
        except TimeoutError:
            if act != JOIN:
                self.listing = None  # that shard is gone; the next step joins another

    async def _choose_shard(self) -> Addr | None:
        picks = self.rng.sample(self.shards, min(self.k, len(self.shards)))
        replies = await asyncio.gather(
            *(self.ep.request(s, wire.LenQuery(), timeout=0.5) for s in picks),
            return_exceptions=True,
        )
        probed = [
            (s, r.length) for s, r in zip(picks, replies, strict=True) if type(r) is wire.LenReply
        ]
        return choose_shard(probed) if probed else None

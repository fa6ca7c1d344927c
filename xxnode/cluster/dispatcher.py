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
  shard, retransmitted until acknowledged.

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


class Executor(Protocol):
    total_bytes: int

    async def run(self, job: ClusterJob) -> dict: ...

    def snapshot(self) -> tuple[int, int]: ...


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
    ) -> None:
        self.node_id = node_id
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
        return wire.Error(f"dispatcher does not take {msg.kind}")

    def _on_place(self, m: wire.Place, shard: Addr) -> Message:
        if m.job in self.jobs:
            return wire.Accept(m.job)  # a repeat: already ours
        admit = getattr(self.ex, "admit", None)
        reason = admit(m.cls) if admit is not None else None
        if reason:
            self.counts["refused"] += 1
            return wire.Refuse(m.job, reason)
        self.jobs[m.job] = "accepted"
        while len(self.jobs) > KEEP_JOBS:
            self.jobs.popitem(last=False)
        self.counts["accepted"] += 1
        if self.listing is not None and self.listing.shard == shard:
            self.listing = replace(self.listing, jobs=self.listing.jobs + 1)
        self._spawn(self._run(m, shard))
        return wire.Accept(m.job)

    async def _run(self, m: wire.Place, shard: Addr) -> None:
        arbiter = wire.parse_addr(m.arbiter) if m.arbiter else shard
        status, result = wire.FAILED_START, {}
        try:
            payload = m.inline
            if m.size > len(m.inline):
                payload = await self.ep.fetch(shard, m.digest, m.size)
            rep = await self.ep.request(
                arbiter, wire.Claim(m.job, self.node_id), timeout=self.claim_timeout
            )
            if type(rep) is not wire.Grant or not rep.ok:
                self.jobs[m.job] = "denied"
                self.counts["denied"] += 1
                status = wire.DENIED
            else:
                self.jobs[m.job] = "running"
                try:
                    result = await self.ex.run(ClusterJob(m.job, m.cls, m.spec, payload))
                    status = int(result.get("status", 0))
                    self.counts["ran"] += 1
                except Exception as e:  # the executor's failure is the job's, not ours
                    result = {"error": f"{type(e).__name__}: {e}"}
                    self.counts["failed"] += 1
        except (TimeoutError, wire.WireError) as e:
            self.jobs[m.job] = "denied"
            result = {"error": f"not started: {e}"}
            status = wire.DENIED  # arbiter unreachable: nobody is waiting for it
        self.jobs[m.job] = "done"
        self._kick.set()
        done = wire.Done(m.job, self.node_id, status, result)
        try:
            wire.check(done)
        except ValueError as e:  # the job is still reported, without its accounting
            if not -(1 << 31) <= status < 1 << 31:
                status = wire.FAILED_START
            done = wire.Done(m.job, self.node_id, status, {"error": f"unreportable: {e}"})
        targets = [shard] if (arbiter == shard or status == wire.DENIED) else [arbiter, shard]
        await asyncio.gather(*(self._deliver(t, done) for t in targets))

    async def _deliver(self, addr: Addr, msg: Message) -> None:
        try:
            await self.ep.request(addr, msg, timeout=60.0)
        except TimeoutError:
            pass  # receiver gone for a minute: it has failed over or given up

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

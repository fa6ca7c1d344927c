"""Submit jobs to XX shards and inspect them.

A waiting client is its jobs' *arbiter*: a node runs a placed job only after CLAIMing
it here and being granted, and each job id is granted once.  That is what lets the
client resubmit a job to the next shard when its shard dies, without a job ever
running twice: a copy placed by the dead shard and a copy placed by the new one race
for the grant, and the loser runs nothing.  A detached submission (``wait=False``)
leaves arbitration to the shard, and so depends on that shard staying up.

Declared failure policy: a granted job whose node dies is reported with status
``wire.NODE_LOST`` and is not retried (it may have had effects); a job that had not
been granted is simply placed again.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass, field

import msgspec

from xxnode import wire
from xxnode.cluster.spec import spec_error
from xxnode.wire import Addr, Message


class SubmitError(Exception):
    """The cluster refused the job (the message is the shard's reason) or no shard answered."""


@dataclass
class _Pending:
    job: bytes
    cls: str
    spec: dict
    payload: bytes
    shard: int  # index of the shard holding it
    granted: str | None = None
    result: dict | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ClusterClient:
    def __init__(
        self,
        shards: list[Addr],
        key: bytes,
        drop: float = 0.0,
        seed: int | None = None,
        shard_dead_after: float = 3.0,
        spread: bool = False,
    ) -> None:
        if not shards:
            raise ValueError("need at least one shard")
        self.shards = list(shards)
        self.codec = wire.Codec(key)
        self.drop, self.seed = drop, seed
        self.shard_dead_after = shard_dead_after
        self.rounds = 4  # passes over the shard list before a submit gives up
        self.spread = spread  # round-robin submissions over the shards (a load balancer)
        self._rr = 0
        self.ep: wire.Endpoint | None = None
        self.pending: dict[bytes, _Pending] = {}
        self._cur = 0
        self._watch: asyncio.Task | None = None
        self.failovers = 0
        self._dead: set[int] = set()  # shards the watchdog found silent
        self.grants_denied = 0

    async def start(self, bind: Addr = ("127.0.0.1", 0)) -> None:
        self.ep = await wire.open_endpoint(bind, self.codec, self._handle, self.drop, self.seed)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self.ep is not None:
            self.ep.close()

    async def __aenter__(self) -> ClusterClient:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # arbitration and results -------------------------------------------------------------
    def _handle(self, msg: Message, addr: Addr):
        kind = type(msg)
        p = self.pending.get(msg.job) if kind in (wire.Claim, wire.Done, wire.NodeLost) else None
        if kind is wire.Claim:
            if p is None or p.result is not None:
                return wire.Grant(msg.job, False)
            if p.granted is None:
                p.granted = msg.node
            ok = p.granted == msg.node
            self.grants_denied += not ok
            return wire.Grant(msg.job, ok)
        if kind is wire.Done:
            if p is None or p.result is not None or msg.status == wire.DENIED:
                return None
            if "output" in msg.result:  # acknowledged once its output is here
                return self._done_with_output(p, msg, addr)
            p.result = {"status": msg.status, "node": msg.node, **msg.result}
            p.done.set()
            return None
        if kind is wire.NodeLost:
            if p is not None and p.result is None and p.granted == msg.node:
                p.result = {"status": wire.NODE_LOST, "node": msg.node, "error": "node lost"}
                p.done.set()
            return None
        return wire.Error(f"client does not take {msg.kind}")

    async def _done_with_output(self, p: _Pending, msg: wire.Done, addr: Addr) -> None:
        """Pull the streams a DONE too big for a datagram left at the node, by digest."""
        ref = msg.result.get("output") or {}
        res = {k: v for k, v in msg.result.items() if k != "output"}
        try:
            size = int(ref["size"])
            if not 0 < size <= wire.MAX_OUTPUT:
                raise ValueError(f"output size {size}")
            blob = await self.ep.fetch(
                addr, bytes.fromhex(ref["digest"]), size, limit=wire.MAX_OUTPUT
            )
            streams = msgspec.msgpack.decode(blob, type=dict[str, str])
            res.update({k: v for k, v in streams.items() if k in wire.OUTPUT_FIELDS})
        except (KeyError, ValueError, TypeError, TimeoutError, wire.WireError,
                msgspec.DecodeError) as e:  # fmt: skip
            res["error"] = f"output not retrieved from {msg.node}: {e}"
        if p.result is None:
            p.result = {"status": msg.status, "node": msg.node, **res}
            p.done.set()

    # submission --------------------------------------------------------------------------
    async def submit(
        self,
        cls: str,
        spec: dict,
        payload: bytes = b"",
        job_id: bytes | None = None,
        wait: bool = True,
        timeout: float = 1.5,
    ) -> bytes:
        """Hand a job to a shard (failing over along the list); returns its 16-byte id.
        With ``wait`` the job is tracked for ``result()`` and arbitrated here."""
        if len(payload) > wire.MAX_PAYLOAD:
            raise SubmitError(f"input of {len(payload)} bytes exceeds {wire.MAX_PAYLOAD}")
        if (bad := spec_error(spec)) is not None:
            raise SubmitError(f"bad job: {bad}")
        jid = job_id or uuid.uuid4().bytes
        p = _Pending(jid, cls, spec, payload, self._cur)
        if self.spread:
            self._rr += 1
            p.shard = self._rr % len(self.shards)
        if wait:
            self.pending[jid] = p
            if self._watch is None:
                self._watch = asyncio.ensure_future(self._watchdog())
        try:
            await self._send_to_some_shard(p, wait, timeout)
        except SubmitError:
            self.pending.pop(jid, None)
            raise
        return jid

    async def _send_to_some_shard(self, p: _Pending, wait: bool, timeout: float) -> None:
        dig = wire.digest(p.payload) if p.payload else bytes(32)
        inline = p.payload if len(p.payload) <= wire.INLINE_MAX else b""
        if not inline and p.payload:
            self.ep.payloads[dig] = p.payload  # the shard pulls it
        msg = wire.Submit(p.job, p.cls, "@" if wait else "", p.spec, len(p.payload), dig, inline)
        try:
            wire.check(msg)
        except ValueError as e:
            raise SubmitError(f"bad job: {e}") from None
        big = timeout + len(p.payload) / 1e6  # a 6 MB input needs its transfer time
        last = None
        try:
            start = p.shard if self.spread else self._cur
            for i in range(self.rounds * len(self.shards)):
                idx = (start + i) % len(self.shards)
                if self.spread and idx in self._dead and i + 1 < len(self.shards):
                    continue
                try:
                    rep = await self.ep.request(self.shards[idx], msg, timeout=big)
                except TimeoutError as e:
                    last = e
                    continue
                if type(rep) is not wire.SubmitAck:
                    raise SubmitError(getattr(rep, "reason", f"unexpected {rep.kind}"))
                if not rep.ok:
                    raise SubmitError(rep.reason)
                if idx != start:
                    self.failovers += 1
                self._cur = idx
                p.shard = idx
                return
        finally:
            if not wait or p.result is not None:
                self.ep.payloads.pop(dig, None)
        raise SubmitError(f"no shard answered ({last})")

    async def result(self, job: bytes, timeout: float | None = None) -> dict:
        """The job's DONE: {"status", "node", ...the executor's accounting}."""
        p = self.pending[job]
        await asyncio.wait_for(p.done.wait(), timeout)
        self.pending.pop(job, None)
        if p.payload:
            self.ep.payloads.pop(wire.digest(p.payload), None)
        return p.result

    async def run(self, cls: str, spec: dict, payload: bytes = b"", timeout=None) -> dict:
        return await self.result(await self.submit(cls, spec, payload), timeout)

    async def _watchdog(self) -> None:
        """Resubmit ungranted jobs of a shard that stopped answering to the next one."""
        while True:
            await asyncio.sleep(self.shard_dead_after / 3)
            held = {p.shard for p in self.pending.values() if p.granted is None and not p.result}
            for idx in held:
                try:
                    await self.ep.request(
                        self.shards[idx], wire.LenQuery(), timeout=self.shard_dead_after
                    )
                    self._dead.discard(idx)
                    continue
                except TimeoutError:
                    self._dead.add(idx)
                if self._cur == idx:
                    self._cur = (idx + 1) % len(self.shards)
                orphans = [
                    p
                    for p in self.pending.values()
                    if p.shard == idx and p.granted is None and p.result is None
                ]
                for p in orphans:
                    p.shard = (idx + 1) % len(self.shards)
                    try:
                        await self._send_to_some_shard(p, True, 1.5)
                        self.failovers += 1
                    except SubmitError:
                        pass  # tried again on the next round

    # one job, by id ---------------------------------------------------------------------
    async def job(self, job: bytes, timeout: float = 5.0) -> dict:
        """What the shards (and through them the node) know of ``job``: {"state": ...};
        "unknown" if no shard holds or remembers it."""
        return await self._ask_shards(
            wire.JobQuery(job), timeout, lambda d: d.get("state") != "unknown"
        )

    async def cancel(self, job: bytes, reason: str = "cancelled by request", timeout=5.0) -> dict:
        """Cancel ``job`` wherever it is: {"ok", "state" | "reason", ...}."""
        return await self._ask_shards(
            wire.Cancel(job, reason), timeout, lambda d: d.get("held", True)
        )

    async def _ask_shards(self, msg: Message, timeout: float, found) -> dict:
        """Each shard in turn until one answers ``found``; the last answer otherwise."""
        last: dict = {"state": "unknown", "ok": False, "reason": "no shard answered"}
        for a in self.shards:
            try:
                rep = await self.ep.request(a, msg, timeout=timeout)
            except TimeoutError:
                continue
            if type(rep) is not wire.StatusReply:
                last = {"state": "unknown", "ok": False, "reason": getattr(rep, "reason", rep.kind)}
                continue
            last = rep.data
            if found(rep.data):
                return rep.data
        return last

    # inspection --------------------------------------------------------------------------
    async def status(self, what: str = "shard", timeout: float = 2.0) -> list[dict]:
        """Each shard's STATUS reply (``what``: shard | idle | nodes); an unreachable shard
        gives {"addr", "error"}."""

        async def one(a: Addr) -> dict:
            try:
                return {"addr": wire.fmt_addr(a), **await self.status_of(a, what, timeout)}
            except TimeoutError:
                return {
                    "addr": wire.fmt_addr(a),
                    "error": "no answer (down, or another cluster key)",
                }

        return list(await asyncio.gather(*(one(a) for a in self.shards)))

    async def status_of(self, a: Addr, what: str, timeout: float) -> dict:
        """One shard's STATUS; a list (idle, nodes) comes page by page, joined here."""
        rows: list = []
        start = 0
        while True:
            rep = await self.ep.request(a, wire.Status(what, start), timeout=timeout)
            if type(rep) is not wire.StatusReply:
                return {"error": getattr(rep, "reason", rep.kind)}
            page = rep.data.get(what)
            if not isinstance(page, list):
                return rep.data  # the summary: one reply
            rows += page
            nxt = rep.data.get("next")
            if not isinstance(nxt, int) or nxt <= start:  # the last page (or a bad "next")
                return {**rep.data, what: rows}
            start = nxt


def key_from_env(path: str | None = None) -> bytes:
    """The cluster key from ``path``, $XX_CLUSTER_KEY_FILE or /etc/xx/cluster.key."""
    return wire.load_key(path or os.environ.get("XX_CLUSTER_KEY_FILE") or "/etc/xx/cluster.key")

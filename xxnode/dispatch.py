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

import argparse
import asyncio
import hashlib
import heapq
import os
import random
import sys
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


# --- executors ---------------------------------------------------------------------------


class SyntheticExecutor:
    """A stand-in machine for tests and the benchmark: each job holds ``per_job_bytes``
    of a ``total_bytes`` machine for ``spec["sleep"]`` seconds (or runs ``spec["argv"]``
    as a real process), and -- when ``record`` is a path -- appends its job id to that
    file, so a test can count executions across processes."""

    def __init__(
        self,
        total_bytes: int = 16 << 30,
        per_job_bytes: int = 256 << 20,
        record: str | None = None,
        refuse_when_free_below: int = 0,
        slots: int = 0,
        ranks: dict[str, int] | None = None,
    ) -> None:
        self.total_bytes = total_bytes
        # slots > 0: at most that many jobs run at once and a waiting job of a higher
        # class (by ``ranks``) starts first -- the machine scheduler in miniature
        self.slots, self._free, self.ranks = slots, slots, ranks or {}
        self._waiting: list = []  # heap of (-rank, seq, future)
        self._seq = 0
        self.per_job = per_job_bytes
        self.running = 0
        self.refuse_below = refuse_when_free_below
        self._fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if record else -1

    def snapshot(self) -> tuple[int, int]:
        return self.total_bytes - self.running * self.per_job, self.running

    def admit(self, cls: str) -> str | None:
        free = self.total_bytes - self.running * self.per_job
        if free < self.refuse_below:
            return f"memory critically full ({free} bytes free)"
        return None

    async def _acquire(self, cls: str) -> None:
        if not self.slots:
            return
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._waiting, (-self.ranks.get(cls, 0), self._seq, fut))
        await fut  # the releasing job hands its slot over

    def _release(self) -> None:
        if not self.slots:
            return
        while self._waiting:
            fut = heapq.heappop(self._waiting)[2]
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1

    async def run(self, job: ClusterJob) -> dict:
        self.running += 1
        t0 = time.monotonic()
        await self._acquire(job.cls)
        try:
            if "spin" in job.spec:  # burn a CPU in a child, as a CPU-bound function would
                spin = float(job.spec["spin"])
                code = f"import time\ne=time.time()+{spin}\nwhile time.time()<e: pass"
                p = await asyncio.create_subprocess_exec(sys.executable, "-S", "-c", code)
                await p.wait()
            if self._fd >= 0:
                os.write(self._fd, job.id.hex().encode() + b"\n")
            argv = job.spec.get("argv")
            if argv:
                p = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                out, _ = await p.communicate(job.payload)
                status = p.returncode
                extra = {"stdout": out[:4096].decode(errors="replace")}
            else:
                await asyncio.sleep(float(job.spec.get("sleep", 0.0)))
                status = 0
                extra = {
                    "input_bytes": len(job.payload),
                    "input_sha256": hashlib.sha256(job.payload).hexdigest(),
                }
        finally:
            self._release()
            self.running -= 1
        return {"status": status, "wall_s": round(time.monotonic() - t0, 6), **extra}


def _default_ranks() -> dict[str, int]:
    from xxnode import config

    return config.load(config.DEFAULT_CONFIG).classes.ranks()


# --- standalone process (tests, demo) ----------------------------------------------------


async def _serve(args) -> None:
    key = wire.load_key(args.key_file)
    ex = SyntheticExecutor(
        total_bytes=args.total_mb << 20,
        per_job_bytes=args.per_job_mb << 20,
        record=args.record,
        slots=args.slots,
        ranks=_default_ranks() if args.slots else None,
    )
    shards = [wire.parse_addr(s) for s in args.shards.split(",")]
    d = Dispatcher(args.node_id, shards, ex, k=args.k, heartbeat_s=args.heartbeat)
    drop, seed = wire.drop_from_env()
    addr = await d.start(wire.parse_addr(args.listen), wire.Codec(key), drop, seed)
    print(f"xxdispatch: {args.node_id} listening on {wire.fmt_addr(addr)}", flush=True)
    await d.serve_until_signal()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m xxnode.dispatch", description="a standalone node dispatcher"
    )
    ap.add_argument("--shards", required=True, metavar="HOST:PORT[,...]")
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--key-file", required=True)
    ap.add_argument("--node-id", default=f"{os.uname().nodename}-{os.getpid()}")
    ap.add_argument("--record", help="synthetic: append each executed job id to FILE")
    ap.add_argument("--total-mb", type=int, default=16384)
    ap.add_argument("--per-job-mb", type=int, default=256)
    ap.add_argument("--slots", type=int, default=0, help="synthetic: jobs at once (0: any)")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--heartbeat", type=float, default=0.25)
    args = ap.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except (ValueError, OSError) as e:
        print(f"xxdispatch: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

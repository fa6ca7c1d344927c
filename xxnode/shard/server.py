"""The shard: per-class multi-queue, idle list, placement (paper §3.2).

Decisions come from ``xxnode.policy`` (the code the simulator runs); this module is
the shell around them -- sockets, timers, retransmission, failure handling:

* SUBMIT: dedupe by job id, refuse an unknown class, pull a large payload from the
  submitter, queue the job in its class, acknowledge.
* placement: ``MultiQueue.pop_next`` picks the job; the idle list's shortest queue
  takes it, or else k probed nodes' least loaded.  A REFUSE or a silent node puts
  the job back in its queue (with its original enqueue time) and the head policy
  decides when it goes again; a refusing node is skipped for ``refuse_backoff``.
* a node silent for ``dead_after`` is dead: it leaves the idle list and each of its
  unfinished jobs is queued again; the job's arbiter is told (NODE_LOST), and since a
  node only runs a job the arbiter granted to it, a started job is never run twice.
* CLAIM (when the submitter left arbitration to us): the first node to claim a job
  gets it; any other is denied.

Why one class of ~560 lines: admission, placement and failure handling all move the same
job and node tables (``shard/records.py``) and the in-flight count, on one event loop; the
decisions themselves are pure functions in ``xxnode.policy``, durability is
``shard/store.py``, and what the shard answers about itself and its jobs (status, job,
cancel, the periodic summary) is ``shard/answers.py``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable

from xxnode import logs, metrics, wire
from xxnode.classes import ClassTable
from xxnode.cluster.spec import spec_error
from xxnode.config.shard import ShardParams
from xxnode.policy import probe
from xxnode.policy.idle_list import IdleList
from xxnode.policy.multiqueue import MultiQueue
from xxnode.shard.answers import Answers
from xxnode.shard.records import NodeRecord, QueuedJob
from xxnode.shard.store import ShardStore
from xxnode.wire import Addr, Message

MAX_INFLIGHT = 64  # placements in flight; the rest wait in class order in the multi-queue
KEEP_FINISHED = 100_000  # job ids remembered after completion, for idempotent resubmits
KEEP_RAN_ON = 10_000  # finished jobs whose node `xxctl job` can still name
log = logging.getLogger("xxshard")
KEEP_UNSURE = 10_000  # per node: timed-out placements remembered (see NodeRecord.unsure)


class Shard(Answers, wire.Service):
    def __init__(
        self,
        classes: ClassTable,
        params: ShardParams | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        store: ShardStore | None = None,
    ) -> None:
        self.classes = classes
        self.store = store  # None: state in memory only (a restart forgets it)
        # job id -> its last journal write not yet on disk: answers about the job wait
        self._unsynced: dict[bytes, asyncio.Future] = {}
        self.p = params or ShardParams()
        self.clock = clock
        self.rng = random.Random(seed)
        self.mq = MultiQueue(classes.ranks(), self.p.head_policy)
        self.idle = IdleList()
        self.jobs: dict[bytes, QueuedJob] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self.finished: OrderedDict[bytes, int] = OrderedDict()
        self.ran_on: OrderedDict[bytes, str] = OrderedDict()  # finished job -> its node
        self.grants: dict[bytes, str] = {}
        self.counts: dict[str, int] = dict.fromkeys(
            (
                "submitted",
                "placed",
                "refused",  # a node refused a placement
                "rejected",  # a submission refused here (unknown class, bad spec)
                "place_timeouts",
                "done",
                "denied",
                "requeued",
                "nodes_lost",
                "recovered",
            ),
            0,
        )
        self.ep: wire.Endpoint | None = None
        self._kicked = False  # a placement pass is scheduled
        self._inflight = 0
        self._probe_quiet_until = 0.0
        self._handlers = {
            wire.Submit: self._on_submit,
            wire.Accept: _ignore,  # late ACCEPT for a timed-out PLACE
            wire.Hello: self._on_hello,
            wire.IdleJoin: self._on_idle_join,
            wire.IdleUpdate: self._on_idle_join,
            wire.IdleLeave: self._on_idle_leave,
            wire.LenQuery: self._on_len_query,
            wire.Claim: self._on_claim,
            wire.Done: self._on_done,
            wire.JobQuery: self._on_job_query,
            wire.Cancel: self._on_cancel,
            wire.Status: self._on_status,
        }

    # lifecycle -------------------------------------------------------------------------
    async def start(self, bind: Addr, codec: wire.Codec, drop: float = 0.0, seed=None) -> Addr:
        self.ep = await wire.open_endpoint(bind, codec, self.handle, drop, seed)
        if self.store is not None:
            self._recover()
        self._spawn(self._monitor())
        self._spawn(self._summarize())
        return self.ep.addr

    def close(self) -> None:
        super().close()
        if self.store is not None:
            self.store.close()

    def _recover(self) -> None:
        """The journal's unfinished jobs back in place: a granted one is where it was
        granted (its node's DONE, retransmitted across our restart, or the node's death
        settles it); the others queue again with their original classes."""
        r = self.store.recovered
        self.finished.update(r.finished)
        now = self.clock()
        for jid, rec in r.jobs.items():
            dig, inline = bytes.fromhex(rec["digest"]), bytes.fromhex(rec["inline"])
            size = int(rec["size"])
            place = wire.Place(jid, rec["cls"], rec["arbiter"], rec["spec"], size, dig, inline)
            if size > len(inline):
                self.ep.payloads[dig] = self.store.payload(dig)
            job = self.jobs[jid] = QueuedJob(jid, rec["cls"], place, now)
            holder = r.grants.get(jid)
            if holder:
                self.grants[jid] = holder
                n = self.nodes.get(holder)
                if n is None:  # where it is comes with its HELLO; silence makes it dead
                    n = self.nodes[holder] = NodeRecord(holder, ("0.0.0.0", 0), now)
                    n.skip_until = now + self.p.dead_after  # nothing to probe there yet
                job.state, job.node = "placed", holder
                n.placed.add(jid)
                n.jobs += 1
            elif self.classes.get(job.cls) is None:  # the config lost its class
                self._finish(job, wire.FAILED_START)
            else:
                self.mq.push(jid, job.cls, now)
            self.counts["recovered"] += 1
        self._kick()

    # message handling ------------------------------------------------------------------
    def handle(self, msg: Message, addr: Addr):
        h = self._handlers.get(type(msg))
        if h is None:
            return wire.Error(f"shard does not take {msg.kind}")
        return h(msg, addr)

    def _on_submit(self, m: wire.Submit, addr: Addr):
        if m.job in self.jobs or m.job in self.finished:
            return _ack(m.job, True, "duplicate")
        if self.classes.get(m.cls) is None:
            return self._reject(m, addr, f"unknown price class {m.cls!r}")
        if (bad := spec_error(m.spec)) is not None:
            return self._reject(m, addr, bad)
        if m.size > wire.MAX_PAYLOAD:
            return self._reject(m, addr, f"input of {m.size} bytes exceeds {wire.MAX_PAYLOAD}")
        if m.size > len(m.inline):
            return self._submit_fetch(m, addr)
        if len(m.inline) != m.size or (m.size and wire.digest(m.inline) != m.digest):
            return self._reject(m, addr, "inline input does not match its size/digest")
        return self._admit(m, addr, m.inline)

    def _reject(self, m: wire.Submit, addr: Addr, reason: str) -> wire.SubmitAck:
        self.counts["rejected"] += 1
        log.info(
            "job %s (%s) from %s rejected: %s", m.job.hex(), m.cls, wire.fmt_addr(addr), reason,
            extra=logs.about(invocation=logs.invocation_id(m.job), cls=m.cls),
        )  # fmt: skip
        return _ack(m.job, False, reason)

    async def _submit_fetch(self, m: wire.Submit, addr: Addr) -> Message:
        try:
            payload = await self.ep.fetch(addr, m.digest, m.size)
        except (TimeoutError, wire.WireError) as e:
            return _ack(m.job, False, f"input transfer failed: {e}")
        out = self._admit(m, addr, payload)
        return out if isinstance(out, Message) else await out

    def _admit(self, m: wire.Submit, addr: Addr, payload: bytes):
        """Queue the job and acknowledge it -- with a store, only once it is on disk."""
        arbiter = wire.fmt_addr(addr) if m.arbiter == "@" else m.arbiter
        inline = payload if m.size <= wire.INLINE_MAX else b""
        place = wire.Place(m.job, m.cls, arbiter, m.spec, m.size, m.digest, inline)
        job = QueuedJob(m.job, m.cls, place, self.clock())
        if self.store is None:
            self._enqueue(job, payload)
            return _ack(m.job, True, "")
        return self._admit_durable(job, payload)

    async def _admit_durable(self, job: QueuedJob, payload: bytes) -> Message:
        await self.store.submitted(job, payload)
        if job.id not in self.jobs and job.id not in self.finished:
            self._enqueue(job, payload)
        return _ack(job.id, True, "")

    def _enqueue(self, job: QueuedJob, payload: bytes) -> None:
        if job.place.size > wire.INLINE_MAX:
            self.ep.payloads[job.place.digest] = payload  # served to the node's FETCH
        self.jobs[job.id] = job
        self.mq.push(job.id, job.cls, job.t_enq)
        self.counts["submitted"] += 1
        self._kick()

    def _written(self, jid: bytes, fut: asyncio.Future) -> None:
        """Note a journal write about ``jid``; answers about the job wait for it."""
        self._unsynced[jid] = fut

        def synced(f: asyncio.Future) -> None:
            if self._unsynced.get(jid) is f:
                del self._unsynced[jid]

        fut.add_done_callback(synced)

    def _on_hello(self, m: wire.Hello, addr: Addr):
        n = self._node(m.node, addr)
        n.free, n.total, n.jobs = m.free, m.total, m.jobs
        if self.mq and not self.idle:
            self._kick()
        return None

    def _node(self, node_id: str, addr: Addr) -> NodeRecord:
        now = self.clock()
        n = self.nodes.get(node_id)
        if n is None:
            n = self.nodes[node_id] = NodeRecord(node_id, addr, now)
        n.addr, n.last_seen = addr, now
        return n

    def _on_idle_join(self, m: wire.IdleJoin, addr: Addr):
        n = self._node(m.node, addr)
        n.free, n.total, n.jobs = m.free, m.total, m.jobs
        self.idle.upsert(m.node, m.free, m.jobs)
        self._kick()
        return wire.LenReply(len(self.idle))

    def _on_idle_leave(self, m: wire.IdleLeave, addr: Addr):
        self.idle.remove(m.node)
        return None

    def _on_len_query(self, m: wire.LenQuery, addr: Addr):
        return wire.LenReply(len(self.idle))

    def _on_claim(self, m: wire.Claim, addr: Addr):
        """Arbitrate for detached submitters: the first claimer runs the job."""
        if m.job in self.finished:
            return wire.Grant(m.job, False)
        new = m.job not in self.grants
        holder = self.grants.setdefault(m.job, m.node)
        grant = wire.Grant(m.job, holder == m.node)
        if new and self.store is not None:  # the node runs it only once this is on disk
            self._written(m.job, self.store.granted(m.job, m.node))
        return _when(self._unsynced.get(m.job), grant)

    def _on_done(self, m: wire.Done, addr: Addr):
        reporter = self.nodes.get(m.node)
        if reporter is not None:
            reporter.unsure.pop(m.job, None)  # it has said what became of the job
        job = self.jobs.get(m.job)
        if job is None:  # already finished (a retransmitted DONE): ack once it is on disk
            return _when(self._unsynced.get(m.job), None)
        if m.status == wire.DENIED:
            if job.node == m.node:  # that placement ran nothing; the job lives elsewhere
                self._unplace(job)
                self.counts["denied"] += 1
                holder = self.grants.get(m.job)
                if not job.place.arbiter and holder is not None and holder in self.nodes:
                    # we granted it to a node whose ACCEPT we never saw: it runs there
                    job.state, job.node = "placed", holder
                    self.nodes[holder].placed.add(job.id)
                else:  # the arbiter knows where it runs; its node reports to it
                    self._finish(job, m.status)
            return _when(self._unsynced.get(m.job), None)
        if job.state == "placing":  # this DONE overtook the node's ACCEPT
            self.counts["placed"] += 1
            metrics.queued("shard", job.cls, metrics.kind_of(job.place.spec),
                           self.clock() - job.t_enq)  # fmt: skip
        self._unplace(job)
        self._finish(job, m.status)
        return _when(self._unsynced.get(m.job), None)

    # placement -------------------------------------------------------------------------
    def _kick(self) -> None:
        """Run a placement pass soon: once per event-loop pass, however many events
        (submits, answers, timers) asked for one.  A callback, not a task woken by an
        Event: PLACEs it sends leave in the same flush as the acks of that pass."""
        if not self._kicked and self.mq:  # nothing queued: nothing a pass could do
            try:
                self.ep.loop.call_soon(self._place_pass)
            except (AttributeError, RuntimeError):
                return  # no endpoint or no loop: the shard is being closed
            self._kicked = True

    def _place_pass(self) -> None:
        self._kicked = False
        if self.ep is None or self.ep.sock is None or self.ep.sock.fileno() < 0:
            return  # closed
        now = self.clock()
        while self.mq and self._inflight < MAX_INFLIGHT:
            target = self._idle_target(now)
            if target is None and (
                now < self._probe_quiet_until or not self._probe_candidates(now)
            ):
                break  # nowhere to go yet: a hello, join, done or timer wakes us
            jid, _cls = self.mq.pop_next(now)
            job = self.jobs.get(jid)
            if job is None or job.state != "queued":
                continue  # finished (or queued twice) meanwhile: a stale entry
            job.state = "placing"
            self._inflight += 1
            if target is not None:
                self.idle.note_placed(target)
                self._send_place(job, self.nodes[target])  # no task: a callback
            else:
                self._spawn(self._place(job))

    def _idle_target(self, now: float) -> str | None:
        t = self.idle.choose()
        if t is None:
            return None
        n = self.nodes.get(t)
        if n is None or n.skip_until > now:
            # rare: a refusing or unknown node heads the list; pick the best usable one
            best = None
            for nid in self.idle.machines():
                nn = self.nodes.get(nid)
                if nn is None or nn.skip_until > now:
                    continue
                e = self.idle.entry(nid)
                if best is None or e[1] < best[1]:
                    best = (nid, e[1])
            return None if best is None else best[0]
        return t

    def _probe_candidates(self, now: float) -> list[NodeRecord]:
        return [n for n in self.nodes.values() if n.skip_until <= now]

    async def _probe(self) -> str | None:
        cands = self._probe_candidates(self.clock())
        if not cands:
            return None
        picked = [cands[i] for i in probe.sample(len(cands), self.p.probe_k, self.rng)]
        replies = await asyncio.gather(
            *(
                self.ep.request(n.addr, wire.Probe(), timeout=self.p.probe_timeout, first_rto=0.1)
                for n in picked
            ),
            return_exceptions=True,
        )
        loads = {n.id: r.running for n, r in zip(picked, replies, strict=True) if _ok(r)}
        if not loads:
            return None
        return probe.least_loaded(list(loads), loads.__getitem__)

    async def _place(self, job: QueuedJob) -> None:
        """Placement by probing (the idle list was empty): k nodes probed, least loaded."""
        try:
            target = await self._probe()
        except BaseException:
            self._inflight -= 1
            raise
        n = self.nodes.get(target) if target is not None else None
        if n is None:  # no probed node answered: pause probing rather than spin
            self._probe_quiet_until = self.clock() + self.p.refuse_backoff
            self.ep.loop.call_later(self.p.refuse_backoff, self._kick)
            self._requeue(job, None)
            self._inflight -= 1
            self._kick()
            return
        self._send_place(job, n)

    def _send_place(self, job: QueuedJob, n: NodeRecord) -> None:
        """PLACE, retransmitted until the node answers; ``_placed`` takes the outcome."""
        self.ep.call(
            n.addr,
            job.place,
            lambda rep, exc: self._placed(job, n, rep, exc),
            timeout=self.p.place_timeout,
        )

    def _placed(
        self, job: QueuedJob, n: NodeRecord, rep: Message | None, exc: BaseException | None
    ) -> None:
        try:
            if isinstance(exc, TimeoutError):
                self.counts["place_timeouts"] += 1
                self.idle.remove(n.id)
                if self.nodes.get(n.id) is n:
                    n.unsure[job.id] = job.place.arbiter
                    if len(n.unsure) > KEEP_UNSURE:
                        del n.unsure[next(iter(n.unsure))]
                    self._requeue(job, n)
                else:  # declared dead while we waited for its answer
                    self._requeue(job, None)
                    self._lost_unsure(job.id, job.place.arbiter, n.id)
                return
            if exc is not None:
                return  # cancelled: the shard is closing
            if self.jobs.get(job.id) is not job:
                return  # finished meanwhile (a DONE overtook the ACCEPT)
            if type(rep) is wire.Accept:
                job.state, job.node = "placed", n.id
                n.placed.add(job.id)
                n.jobs += 1
                self.counts["placed"] += 1
                metrics.queued("shard", job.cls, metrics.kind_of(job.place.spec),
                               self.clock() - job.t_enq)  # fmt: skip
                if log.isEnabledFor(logging.DEBUG):  # a line per job is for debugging only
                    log.debug("job %s (%s) placed on %s, %.1f ms after submission",
                              job.id.hex(), job.cls, n.id, (self.clock() - job.t_enq) * 1e3,
                              extra=_about(job))  # fmt: skip
            else:
                self.counts["refused"] += 1
                self.idle.remove(n.id)
                self._requeue(job, n)
        finally:
            self._inflight -= 1
            self._kick()

    def _requeue(self, job: QueuedJob, refusing: NodeRecord | None) -> None:
        """Back into its class queue with its original enqueue time."""
        if self.jobs.get(job.id) is not job:
            return
        now = self.clock()
        if refusing is not None:
            refusing.skip_until = now + self.p.refuse_backoff
            self.ep.loop.call_later(self.p.refuse_backoff, self._kick)
        job.state, job.node = "queued", None
        self.mq.push(job.id, job.cls, job.t_enq)
        self.counts["requeued"] += 1

    def _unplace(self, job: QueuedJob) -> None:
        n = self.nodes.get(job.node) if job.node else None
        if n is not None:
            n.placed.discard(job.id)
            n.jobs = max(0, n.jobs - 1)

    def _finish(self, job: QueuedJob, status: int) -> None:
        if status != wire.DENIED:
            # every job at debug; at info only those that did not run as asked (a line per
            # job cost 40 % more CPU per placement at 1 000/s: the summary says the rest)
            quiet = status >= 0
            if not quiet or log.isEnabledFor(logging.DEBUG):  # its arguments cost too
                log.log(
                    logging.DEBUG if quiet else logging.INFO,
                    "job %s (%s) done on %s: %s, %.1f ms after submission", job.id.hex(), job.cls,
                    job.node or "-", _status_words(status), (self.clock() - job.t_enq) * 1e3,
                    extra=_about(job),
                )  # fmt: skip
        self.jobs.pop(job.id, None)
        self.grants.pop(job.id, None)
        dig = job.place.digest
        unshared = (
            not job.place.inline
            and job.place.size
            and not any(j.place.digest == dig for j in self.jobs.values() if not j.place.inline)
        )
        if unshared:
            self.ep.payloads.pop(dig, None)
        if self.store is not None:
            self._written(job.id, self.store.finished(job.id, status, dig if unshared else None))
        self.finished[job.id] = status
        while len(self.finished) > KEEP_FINISHED:
            self.finished.popitem(last=False)
        if job.node:
            self.ran_on[job.id] = job.node  # for `xxctl job`: the node holds the result
            while len(self.ran_on) > KEEP_RAN_ON:
                self.ran_on.popitem(last=False)
        if status != wire.DENIED:
            self.counts["done"] += 1
            metrics.finished("shard", job.cls, metrics.kind_of(job.place.spec),
                             metrics.outcome_of_status(status), self.clock() - job.t_enq)  # fmt: skip
        self._kick()

    # failure detection -----------------------------------------------------------------
    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(self.p.dead_after / 3)
            now = self.clock()
            for n in [n for n in self.nodes.values() if now - n.last_seen > self.p.dead_after]:
                self._node_lost(n)

    def _node_lost(self, n: NodeRecord) -> None:
        """Re-place the dead node's unfinished jobs; the arbiter decides whether each had
        started (granted) -- those are reported failed (NODE_LOST), never run again."""
        del self.nodes[n.id]
        self.idle.remove(n.id)
        self.counts["nodes_lost"] += 1
        log.warning(
            "node %s silent for %.1f s: lost; %d of its job(s) placed again or reported to "
            "their arbiter", n.id, self.clock() - n.last_seen, len(n.placed),
        )  # fmt: skip
        for jid in list(n.placed):
            job = self.jobs.get(jid)
            if job is None or job.node != n.id:
                continue
            if job.place.arbiter:
                self._spawn(self._tell_arbiter(job.place.arbiter, wire.NodeLost(jid, n.id)))
                self._requeue(job, None)
            elif self.grants.get(jid) == n.id:
                self._finish(job, wire.NODE_LOST)
            else:
                self.grants.pop(jid, None)
                self._requeue(job, None)
        for jid, arbiter in n.unsure.items():
            if jid not in n.placed:
                self._lost_unsure(jid, arbiter, n.id)
        self._kick()

    def _lost_unsure(self, jid: bytes, arbiter: str, node: str) -> None:
        """A job the dead ``node`` may have taken without our seeing its ACCEPT: whoever
        granted it decides -- NODE_LOST if it had been granted there, else nothing."""
        if arbiter:
            self._spawn(self._tell_arbiter(arbiter, wire.NodeLost(jid, node)))
        elif self.grants.get(jid) == node and (job := self.jobs.get(jid)) is not None:
            self._unplace(job)
            self._finish(job, wire.NODE_LOST)

    async def _tell_arbiter(self, arbiter: str, msg: Message) -> None:
        """A job's fate to its arbiter: NODE_LOST (which it reports as a failure if it had
        granted the job to that node, and otherwise ignores) or a cancel's DONE."""
        try:
            await self.ep.request(wire.parse_addr(arbiter), msg, timeout=10.0)
        except (TimeoutError, ValueError):
            pass  # the submitter is gone: nobody is waiting for this job's fate


def _about(job: QueuedJob) -> dict:
    return logs.about(invocation=logs.invocation_id(job.id), cls=job.cls, node=job.node)


def _status_words(status: int) -> str:
    return {
        wire.NODE_LOST: "node lost",
        wire.FAILED_START: "not started",
        wire.CANCELLED: "cancelled",
    }.get(  # fmt: skip
        status, f"exit status {status}"
    )


def _ack(job: bytes, ok: bool, reason: str) -> wire.SubmitAck:
    return wire.SubmitAck(job, ok, reason)


def _ignore(m: Message, addr: Addr) -> None:
    return None


def _when(fut: asyncio.Future | None, reply: Message | None):
    """``reply`` now, or -- a journal write pending -- once that write is on disk."""
    if fut is None:
        return reply

    async def after() -> Message | None:
        await fut
        return reply

    return after()


def _ok(r) -> bool:
    return type(r) is wire.ProbeReply

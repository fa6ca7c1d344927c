"""What a shard answers about itself and its jobs: STATUS (summary, idle list, nodes, in
pages that fit a datagram), JOB_QUERY and CANCEL (`xxctl job` / `cancel`, passed on to the
job's node), and the summary line it logs every SUMMARY_S. A mixin of ``Shard``: these read
its tables and, for a cancel, end a queued job as the shard ends any."""

from __future__ import annotations

import asyncio
import logging

from xxnode import wire
from xxnode.wire import Addr, Message

log = logging.getLogger("xxshard")
SUMMARY_S = 10.0  # the shard's periodic info line
STATUS_PAGE = 40  # rows per STATUS reply: ~5 KB, well inside a datagram


class Answers:
    async def _on_job_query(self, m: wire.JobQuery, addr: Addr) -> Message:
        """Where the job is; once placed, what its node says of it (its result and output
        once done). A job this shard never held is "unknown" (the client asks the others)."""
        job = self.jobs.get(m.job)
        node_id = job.node if job is not None else self.ran_on.get(m.job)
        if job is not None:
            data = {"state": job.state, "class": job.cls, "node": job.node,
                    "waited_s": round(self.clock() - job.t_enq, 3)}  # fmt: skip
        elif m.job in self.finished:
            data = {"state": "done", "status": self.finished[m.job], "node": node_id}
        else:
            return wire.StatusReply({"state": "unknown"})
        n = self.nodes.get(node_id) if node_id else None
        if n is not None:
            try:
                rep = await self.ep.request(n.addr, m, timeout=2.0)
                data["on_node"] = rep.data if type(rep) is wire.StatusReply else {"error": rep.kind}
            except TimeoutError:
                data["on_node"] = {"error": f"{node_id} did not answer"}
        return wire.StatusReply({"shard": wire.fmt_addr(self.ep.addr), **data})

    async def _on_cancel(self, m: wire.Cancel, addr: Addr) -> Message:
        """A queued job ends here, CANCELLED (its arbiter told); a placed one is killed by its
        node, and its DONE comes as any job's does."""
        job = self.jobs.get(m.job)
        if job is None:
            done = m.job in self.finished
            why = "already finished" if done else "not held by this shard"
            return wire.StatusReply({"ok": False, "held": done, "reason": why})
        log.info(
            "job %s (%s) cancel asked by %s: %s",
            m.job.hex(),
            job.cls,
            wire.fmt_addr(addr),
            m.reason,
        )
        if job.state == "queued" and self.mq.remove(job.id, job.cls):
            self._finish(job, wire.CANCELLED)
            if job.place.arbiter:  # the submitter waits on its arbiter's word
                done = wire.Done(job.id, "", wire.CANCELLED, {"error": f"cancelled: {m.reason}"})
                self._spawn(self._tell_arbiter(job.place.arbiter, done))
            return wire.StatusReply({"ok": True, "state": "cancelled while queued"})
        n = self.nodes.get(job.node) if job.node else None
        if n is None:
            return wire.StatusReply({"ok": False, "reason": "being placed; ask again"})
        try:
            rep = await self.ep.request(n.addr, m, timeout=2.0)
        except TimeoutError:
            return wire.StatusReply({"ok": False, "reason": f"{n.id} did not answer"})
        data = rep.data if type(rep) is wire.StatusReply else {"ok": False, "reason": rep.kind}
        return wire.StatusReply({**data, "node": n.id})

    def _on_status(self, m: wire.Status, addr: Addr):
        if m.what in ("idle", "nodes"):
            rows = self._idle_rows() if m.what == "idle" else self._node_rows()
            page = rows[m.start : m.start + STATUS_PAGE]
            more = m.start + STATUS_PAGE < len(rows)
            return wire.StatusReply({m.what: page, "next": m.start + STATUS_PAGE if more else None})
        data = {
            "addr": wire.fmt_addr(self.ep.addr),
            "queued": self.mq.by_class(),
            "jobs": len(self.jobs),
            "idle": len(self.idle),
            "nodes": len(self.nodes),
            "counts": self.counts,
            "dropped": dict(self.ep.codec.dropped),
            "transport": dict(self.ep.stats),
        }
        return wire.StatusReply(data)

    def _idle_rows(self) -> list[dict]:
        listed = list(self.nodes) + [x for x in self.idle.machines() if x not in self.nodes]
        return [
            {"node": nid, "free": e[0], "jobs": e[1]}
            for nid in listed
            if (e := self.idle.entry(nid)) is not None
        ]

    def _node_rows(self) -> list[dict]:
        now = self.clock()
        return [
            {
                "node": n.id,
                "addr": wire.fmt_addr(n.addr),
                "age": round(now - n.last_seen, 3),
                "free": n.free,
                "total": n.total,
                "jobs": n.jobs,
                "placed": len(n.placed),
                "idle": n.id in self.idle,
            }
            for n in self.nodes.values()
        ]

    async def _summarize(self) -> None:
        """Every SUMMARY_S with anything new, one info line of what the shard did."""
        last = dict(self.counts)
        while True:
            await asyncio.sleep(SUMMARY_S)
            d = {k: v - last.get(k, 0) for k, v in self.counts.items()}
            last = dict(self.counts)
            if any(d.values()):
                log.info(
                    "last %g s: %d submitted, %d rejected, %d placed, %d done, %d requeued, "
                    "%d refused by nodes, %d nodes lost; now %d held, %d queued, %d nodes "
                    "(%d idle)", SUMMARY_S, d["submitted"], d["rejected"], d["placed"],
                    d["done"], d["requeued"], d["refused"], d["nodes_lost"], len(self.jobs),
                    len(self.mq), len(self.nodes), len(self.idle),
                )  # fmt: skip

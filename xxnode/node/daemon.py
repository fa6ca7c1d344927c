"""The node daemon: admits jobs, queues them by class, launches them into cgroup v2 with their
class's kernel scheduling, accounts for them, and survives its own crash.

The kernel enforces, the daemon decides: once launched, a job's priority, cgroup and timeout
(enforced by its shim) no longer depend on this process. See docs/node.md. The parts:
host.py (what is set up before work is accepted), launch.py (a job onto the CPU, and the
self-test), recovery.py (a restart), status.py (what it shows); this module holds the job
table and the life of a job through it — admitted, queued, started, finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections import OrderedDict

from xxnode import logs, metrics
from xxnode.config import NodeConfig
from xxnode.journal import Journal
from xxnode.kernel import clone3
from xxnode.kernel.cgroup import CgroupError
from xxnode.node import executor, recovery, status
from xxnode.node import jobs as J
from xxnode.node.crash import crash_point
from xxnode.node.env.pool import FunctionsUnavailable, Pool
from xxnode.node.env.zygote import SpawnFailed
from xxnode.node.host import Host, StartupError
from xxnode.node.job_cgroup import JobCgroup
from xxnode.node.jobs import Job
from xxnode.node.launch import UNPOPULATE_GRACE_S, Launcher, LaunchFailed
from xxnode.node.memory import JobRef
from xxnode.policy.node_queue import NodeQueue

__all__ = ["Node", "StartupError"]

log = logging.getLogger("xxnode")


def _about(job: Job) -> dict:
    """A job's log fields: its local id, class, and the cluster's id when a shard placed it."""
    cid = (job.cluster or {}).get("job")
    inv = logs.invocation_id(bytes.fromhex(cid)) if cid else None
    return logs.about(job=job.id, cls=job.cls, invocation=inv)


class Node:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.classes = cfg.classes
        self.queue = NodeQueue(cfg.classes.ranks())
        self.jobs: dict[str, Job] = {}  # queued + running
        self.finished: OrderedDict[str, dict] = OrderedDict()  # bounded, newest last
        self.finished_total = 0
        self.next_id = 1
        self.started_at = time.time()
        self.host: Host | None = None
        self.launcher: Launcher | None = None
        self.journal: Journal | None = None
        self.recovered = recovery.Recovered()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.dispatcher = None  # the cluster's dispatcher, when [cluster] is configured
        self.functions: Pool | None = None  # warm execution environments, once started

    # -- startup ------------------------------------------------------------------------
    def prepare(self) -> None:
        """Set up, self-test, recover: everything that can fail before we accept work."""
        self.host = Host.setup(self.cfg, self._running_refs)
        if (reason := clone3.unavailable_reason()) is not None:
            raise StartupError(reason)
        self.launcher = Launcher(self.host)
        self.launcher.self_test()
        self.recovered = recovery.recover(self)

    @property
    def memory(self):
        return self.host.memory

    def _running_refs(self) -> list[JobRef]:
        refs = [
            JobRef(j.id, j.cls, self.leaf(j), j.started_at or j.accepted_at)
            for j in self.jobs.values()
            if j.state == "running"
        ]
        if self.functions is not None:
            refs += self.functions.memory_refs()
        return refs

    def leaf(self, job: Job) -> JobCgroup:
        return self.host.job_cgroup(job.cls, job.id)

    def bump_id(self, jid: str) -> None:
        with contextlib.suppress(ValueError):
            self.next_id = max(self.next_id, int(jid.lstrip("j")) + 1)

    async def run(self, server_factory) -> None:
        self.loop = asyncio.get_running_loop()
        watcher = self.host.watcher
        self.loop.add_reader(watcher.fileno(), watcher.handle_ready)
        rec, self.recovered = self.recovered, recovery.Recovered()
        for job in rec.watch:
            self.loop.add_reader(job.shim_pidfd, self._on_shim_exit, job)
        for job in rec.finalize:
            self.loop.create_task(self._finalize(job))
        self.start_queued()
        await self._start_functions()
        memory_task = self.loop.create_task(self.memory.run())
        if self.cfg.cluster is not None:
            self.dispatcher = await executor.start(self, self.cfg.cluster, rec.placements)
            log.info("dispatcher %s serving shards %s", self.dispatcher.node_id,
                     ", ".join(self.cfg.cluster.shards))  # fmt: skip
        try:
            await server_factory(self)
        finally:
            memory_task.cancel()
            if self.dispatcher is not None:
                self.dispatcher.close()
            if self.functions is not None:
                self.functions.close()

    async def _start_functions(self) -> None:
        """Functions are a capability like any other: missing pieces degrade, never stop
        the node from running jobs."""
        pool = Pool(
            self.cfg.functions, self.classes, self.host.root, self.host.enabled,
            self.cfg.state_dir, (str(self.cfg.state_dir),), self.host.watcher,
        )  # fmt: skip
        try:
            await pool.start()
        except (FunctionsUnavailable, SpawnFailed, OSError, TimeoutError) as e:
            self.host.degraded.append(f"no-functions: {e}")
            log.warning("functions unavailable: %s", e)
            pool.close()
            return
        self.functions = pool
        loop = self.loop
        self.memory.evict = lambda need: loop.call_soon_threadsafe(pool.evict_idle, need)
        log.info("functions: Runtime API on %s, zygote %s", pool.api.address,
                 "on" if self.cfg.functions.zygote else "off")  # fmt: skip

    # -- admission -----------------------------------------------------------------------
    def submit(self, req: dict, cluster: dict | None = None) -> Job:
        """Admit one job (SpecError says why not); `cluster` = {job, arbiter, shard} when a
        shard placed it, journaled with it so a restart can still report to them."""
        spec = J.validate(req, self.cfg)
        jid = f"j{self.next_id:06d}"
        self.next_id += 1
        job = Job(jid, spec["class"], spec, time.time(), cluster=cluster)
        rec = {"ev": "accepted", "job": jid, "t": job.accepted_at, "spec": spec}
        if cluster:
            rec["cluster"] = cluster
        # durable before anyone is told "accepted": a crash from here on loses nothing
        self.journal.append(rec, sync=True)
        crash_point("after-accept")
        self.jobs[jid] = job
        self.queue.push(jid, job.cls, job.accepted_at)
        self.start_queued()
        return job

    def running_at_or_above(self, rank: int) -> int:
        return sum(
            1
            for j in self.jobs.values()
            if j.state == "running" and self.classes.get(j.cls).rank >= rank
        )

    def start_queued(self) -> None:
        """Start queued jobs, highest class first. A job of class C may start while fewer
        than max_running jobs of class >= C run: lower classes never delay a higher one
        (the kernel preempts them), so the queue only ever orders equals and betters."""
        while True:
            head = self.queue.peek_next()
            if head is None:
                return
            jid, cls = head
            if self.running_at_or_above(self.classes.get(cls).rank) >= self.cfg.max_running:
                return
            self.queue.pop_next()
            self._start(self.jobs[jid])

    def _start(self, job: Job) -> None:
        job.state, job.is_child = "running", True
        try:
            sp = self.launcher.launch(job, self.leaf(job))
        except LaunchFailed as e:
            self.finish_now(job, "start_failed", str(e))
            return
        job.spawned = sp
        job.shim_pid, job.shim_pidfd = sp.shim_pid, sp.shim_pidfd
        job.pid = sp.job_pid or None
        job.started_at = sp.start_ns / 1e9 if sp.start_ns else time.time()
        self.journal.append(
            {"ev": "started", "job": job.id, "t": job.started_at, "pid": job.pid,
             "shim_pid": job.shim_pid}
        )  # fmt: skip
        self.loop.add_reader(job.shim_pidfd, self._on_shim_exit, job)
        c = self.classes.get(job.cls)
        log.info("job %s (%s) started: pid %s, %s", job.id, job.cls, job.pid, c.sched_text(),
                 extra=_about(job))  # fmt: skip

    # -- completion -----------------------------------------------------------------------
    def _on_shim_exit(self, job: Job) -> None:
        self.loop.remove_reader(job.shim_pidfd)
        if job.is_child:
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PIDFD, job.shim_pidfd, os.WEXITED)
        os.close(job.shim_pidfd)
        job.shim_pidfd = -1
        if job.spawned is not None:
            job.spawned.release()  # its stack lived in our address space
            job.spawned = None
        self.loop.create_task(self._finalize(job))

    async def _finalize(self, job: Job) -> None:
        jd = self.host.job_dir(job.id)
        exitrec = clone3.read_exit(jd)
        leaf = self.leaf(job)
        lost = None
        if exitrec is None:
            lost = "the job's shim died before recording its exit; job killed"
            log.warning("job %s: %s", job.id, lost)
        if leaf.exists():
            # the shim killed the leaf when the job's main process exited; wait it out
            for _ in range(3):
                if not leaf.populated():
                    break
                leaf.kill()
                await self._wait_empty(leaf)
        cpu, peak, oom = leaf.accounting()
        if job.pid is None and exitrec and exitrec.get("job_pid", 0) > 0:
            job.pid = exitrec["job_pid"]
        res = J.make_result(
            job, exitrec, cpu, peak, oom, self.classes.get(job.cls).price, time.time(), lost
        )
        self._record_finished(job, res)
        try:
            leaf.remove()
        except CgroupError as e:
            log.warning("job %s: %s", job.id, e)
        for name in (clone3.SHIM_FILE, clone3.EXIT_FILE):
            with contextlib.suppress(FileNotFoundError):
                (jd / name).unlink()
        if not job.is_child:
            self.host.remove_old_shims()  # an adopted shim gone: its old cgroup may be empty
        self.start_queued()

    async def _wait_empty(self, leaf: JobCgroup) -> None:
        fut = self.loop.create_future()
        self.host.watcher.watch(leaf, lambda: fut.done() or fut.set_result(None))
        try:
            await asyncio.wait_for(fut, UNPOPULATE_GRACE_S)
        except TimeoutError:
            log.warning(
                "%s still populated %.0f s after cgroup.kill", leaf.path, UNPOPULATE_GRACE_S
            )

    def finish_now(self, job: Job, state: str, reason: str) -> None:
        """End a job that has no shim to wait for (never started, or its class is gone)."""
        c = self.classes.get(job.cls)
        res = J.make_result(job, None, {}, None, None, c.price if c else 0.0, time.time(), reason)
        res["state"] = state
        self._record_finished(job, res)
        leaf = self.leaf(job) if c else None
        if leaf is not None and leaf.exists() and not leaf.populated():
            with contextlib.suppress(CgroupError):
                leaf.remove()
        if self.loop is not None:
            self.start_queued()

    def _record_finished(self, job: Job, res: dict) -> None:
        # durable before the leaf goes and before anyone hears of it: billing reads this
        self.journal.append(
            {"ev": "finished", "job": job.id, "t": time.time(), "result": res}, sync=True
        )
        crash_point("after-finish")
        job.state, job.result = "finished", res
        self.jobs.pop(job.id, None)
        self.remember(res)
        metrics.finished("node", job.cls, "job", res["state"], res["wall_ms"] / 1e3,
                         res["queued_ms"] / 1e3)  # fmt: skip
        log.info(
            "job %s (%s) %s%s: wall %.1f ms, cpu %.1f ms", job.id, job.cls, res["state"],
            f" ({res['reason']})" if res["reason"] else "", res["wall_ms"], res["cpu_ms"],
            extra=_about(job),
        )  # fmt: skip
        for fut in job.waiters:
            if not fut.done():
                fut.set_result(res)
        job.waiters.clear()

    def remember(self, res: dict) -> None:
        self.finished[res["job"]] = res
        self.finished_total += 1
        while len(self.finished) > self.cfg.keep_finished:
            old, _ = self.finished.popitem(last=False)
            shutil.rmtree(self.host.job_dir(old), ignore_errors=True)

    # -- control ---------------------------------------------------------------------------
    def kill(self, jid: str, reason: str = "killed by request") -> dict:
        job = self.jobs.get(jid)
        if job is None:
            if jid in self.finished:
                return {"ok": False, "error": f"job {jid} already finished"}
            return {"ok": False, "error": f"no such job {jid}"}
        if job.state == "queued":
            self.queue.remove(jid)
            res = J.cancelled_result(job, reason, time.time(), self.classes.get(job.cls).price)
            self._record_finished(job, res)
            return {"ok": True, "job": jid, "state": "cancelled"}
        job.kill_reason = reason
        self.journal.append(
            {"ev": "kill", "job": jid, "t": time.time(), "reason": reason}, sync=True
        )
        try:
            self.leaf(job).kill()
        except CgroupError as e:
            return {"ok": False, "error": str(e)}
        return {"ok": True, "job": jid, "state": "killing"}

    async def wait(self, jid: str) -> dict | None:
        if jid in self.finished:
            return self.finished[jid]
        job = self.jobs.get(jid)
        if job is None:
            return None
        fut = self.loop.create_future()
        job.waiters.append(fut)
        return await fut

    def read_output(self, jid: str, name: str, limit: int) -> str:
        try:
            with open(self.host.job_dir(jid) / name, "rb") as f:
                return f.read(limit).decode(errors="replace")
        except FileNotFoundError:
            return ""

    def status(self) -> dict:
        return status.status(self)

    def classes_info(self) -> list[dict]:
        return status.classes_info(self.classes)

    def list_jobs(self, cls: str | None = None, limit: int = 100) -> list[dict]:
        return status.list_jobs(self, cls, limit)

    def memory_snapshot(self) -> dict:
        return status.memory(self)

    def close(self) -> None:
        if self.journal:
            self.journal.close()

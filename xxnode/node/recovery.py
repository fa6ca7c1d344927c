"""A restarted daemon rebuilds itself from its journal and its state dir: jobs whose shim
kept running are adopted, jobs whose shim exited are finalized from its exit record, jobs
that never started are queued again, and job cgroups with no journal record are killed.
Cluster placements not yet reported are handed back to the dispatcher, which finishes the
cluster's side of them (xxnode/node/executor.py)."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field

from xxnode.journal import Journal
from xxnode.kernel import clone3
from xxnode.kernel.cgroup import CgroupError
from xxnode.node.job_cgroup import JobCgroup
from xxnode.node.jobs import Job
from xxnode.node.launch import UNPOPULATE_GRACE_S

log = logging.getLogger("xxnode")


@dataclass
class Placement:
    """A cluster job this node accepted and has not yet reported (DONE unacknowledged)."""

    place: dict  # the PLACE as journaled (executor.place_record)
    shard: str  # host:port of the shard that placed it
    local: str | None = None  # our job id, once the arbiter granted it and we admitted it
    result: dict | None = None  # our job's result, once it finished
    invoked: bool = False  # a function invocation that began (not re-run after a restart)


@dataclass
class Recovered:
    finalize: list[Job] = field(default_factory=list)  # adopted, shim gone: finalize
    watch: list[Job] = field(default_factory=list)  # adopted, shim alive: watch its pidfd
    placements: dict[str, Placement] = field(default_factory=dict)  # cluster job hex ->


def recover(node) -> Recovered:
    """Replay the journal into `node` (a Node whose host is set up), adopt what runs."""
    jpath = node.cfg.state_dir / "journal.jsonl"
    out = Recovered()
    pending: dict[str, Job] = {}
    for rec in Journal.replay(jpath):
        jid, ev = rec["job"], rec["ev"]
        if ev == "placed":
            out.placements[jid] = Placement(rec["place"], rec["shard"])
            continue
        if ev in ("done_acked", "done_abandoned"):
            out.placements.pop(jid, None)
            continue
        if ev == "invoked":
            if (p := out.placements.get(jid)) is not None:
                p.invoked = True
            continue
        node.bump_id(jid)
        if ev == "accepted":
            spec, cluster = rec["spec"], rec.get("cluster")
            pending[jid] = Job(jid, spec["class"], spec, rec["t"], cluster=cluster)
            if cluster and (p := out.placements.get(cluster["job"])) is not None:
                p.local = jid
        elif jid not in pending:
            continue
        elif ev == "started":
            j = pending[jid]
            j.state, j.started_at = "running", rec["t"]
            j.pid, j.shim_pid = rec.get("pid"), rec.get("shim_pid")
        elif ev == "kill":
            pending[jid].kill_reason = rec.get("reason")
        elif ev == "finished":
            job = pending.pop(jid)
            node.remember(rec["result"])
            if job.cluster and (p := out.placements.get(job.cluster["job"])) is not None:
                p.result = rec["result"]
    node.journal = Journal(jpath)
    requeue = []
    for job in pending.values():
        if node.classes.get(job.cls) is None:
            # the class was removed from the config: refuse rather than guess
            log.warning("job %s: class %r no longer configured", job.id, job.cls)
            node.finish_now(job, "lost", f"class {job.cls!r} no longer configured")
            continue
        if _recover_one(node, job, out):
            requeue.append(job)
    for job in requeue:
        job.state = "queued"
        job.started_at = job.pid = job.shim_pid = None
        node.jobs[job.id] = job
        node.queue.push(job.id, job.cls, job.accepted_at)
    _reap_orphan_leaves(node, set(pending))
    _prune_job_dirs(node)
    n_run = sum(1 for j in node.jobs.values() if j.state == "running")
    if pending or out.placements:
        log.info(
            "recovered: %d running job(s) adopted, %d re-queued, %d cluster job(s) to report",
            n_run, len(requeue), len(out.placements),
        )  # fmt: skip
    return out


def _recover_one(node, job: Job, out: Recovered) -> bool:
    """Adopt or finalize one unfinished job; True if it never started (re-queue it)."""
    jd = node.host.job_dir(job.id)
    for _ in range(3):
        if clone3.read_exit(jd) is not None:
            _adopt(node, job, None, out)  # finalize from the exit record
            return False
        state, pid = clone3.shim_state(jd)
        if state == "alive":
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue  # it just exited: look again
            _adopt(node, job, pidfd, out, pid)
            return False
        if state == "dead":
            if clone3.read_exit(jd) is not None:
                continue
            _adopt(node, job, None, out)  # shim died without a record: "lost"
            return False
        if state == "none" and not clone3.claim_void(jd):
            continue  # a shim claimed it just now
        # never started: no shim ever will now
        _discard_attempt(node, job)
        return True
    raise RuntimeError(f"job {job.id}: state dir keeps changing under recovery")


def _adopt(node, job: Job, pidfd: int | None, out: Recovered, shim_pid: int | None = None):
    job.state = "running"
    job.shim_pid = shim_pid or job.shim_pid
    job.is_child = False
    node.jobs[job.id] = job
    if pidfd is None:
        out.finalize.append(job)
    else:
        job.shim_pidfd = pidfd
        out.watch.append(job)


def _discard_attempt(node, job: Job) -> None:
    jd = node.host.job_dir(job.id)
    if jd.exists():
        dead = jd.with_name(f"{job.id}.void-{time.time_ns()}")
        jd.rename(dead)
        shutil.rmtree(dead, ignore_errors=True)
    leaf = node.leaf(job)
    if leaf.exists():
        if leaf.populated():
            leaf.kill()
        node.host.watcher.wait(leaf, UNPOPULATE_GRACE_S)
        leaf.remove()


def _reap_orphan_leaves(node, known: set[str]) -> None:
    for leaf in JobCgroup.present(node.host.root, node.classes.names()):
        if leaf.job_id in known:
            continue
        log.warning("orphan job cgroup %s (no journal record): killed", leaf.path)
        try:
            leaf.kill()
            node.host.watcher.wait(leaf, UNPOPULATE_GRACE_S)
            leaf.remove_tree()
        except CgroupError as e:
            log.warning("%s", e)


def _prune_job_dirs(node) -> None:
    keep = set(node.finished) | set(node.jobs)
    for d in (node.cfg.state_dir / "jobs").iterdir():
        if d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)

"""What `xxctl status`, `classes`, `jobs` and `memory` show: read-only views of a Node."""

from __future__ import annotations

import dataclasses
import os

from xxnode.kernel import sched

FINISHED_FIELDS = (
    "job", "class", "state", "pid", "argv", "accepted_at", "started_at", "wall_ms", "cpu_ms",
    "exit_code", "reason",
)  # fmt: skip


def status(node) -> dict:
    h = node.host
    running = {c: 0 for c in node.classes.names()}
    for j in node.jobs.values():
        if j.state == "running":
            running[j.cls] += 1
    pol, prio = sched.get_policy(0)
    return {
        "pid": os.getpid(),
        "started_at": node.started_at,
        "config": node.cfg.source,
        "daemon_sched": f"{sched.POLICY_NAMES.get(pol & ~os.SCHED_RESET_ON_FORK, pol)} {prio}",
        "cgroup_root": str(h.root.path),
        "controllers_enabled": sorted(h.enabled),
        "controllers_missing": h.missing,
        "controllers_withheld": h.withheld,
        "rt_group_sched": {"active": h.rt_group[0], "detail": h.rt_group[1]},
        "rt_throttling": h.rt_throttling,
        "state_dir": str(node.cfg.state_dir),
        "user": node.cfg.user,
        "max_running": node.cfg.max_running,
        "running": running,
        "queued": node.queue.by_class(),
        "finished_total": node.finished_total,
        "functions": node.functions.status() if node.functions else None,
        # the usage outbox: records not yet in the ledger, acknowledged, refused by it
        "usage": node.dispatcher.ledger.usage.counts() if node.dispatcher else None,
        "degraded": h.degraded,
    }


def classes_info(classes) -> list[dict]:
    return [
        {
            "name": c.name,
            "rank": c.rank,
            "price": c.price,
            "policy": c.policy,
            "priority": c.priority,
            "sched": c.sched_text(),
            "description": c.description,
        }  # fmt: skip
        for c in classes
    ]


def list_jobs(node, cls: str | None = None, limit: int = 100) -> list[dict]:
    live = [j.summary() for j in node.jobs.values()]
    done = [{k: r[k] for k in FINISHED_FIELDS} for r in list(node.finished.values())[-limit:]]
    rows = live + done
    if cls:
        rows = [r for r in rows if r["class"] == cls]
    return rows


def memory(node) -> dict:
    """The memory manager's snapshot with each job's eBPF counters beside it."""
    h = node.host
    snap = h.memory.snapshot()
    if h.bpf is not None:
        counters = h.bpf.read()
        for j in snap["jobs"]:
            try:
                c = counters.get(h.job_cgroup(j["cls"], j["job_id"]).id)
            except FileNotFoundError:
                continue  # the job ended since the snapshot
            j["ebpf"] = dataclasses.asdict(c) if c else {}
    snap["ebpf"] = "off" if h.bpf is None else ", ".join(h.bpf.attached())
    return snap

"""Scheduling classes: the only module that calls sched_setscheduler or reads RT sysctls.

The machine scheduler of the paper is "preemptive priority, FIFO within a class" — Linux's
SCHED_FIFO. We set it per thread (the kernel schedules threads, not processes).
"""

from __future__ import annotations

import os
from pathlib import Path

RT_RUNTIME = Path("/proc/sys/kernel/sched_rt_runtime_us")
RT_PERIOD = Path("/proc/sys/kernel/sched_rt_period_us")

POLICY_NAMES = {
    os.SCHED_OTHER: "SCHED_OTHER",
    os.SCHED_FIFO: "SCHED_FIFO",
    os.SCHED_RR: "SCHED_RR",
    os.SCHED_BATCH: "SCHED_BATCH",
    os.SCHED_IDLE: "SCHED_IDLE",
}
POLICY_BY_NAME = {v.removeprefix("SCHED_").lower(): k for k, v in POLICY_NAMES.items()}


def set_policy(pid: int, policy: int, priority: int = 0) -> None:
    """Set one thread's policy; priority must be 1..99 for FIFO/RR and 0 otherwise."""
    os.sched_setscheduler(pid, policy, os.sched_param(priority))


def get_policy(pid: int) -> tuple[int, int]:
    """(policy, rt priority) of one thread, as the kernel holds it."""
    return os.sched_getscheduler(pid), os.sched_getparam(pid).sched_priority


def threads_of(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def set_process_policy(pid: int, policy: int, priority: int = 0) -> int:
    """Every thread of a process; returns how many were set (threads may exit meanwhile)."""
    n = 0
    for tid in threads_of(pid):
        try:
            set_policy(tid, policy, priority)
            n += 1
        except ProcessLookupError:
            continue
    return n


def rt_throttling() -> tuple[int, int] | None:
    """(runtime_us, period_us); runtime -1 means RT throttling is off. None if unreadable."""
    try:
        return int(RT_RUNTIME.read_text()), int(RT_PERIOD.read_text())
    except (OSError, ValueError):
        return None

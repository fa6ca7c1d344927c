"""Self-tests of the kernel vm/run gives: if these fail, nothing else in the VM lane means much."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
import uuid

import pytest

from xxnode.kernel import psi
from xxnode.kernel.capabilities import parked
from xxnode.kernel.cgroup import Cgroup, find_cgroup2_mount

MiB = 1 << 20
ROOT = Cgroup(find_cgroup2_mount())


@pytest.fixture
def cg():
    """A scratch cgroup with memory, cpu and pids enabled for its leaf; removed afterwards."""
    parent = ROOT.create(f"xx-test-{uuid.uuid4().hex[:8]}")
    parent.enable({"memory", "cpu", "pids"})
    leaf = parent.create("leaf")
    yield leaf
    if leaf.procs():
        leaf.kill()
    for c in (leaf, parent):
        for _ in range(500):  # cgroup.kill is async: rmdir succeeds once the last task exits
            try:
                c.remove()
                break
            except OSError:
                time.sleep(0.01)


def test_every_controller_is_enabled_at_the_root():
    offered = ROOT.controllers()
    assert {"cpu", "memory", "pids", "io", "cpuset"} <= offered
    assert ROOT.subtree_control() == offered


def test_doctor_reports_every_capability_ok():
    out = subprocess.run(
        ["xxctl", "doctor", "--json"], capture_output=True, text=True, check=True
    ).stdout
    caps = {c["name"]: c for c in json.loads(out)["capabilities"]}
    bad = {n: c["detail"] for n, c in caps.items() if not c["ok"]}
    assert not bad
    assert len(caps) >= 13


def _spinner(cpu: int, prio: int, cgroup: Cgroup) -> subprocess.Popen:
    """A busy loop pinned to `cpu` at SCHED_FIFO `prio`, in `cgroup`, started before it spins."""
    proc = subprocess.Popen(["sh", "-c", "read _; while :; do :; done"], stdin=subprocess.PIPE)
    cgroup.attach(proc.pid)
    os.sched_setaffinity(proc.pid, {cpu})
    os.sched_setscheduler(proc.pid, os.SCHED_FIFO, os.sched_param(prio))
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    return proc


def test_higher_fifo_priority_takes_the_cpu_from_a_lower_one():
    """Preemptive priority on one CPU: the class guarantee XX is built on."""
    assert os.cpu_count() >= 2, "needs a CPU for the spinners and one for the test"
    os.sched_setaffinity(0, {0})
    groups = [ROOT.create(f"xx-spin-{uuid.uuid4().hex[:8]}") for _ in range(2)]
    procs = []
    try:
        procs.append(_spinner(1, 10, groups[0]))  # low class
        procs.append(_spinner(1, 50, groups[1]))  # high class
        u0 = [g.cpu_stat()["usage_usec"] for g in groups]
        t0 = time.monotonic()
        time.sleep(2.0)  # the measurement window itself, not a synchronisation
        u1 = [g.cpu_stat()["usage_usec"] for g in groups]
        wall = (time.monotonic() - t0) * 1e6
    finally:
        # Kill both before reaping either: a SIGKILLed FIFO task still needs the CPU to die,
        # and the low one never gets it while the high one spins.
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        for g in groups:
            g.remove()
    low, high = ((b - a) / wall for a, b in zip(u0, u1, strict=True))
    print(f"high share {high:.3f}, low share {low:.3f}")
    assert high >= 0.90
    assert low <= 0.05


def test_memory_reclaim_moves_anonymous_memory_to_swap(cg):
    with parked() as child:
        cg.attach(child.pid)
        child.touch(64 * MiB)
        assert cg.read_int("memory.current") >= 64 * MiB
        swapped_before = cg.read_int("memory.swap.current")
        cg.write("memory.reclaim", "32M")
        swapped = cg.read_int("memory.swap.current") - swapped_before
        zswapped = cg.memory_stat().get("zswapped", 0)
    print(f"swap.current grew {swapped / MiB:.1f} MiB; zswapped {zswapped / MiB:.1f} MiB")
    assert swapped >= 16 * MiB


def test_psi_trigger_fires_on_a_cgroup_under_memory_pressure(cg):
    """A job thrashing against memory.high stalls; the cgroup's trigger must wake poll()."""
    cg.write("memory.high", str(16 * MiB))
    with psi.Trigger(cg.path / "memory.pressure", "some", 50_000, 1_000_000) as trig:
        poller = select.poll()
        poller.register(trig.fileno(), select.POLLPRI)
        assert poller.poll(0) == []  # nothing has stalled yet
        hog = subprocess.Popen(
            ["sh", "-c", f"echo $$ > {cg.path}/cgroup.procs && "
             "exec stress-ng --vm 1 --vm-bytes 96M --vm-keep --timeout 60s --quiet"]
        )  # fmt: skip
        try:
            t0 = time.monotonic()
            events = poller.poll(60_000)
            waited = time.monotonic() - t0
        finally:
            hog.kill()
            hog.wait()
            if cg.procs():
                cg.kill()
    print(f"trigger fired after {waited:.2f} s")
    assert events and events[0][1] & select.POLLPRI

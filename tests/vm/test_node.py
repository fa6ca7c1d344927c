"""xxnode on Debian's 6.1 kernel with every cgroup v2 controller enabled (vm/run).

The same isolation as on the host, now with cpu, memory, pids and io in the job leaves:
SCHED_FIFO still works there (no RT group scheduling), pids.max and memory.peak do their
part, and a high-class job keeps its speed on a node saturated by low-class spinners while
processor sharing shows the load factor. Few tests: TCG is slow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.harness import Daemon, shared_dir
from xxnode.kernel.cgroup import Cgroup

SPIN = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static long long now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
                             return t.tv_sec * 1000000000LL + t.tv_nsec; }
int main(int argc, char **argv) {
    volatile unsigned long x = 0;
    if (!strcmp(argv[1], "work")) {
        unsigned long n = strtoul(argv[2], 0, 10); long long t0 = now();
        for (unsigned long i = 0; i < n; i++) x += i;
        printf("%lld\n", now() - t0); return 0;
    }
    long long end = now() + (long long)(atof(argv[2]) * 1e9);
    while (now() < end) for (int i = 0; i < 10000; i++) x += i;
    return 0;
}
"""


@pytest.fixture(scope="module")
def spin():
    d = shared_dir("xxvm-")
    (d / "spin.c").write_text(SPIN)
    subprocess.run(["gcc", "-O1", "-static", "-o", str(d / "spin"), str(d / "spin.c")], check=True)
    yield d / "spin"
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path / "node", max_running=16, extra="pids_max = 16")
    d.start()
    yield d
    d.cleanup()
    assert not d.cgroup.exists()


def test_every_controller_down_to_the_leaf_and_fifo_still_works(daemon):
    st = daemon.call({"op": "status"})["status"]
    assert not st["rt_group_sched"]["active"]
    for c in ("cpu", "memory", "pids", "io"):
        assert c in st["controllers_enabled"], st
    fin = daemon.run(
        "high",
        [
            "sh",
            "-c",
            "cat /proc/self/cgroup; chrt -p $$; cat ../cgroup.controllers 2>/dev/null; "
            "head -c 20000000 /dev/zero | tail -c 1 >/dev/null",
        ],
    )
    res = fin["result"]
    assert res["state"] == "succeeded", fin
    assert "SCHED_FIFO" in fin["stdout"] and "priority: 30" in fin["stdout"]
    assert res["memory_peak"] and res["memory_peak"] > 0
    leaf = daemon.cgroup.path / "high"
    assert {"cpu", "memory", "pids"} <= Cgroup(leaf).subtree_control()


def test_pids_max_bounds_a_fork_bomb(daemon):
    """pids.max = 16 per job: the 17th process cannot be forked; the job fails, its leaf goes."""
    fin = daemon.run(
        "low", ["sh", "-c", "for i in $(seq 40); do sleep 300 & done; echo all"], timeout=60
    )
    res = fin["result"]
    assert res["state"] == "failed", fin
    assert "all" not in fin["stdout"]
    assert "fork" in fin["stderr"].lower(), fin["stderr"]
    assert not (daemon.cgroup.path / "low" / res["job"]).exists()


def spinning(d: Daemon, cls: str, jobs: list[str], cpu_ms: int = 100) -> None:
    """Return once every load job has used `cpu_ms` of CPU: under TCG a job takes seconds
    to start, and a probe measured before the load runs measures nothing. No kernel event
    says "has used N ms", so cpu.stat is polled, bounded."""
    deadline = time.monotonic() + 120
    for jid in jobs:
        leaf = Cgroup(d.cgroup.path / cls / jid)
        while not leaf.exists() or leaf.cpu_stat().get("usage_usec", 0) < cpu_ms * 1000:
            assert time.monotonic() < deadline, f"load job {jid} never ran"
            time.sleep(0.05)


def test_high_class_keeps_its_speed_on_a_saturated_node(spin, tmp_path):
    """Load 2 x CPUs low spinners; the probe's slowdown against its isolated time stays near
    1 under XX and near the load factor under processor sharing (all SCHED_OTHER)."""
    os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(39))
    ncpu = os.cpu_count() or 1
    n = 30_000_000  # ~250 ms under TCG: long enough for CFS sharing to show

    def measure(classes: str, probe_cls: str, load_cls: str) -> float:
        d = Daemon(Path(tempfile.mkdtemp(dir=tmp_path)), max_running=64, classes=classes)
        try:
            d.start()

            def probe() -> float:
                fin = d.run(probe_cls, [str(spin), "work", str(n)], timeout=120)
                assert fin["result"]["state"] == "succeeded", fin
                return int(fin["stdout"]) / 1e6

            alone = sorted(probe() for _ in range(3))[1]
            load = [
                d.submit(load_cls, [str(spin), "load", "60"], timeout=90) for _ in range(2 * ncpu)
            ]
            spinning(d, load_cls, load)
            loaded = sorted(probe() for _ in range(3))[1]
            for jid in load:
                d.call({"op": "kill", "job": jid})
            for jid in load:
                d.wait(jid)
        finally:
            d.cleanup()
        print(f"{probe_cls}/{load_cls}: alone {alone:.1f} ms, loaded {loaded:.1f} ms")
        return loaded / alone

    # up to three rounds: under TCG a round whose spinners the host starves shows no
    # contention even without classes (one CI run: processor sharing 1.12x), and says
    # nothing about the ordering; a round where the baseline does show it is the measurement
    for _ in range(3):
        xx = measure(
            '[[class]]\nname="high"\nprice=2.0\npriority=30\n'
            '[[class]]\nname="low"\nprice=0.5\npolicy="batch"\n',
            "high",
            "low",
        )
        ps = measure('[[class]]\nname="all"\nprice=1.0\npolicy="other"\n', "all", "all")
        if ps >= 1.5:
            break
    print(
        f"VM slowdown: XX {xx:.2f}x, processor sharing {ps:.2f}x ({ncpu} CPUs, {2 * ncpu} spinners)"
    )
    # Once the load really runs: XX 1.00x vs processor sharing 5.69x in one run, 1.63x vs
    # 3.32x in another. Under TCG the guest clock also counts the host's contention between
    # vCPU threads, which no guest priority removes, so the VM lane asserts the baseline and
    # the ordering; the 1.00x figure comes from tools/bench_cpu_isolation on the host.
    assert ps >= 1.5
    assert xx < ps

"""The daemon's memory side with a memory controller, swap and full capabilities."""

import time

import pytest

from tests.support.harness import Daemon
from tests.support.node_memory_checks import check_memory_report, check_oom_order
from xxnode.kernel.cgroup import Cgroup


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("node"), max_running=4)
    d.start()
    yield d
    d.cleanup()


def test_top_class_never_swaps_and_is_protected(daemon):
    top = Cgroup(daemon.cgroup.path / "high")
    assert top.read("memory.swap.max").strip() == "0"
    assert top.read("memory.low").strip() == "max"
    low = Cgroup(daemon.cgroup.path / "low")
    assert low.read("memory.swap.max").strip() == "max"


def test_oom_order_reaches_below_system_tasks(daemon):
    adj = check_oom_order(daemon)
    assert adj["high"] == -999


def test_memory_report_is_managed(daemon):
    m = check_memory_report(daemon, managed=True)
    assert m["trigger"] == "armed"


MiB = 1 << 20
# perl is in every Debian base system and starts fast from the 9p root; `'a' x N` builds
# the string and copies it, so the peak is ~2N and the steady state ~N.
HOLD = "$x = 'a' x ({mib} << 20); $| = 1; print qq(held\\n); sleep 600"
BURST = "$x = 'a' x ({mib} << 20); print qq(done\\n)"


def test_when_reclaim_cannot_help_the_oom_killer_takes_the_lowest_class(daemon):
    """No swap and a hard cap on the node: the kernel must pick a victim. Class order says
    it is the low job, the high job completes, and the low job is reported oom_killed."""
    root = daemon.cgroup
    root.write("memory.swap.max", "0")
    root.write("memory.max", str(400 * MiB))
    try:
        low = daemon.submit("low", ["/usr/bin/perl", "-e", HOLD.format(mib=150)], timeout=600)
        leaf = Cgroup(root.path / "low" / low)
        deadline = time.monotonic() + 120
        while (leaf.read_int("memory.current") or 0) < 140 * MiB:
            assert time.monotonic() < deadline, "the low job never took its memory"
            time.sleep(0.1)  # no kernel event marks "memory reached N"; bounded poll
        high = daemon.run("high", ["/usr/bin/perl", "-e", BURST.format(mib=150)], timeout=600)
        low_res = daemon.wait(low)
    finally:
        root.write("memory.max", "max")
        root.write("memory.swap.max", "max")
    assert high["result"]["state"] == "succeeded", high["result"]
    assert high["stdout"].strip() == "done"
    assert low_res["result"]["state"] == "oom_killed", low_res["result"]
    assert low_res["result"]["oom_kills"] >= 1

"""The daemon's memory side with a memory controller, swap and full capabilities."""

import pytest

from tests.node_memory_checks import check_memory_report, check_oom_order
from xxnode.kernel.cgroup import Cgroup
from xxnode.node.harness import Daemon


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

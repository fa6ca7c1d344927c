"""The daemon's memory side on this host: no memory controller, no swap, no
CAP_SYS_RESOURCE — it must still run, order OOM kills by class as far as it can, and say
what is off."""

import subprocess

from tests.support.node_memory_checks import check_memory_report, check_oom_order


def test_jobs_get_their_class_oom_rank_before_they_run(daemon):
    check_oom_order(daemon)


def test_memory_report_and_status_name_the_degraded_modes(daemon):
    m = check_memory_report(daemon, managed=False)
    assert m["reclaims"] == []
    human = subprocess.run(["xxctl", "memory"], env=daemon.env(), capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    assert "watching only" in human and "CEILING" in human

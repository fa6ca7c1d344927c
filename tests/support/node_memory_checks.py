"""Checks of the daemon's memory side shared by the host and VM lanes: what differs between
the two kernels is the expectation, passed in, not the check."""

from __future__ import annotations

import json
import subprocess

from tests.support.harness import Daemon
from xxnode.kernel import proc


def xxctl_json(d: Daemon, *args: str) -> dict:
    r = subprocess.run(
        ["xxctl", *args, "--json"], env=d.env(), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def job_oom_adj(d: Daemon, cls: str) -> int:
    """A job reads its own oom_score_adj: set by the spawn path before its code ran."""
    res = d.run(cls, ["/bin/cat", "/proc/self/oom_score_adj"])
    assert res["result"]["exit_code"] == 0, res
    return int(res["stdout"])


def check_oom_order(d: Daemon) -> dict[str, int]:
    adj = {c: job_oom_adj(d, c) for c in ("high", "medium", "low")}
    assert adj["low"] == 1000 > adj["medium"] > adj["high"]
    want_top = -999 if proc.has_capability(proc.CAP_SYS_RESOURCE) else 0
    assert adj["high"] == want_top
    return adj


def check_memory_report(d: Daemon, managed: bool) -> dict:
    m = xxctl_json(d, "memory")
    assert m["managed"] is managed
    assert set(m["classes"]) == {"high", "medium", "low"}
    assert 0 < m["free"] <= m["total"]
    assert m["classes"]["high"]["ceiling"] is None  # the top class is never held back
    # PSI triggers on the root and every class; unprivileged kernels need 2 s windows
    assert m["trigger"].startswith("armed"), m["trigger"]
    status = xxctl_json(d, "status")
    named = " ".join(status["degraded"])
    assert ("memory-unmanaged" in named) is (not managed)
    return m

"""The cluster across hosts that are network namespaces (``tests/netlab.py``), no netem.

What loopback cannot show: every party has an address of its own on a shared segment,
so a shard must reach each node at the address the node has on its host, and a node must
CLAIM from the client at the address the shard saw the client submit from (arbiter "@").
A daemon or a client that assumed 127.0.0.1 anywhere fails here. Loss and delay on these
links need sch_netem, which this kernel lacks: that is the VM lane
(``tests/vm/test_cluster_net.py``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
from pyroute2 import IPRoute, netns

from tests.support.cluster_procs import (
    Cluster,
    assert_exactly_once,
    client_at,
    submit_all,
    wait_registered,
)
from tests.support.netlab import LabError, Netem, netlab
from xxnode import wire

HOSTS = ["s0", "s1", "n0", "n1", "n2", "client"]


def test_jobs_cross_hosts_each_run_exactly_once(tmp_path):
    with netlab(HOSTS) as lab:
        cl = Cluster(tmp_path, 2, 3, where=lambda role, i: lab[f"{role[0]}{i}"], shard_port=7100)
        try:

            async def go():
                async with client_at(cl, lab["client"], spread=True) as c:
                    await wait_registered(c, 3)
                    ids, results = await submit_all(c, 200, seed=21)
                    return ids, results, await c.status("nodes")

            ids, results, rows = asyncio.run(go())
        finally:
            cl.stop()
        assert_exactly_once(cl, results, ids)
        assert all(r["status"] == 0 for r in results.values())
        assert {r["node"] for r in results.values()} == {"node0", "node1", "node2"}
        assert [wire.fmt_addr(a).rsplit(":", 1)[0] for a in cl.shard_addrs] == [
            lab["s0"].ip,
            lab["s1"].ip,
        ]
        for row in rows:  # each shard knows each node by its own host's address
            known = {n["node"]: n["addr"].rsplit(":", 1)[0] for n in row["nodes"]}
            assert known == {f"node{i}": lab[f"n{i}"].ip for i in range(3)}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _links() -> set[str]:
    with IPRoute() as ipr:
        return {link.get("ifname") for link in ipr.get_links()}


def test_lab_teardown_leaves_nothing_even_when_the_body_raises():
    links_before = _links()
    with pytest.raises(RuntimeError, match="the test failed"), netlab(["a", "b"]) as lab:
        tag = lab.tag
        # a process in host a with a child of its own: neither is ours to reap
        p = lab["a"].popen(
            [sys.executable, "-c", "import os, time; os.fork(); time.sleep(600)"],
        )
        deadline = time.monotonic() + 10
        inner: list[int] = []
        while len(inner) < 2 and time.monotonic() < deadline:
            inner = lab.pids().get(lab["a"].ns, [])  # both in the namespace: polled
            time.sleep(0.01)
        assert p.pid in inner and len(inner) == 2
        raise RuntimeError("the test failed")
    assert p.wait(timeout=10) == -signal.SIGKILL
    assert not [pid for pid in inner if _alive(pid)]
    assert [ns for ns in netns.listnetns() if ns.startswith(tag)] == []
    assert _links() == links_before  # nothing was ever made in this namespace


def test_netem_where_the_kernel_lacks_it_is_a_clear_error():
    """This host kernel has no sch_netem: building a lab with netem must say so in one
    line and leave nothing behind (the namespaces made before the failure included).
    Where the kernel has netem, the lab is built and its links carry it."""
    before = set(netns.listnetns())
    has_netem = os.path.isdir("/sys/module/sch_netem") or (
        subprocess.run(["modprobe", "-q", "sch_netem"], capture_output=True).returncode == 0
    )
    if has_netem:
        with netlab(["a"], Netem(loss=1.0, delay_ms=1.0)) as lab:
            assert lab.qdisc_stats("a")["kind"] == "netem"
    else:
        with pytest.raises(LabError, match="no netem qdisc"), netlab(["a"], Netem(loss=1.0)):
            pass
    assert set(netns.listnetns()) == before


@pytest.mark.parametrize(
    "make",
    [
        lambda: Netem(loss=101.0),
        lambda: Netem(duplicate=-1.0),
        lambda: Netem(delay_ms=-1.0),
        lambda: Netem(delay_ms=1.0, jitter_ms=2.0),
        lambda: netlab(["a", "a"]).__enter__(),
        lambda: netlab([]).__enter__(),
        lambda: netlab(["a-b"]).__enter__(),
    ],
    ids=["loss>100", "dup<0", "delay<0", "jitter>delay", "same name", "no host", "bad name"],
)
def test_bad_lab_parameters_are_refused_before_anything_is_made(make):
    before = set(netns.listnetns())
    with pytest.raises(LabError):
        make()
    assert set(netns.listnetns()) == before

"""The cluster over a real (emulated) network: every shard, node and the client a host of
its own -- a network namespace behind a veth on one bridge, its own IP -- with netem on
every host's link: 10 % loss, 5 ms +- 2 ms delay (jitter reorders), 2 % duplication.

Nothing is injected in our transport here (XX_WIRE_DROP is off): whatever is lost,
late, reordered or doubled, the kernel's qdisc did it, and the test reads netem's own
counters to show it did. The host kernel has no sch_netem, so this runs in the VM lane.
Processes and checks are the host lane's (``tests/cluster_procs.py``); the lab is
``tests/netlab.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import select
import signal
import socket
import struct
import subprocess
import time

import pytest

from tests.support.cluster_procs import (
    Cluster,
    assert_exactly_once,
    assert_node_loss_accounted,
    client_at,
    submit_all,
    submit_and_kill_node,
    wait_idle_listed,
    wait_registered,
    wait_shards_done,
)
from tests.support.netlab import Netem, netlab

NETEM = Netem(loss=10.0, delay_ms=5.0, jitter_ms=2.0, duplicate=2.0)
SHARDS, NODES = 2, 3
HOSTS = [f"s{i}" for i in range(SHARDS)] + [f"n{i}" for i in range(NODES)] + ["client"]
N_JOBS = 250


@pytest.fixture(scope="module", autouse=True)
def kernel_modules():
    """netem, veth and the bridge are modules of Debian's kernel: load them, or fail."""
    r = subprocess.run(
        ["modprobe", "-a", "sch_netem", "veth", "bridge"], capture_output=True, text=True
    )
    assert r.returncode == 0, f"modprobe: {r.stderr.strip()}"


@pytest.fixture
def lab_cluster(tmp_path):
    """2 shards and 3 dispatcher processes, each in its own lab host; nothing left after."""
    with netlab(HOSTS, NETEM) as lab:
        cl = Cluster(
            tmp_path,
            SHARDS,
            NODES,
            where=lambda role, i: lab[f"{role[0]}{i}"],  # shard 0 -> "s0", node 1 -> "n1"
            shard_port=7100,  # each shard has its own IP: all five processes start at once
        )
        try:
            yield lab, cl
        finally:
            cl.stop()


def test_lab_links_lose_delay_reorder_and_duplicate():
    """The lab's self-test: 2000 numbered datagrams from one host to another cross one
    netem hop; what arrives is what NETEM says, measured at the receiver."""
    n = 2000
    with netlab(["a", "b"], NETEM) as lab:
        with lab["a"].entered():
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with lab["b"].entered():
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with tx, rx:
            rx.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: no local loss
            rx.bind((lab["b"].ip, 9000))
            rx.setblocking(False)
            got: list[tuple[int, float]] = []

            def drain(wait: float) -> None:
                while select.select([rx], [], [], wait)[0]:
                    seq, sent = struct.unpack("!Id", rx.recv(64))
                    got.append((seq, time.monotonic() - sent))

            # first a neighbour entry for b (ARP crosses netem too, and packets waiting
            # on it could overflow the neighbour queue): probe until one arrives
            deadline = time.monotonic() + 10
            while not select.select([rx], [], [], 0.05)[0]:
                assert time.monotonic() < deadline, "no datagram crossed the link in 10 s"
                tx.sendto(struct.pack("!Id", n, time.monotonic()), (lab["b"].ip, 9000))
            drain(0.2)
            got.clear()
            before = lab.qdisc_stats("a")
            for i in range(n):
                tx.sendto(struct.pack("!Id", i, time.monotonic()), (lab["b"].ip, 9000))
                if i % 50 == 49:
                    drain(0)  # keep netem's queue (limit 1000) and ours short
            drain(0.5)  # until half a second passes with nothing arriving
        after = lab.qdisc_stats("a")
    drops = after["drops"] - before["drops"]
    seqs = [q for q, _ in got]
    assert set(seqs) <= set(range(n))
    uniq = set(seqs)
    lost = n - len(uniq)
    dups = len(seqs) - len(uniq)
    late = sum(1 for prev, q in itertools.pairwise(seqs) if q < prev)  # overtaken
    delays = sorted(d for _, d in got)
    print(
        f"netem self-test: {n} sent, {lost} lost, {dups} duplicated, {late} reordered, "
        f"delay min {delays[0] * 1e3:.1f} / p50 {delays[len(delays) // 2] * 1e3:.1f} ms; "
        f"netem counted {drops} drops"
    )
    # every loss is netem's and counted by it; netem also counts its own duplicate copies
    # it drops (a copy is enqueued again and meets the loss draw) and any lost ARP
    assert lost <= drops <= lost + dups + 10
    assert 0.06 * n < lost < 0.14 * n
    assert 0.005 * n < dups < 0.04 * n
    assert late > 0
    assert delays[0] >= 0.0029  # 5 ms - 2 ms: no datagram skips the delay
    assert delays[len(delays) // 2] >= 0.004


def _netem_totals(lab) -> tuple[int, int]:
    sent = dropped = 0
    for h in HOSTS:
        st = lab.qdisc_stats(h)
        assert st["kind"] == "netem", st
        assert st["drops"] > 0, f"{h}: netem dropped nothing on its link ({st})"
        sent += st["packets"]
        dropped += st["drops"]
    return sent, dropped


def test_mixed_jobs_over_lossy_links_each_run_exactly_once(lab_cluster):
    lab, cl = lab_cluster
    opts = lab.netem_options("n0")  # the kernel took our parameters
    assert opts["loss"] > 0 and opts["delay"] > 0 and opts["jitter"] > 0

    async def go():
        async with client_at(cl, lab["client"], spread=True) as c:
            await wait_registered(c, NODES, timeout=30)
            ids, results = await submit_all(c, N_JOBS, seed=11, window=60)
            rows = await wait_shards_done(c, N_JOBS, timeout=30)
            return ids, results, rows, c.ep.stats, c.ep.codec.dropped  # Counters

    ids, results, rows, stats, client_dropped = asyncio.run(go())
    assert_exactly_once(cl, results, ids)
    assert [r for r in results.values() if r["status"] != 0] == []
    assert len(cl.executions()) == N_JOBS
    assert sum(r["counts"]["done"] for r in rows) == N_JOBS
    assert all(r["counts"]["submitted"] > 0 for r in rows)  # both shards took work
    assert {r["node"] for r in results.values()} == {f"node{i}" for i in range(NODES)}
    # the losses were the network's: our transport dropped nothing itself, retransmitted
    assert stats["dropped_out"] == 0 and stats["retransmits"] > 0
    sent, dropped = _netem_totals(lab)
    replayed = client_dropped["replayed"] + sum(r["dropped"].get("replayed", 0) for r in rows)
    print(
        f"{N_JOBS} jobs: netem sent {sent} datagrams and dropped {dropped} on the 6 links; "
        f"client retransmits {stats['retransmits']}; duplicates refused at shards and client {replayed}"
    )
    assert 0.05 < dropped / (sent + dropped) < 0.15, (sent, dropped)
    # netem's duplicates reached shards and client and were refused by the replay defence
    assert replayed > 0


def test_kill_9_a_node_mid_run_over_lossy_links(lab_cluster):
    lab, cl = lab_cluster

    async def go():
        async with client_at(cl, lab["client"], spread=True) as c:
            await wait_registered(c, NODES, timeout=30)
            # the burst goes to the idle-listed nodes, so node0 must be one of them: a CI run
            # once saw it get none of the 90 jobs in 60 s (a join still in flight under netem
            # is the likely cause; the test now waits for the listing instead of assuming it)
            await wait_idle_listed(c, ["node0"], timeout=30)
            return await submit_and_kill_node(c, cl, 90, seed=12, victim=0)

    ids, results = asyncio.run(go())
    assert cl.nodes[0][0].wait() == -signal.SIGKILL
    lost = assert_node_loss_accounted(cl, results, ids, victim=0)
    print(f"kill -9 node0: {len(lost)} of {len(ids)} jobs NODE_LOST, the rest ran once")
    _netem_totals(lab)  # every link, the killed node's included, did lose datagrams

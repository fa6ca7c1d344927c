"""Shards and dispatchers as real processes on loopback, driven by the cluster client.

The processes and the checks are ``tests/cluster_procs.py`` (shared with the network lab:
``tests/host/test_cluster_netns.py``, ``tests/vm/test_cluster_net.py``).  Loss is injected
here with XX_WIRE_DROP (a seeded drop filter on every outgoing datagram of every party).
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import re
import signal
import socket
import time

import pytest

from tests.support.cluster_procs import (
    Cluster,
    assert_exactly_once,
    assert_node_loss_accounted,
    submit_all,
    submit_and_kill_node,
    wait_registered,
    wait_shards_done,
)
from xxnode import wire
from xxnode.cluster.client import ClusterClient


@pytest.fixture
def cluster_factory(tmp_path):
    made: list[Cluster] = []

    def make(*a, **kw) -> Cluster:
        c = Cluster(tmp_path, *a, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def test_1000_mixed_jobs_each_run_exactly_once(cluster_factory):
    cl = cluster_factory(n_shards=3, n_nodes=4)

    async def go():
        async with ClusterClient(cl.shard_addrs, cl.key, spread=True) as c:
            await wait_registered(c, 4)
            ids, results = await submit_all(c, 1000)
            rows = await wait_shards_done(c, 1000)
            return ids, results, rows

    ids, results, rows = asyncio.run(go())
    assert_exactly_once(cl, results, ids)
    assert sum(r["counts"]["done"] for r in rows) == 1000
    assert all(r["counts"]["submitted"] > 0 for r in rows)  # every shard took work
    assert len(cl.executions()) == 1000


def test_kill_9_a_shard_mid_run(cluster_factory):
    cl = cluster_factory(n_shards=2, n_nodes=3)
    victim = cl.shards[0][0]

    async def go():
        async with ClusterClient(cl.shard_addrs, cl.key, spread=True) as c:
            await wait_registered(c, 3)
            done: dict = {}
            task = asyncio.ensure_future(submit_all(c, 400, seed=2, window=100, results=done))
            while len(done) < 10 and not task.done():
                await asyncio.sleep(0.01)  # results land as jobs end: polled
            assert not task.done()
            victim.send_signal(signal.SIGKILL)  # mid-run: most jobs not yet submitted
            ids, results = await task
            rows = await c.status("shard")
            return ids, results, rows, c.failovers

    ids, results, rows, failovers = asyncio.run(go())
    assert victim.wait() == -signal.SIGKILL
    assert_exactly_once(cl, results, ids)
    assert failovers > 0
    assert "error" in rows[0] and "error" not in rows[1]
    assert all(r["status"] == 0 for r in results.values())  # no node died: nothing lost


def test_10_percent_datagram_loss(cluster_factory):
    cl = cluster_factory(n_shards=2, n_nodes=3, drop=0.1)

    async def go():
        async with ClusterClient(cl.shard_addrs, cl.key, drop=0.1, seed=7, spread=True) as c:
            await wait_registered(c, 3)
            ids, results = await submit_all(c, 400, seed=3)
            return ids, results, c.ep.stats["retransmits"], c.ep.stats["dropped_out"]

    ids, results, retransmits, dropped = asyncio.run(go())
    assert_exactly_once(cl, results, ids)
    assert dropped > 0 and retransmits > 0
    bad = [r for r in results.values() if r["status"] != 0]
    assert bad == []


def test_kill_9_a_node_mid_run(cluster_factory):
    """Started jobs of the dead node are reported NODE_LOST (declared policy), the others
    are placed again; none runs twice and every job is accounted for."""
    cl = cluster_factory(n_shards=2, n_nodes=3)

    async def go():
        async with ClusterClient(cl.shard_addrs, cl.key, spread=True) as c:
            await wait_registered(c, 3)
            return await submit_and_kill_node(c, cl, 120, seed=4, victim=0)

    ids, results = asyncio.run(go())
    assert cl.nodes[0][0].wait() == -signal.SIGKILL
    assert_node_loss_accounted(cl, results, ids, victim=0)


def test_bad_datagrams_dropped_counted_state_unchanged(cluster_factory):
    cl = cluster_factory(n_shards=1, n_nodes=1)
    shard_proc, shard_addr = cl.shards[0]
    node_proc, node_addr, _ = cl.nodes[0]
    rng = random.Random(5)

    async def go():
        async with ClusterClient(cl.shard_addrs, cl.key) as c:
            await wait_registered(c, 1)
            await c.run("high", {"sleep": 0.0}, timeout=10)
            before = (await c.status("shard"))[0]
            # a valid datagram, to replay, mutate and re-sign with the wrong key
            submit = wire.Submit(os.urandom(16), "high", "", {"sleep": 0}, 0, bytes(32), b"")
            good = wire.Codec(cl.key).encode(submit, rid=1)
            sent = collections.Counter()
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for dst in (shard_addr, node_addr):
                s.sendto(good, dst)  # the original: the node refuses it, the shard queues it
                for _ in range(200):
                    kind = rng.choice(["random", "trunc", "flip", "forged", "replay", "big"])
                    if kind == "random":
                        d = rng.randbytes(rng.randrange(0, 2000))
                    elif kind == "trunc":
                        d = good[: rng.randrange(len(good))]
                    elif kind == "flip":
                        i = rng.randrange(len(good))
                        d = good[:i] + bytes([good[i] ^ (1 << rng.randrange(8))]) + good[i + 1 :]
                    elif kind == "forged":
                        d = wire.Codec(b"f" * 32).encode(wire.Probe(), rid=3)
                    elif kind == "replay":
                        d = good
                    else:
                        d = b"XX" + rng.randbytes(wire.MAX_DATAGRAM + 100)
                    s.sendto(d, dst)
                    sent[dst] += 1
            s.close()
            await asyncio.sleep(0.3)  # datagrams in flight on loopback; no event to wait on
            after = (await c.status("shard"))[0]
            return before, after, sent

    before, after, sent = asyncio.run(go())
    assert shard_proc.poll() is None and node_proc.poll() is None
    # the one original SUBMIT was accepted (it is valid); every other datagram was dropped
    assert after["counts"]["submitted"] == before["counts"]["submitted"] + 1
    assert sum(after["dropped"].values()) - sum(before["dropped"].values()) == sent[shard_addr]
    assert after["dropped"].get("bad_mac", 0) > 0 and after["dropped"].get("replayed", 0) > 0
    assert after["nodes"] == before["nodes"]


def test_6mb_input_reaches_the_node_intact_under_loss(cluster_factory):
    """The input travels client -> shard -> node as pulled fragments, 5 % loss each way."""
    cl = cluster_factory(n_shards=2, n_nodes=1, drop=0.05)
    payload = os.urandom(wire.MAX_PAYLOAD)

    async def go():
        async with ClusterClient(cl.shard_addrs, cl.key, drop=0.05, seed=9) as c:
            await wait_registered(c, 1)
            return await c.run("low", {"sleep": 0}, payload, timeout=120)

    res = asyncio.run(go())
    assert res["status"] == 0
    assert res["input_bytes"] == len(payload)
    assert res["input_sha256"] == wire.digest(payload).hex()


def test_refused_placement_stays_queued_then_runs():
    """A node refusing (memory critically full) keeps the job in the shard's queue; the
    head policy sends it again, and it runs once the node admits it."""
    from xxnode.cluster.dispatcher import Dispatcher
    from xxnode.cluster.synthetic import SyntheticExecutor
    from xxnode.config import builtin_classes as default_classes
    from xxnode.shard.server import Shard

    class Refusing(SyntheticExecutor):
        refusals = 0

        def admit(self, cls):
            if self.refusals < 3:
                self.refusals += 1
                return "memory critically full"
            return None

    async def go():
        key = os.urandom(32)
        shard = Shard(default_classes())
        addr = await shard.start(("127.0.0.1", 0), wire.Codec(key))
        ex = Refusing()
        d = Dispatcher("n0", [addr], ex, heartbeat_s=0.1)
        await d.start(("127.0.0.1", 0), wire.Codec(key))
        try:
            async with ClusterClient([addr], key) as c:
                await wait_registered(c, 1)
                res = await c.run("high", {"sleep": 0}, timeout=20)
            return res, dict(shard.counts), ex.refusals
        finally:
            d.close()
            shard.close()

    res, counts, refusals = asyncio.run(go())
    assert res["status"] == 0 and res["node"] == "n0"
    assert refusals == 3 and counts["refused"] == 3 and counts["requeued"] >= 3
    assert counts["placed"] == 1 and counts["done"] == 1


@pytest.mark.parametrize("arbiter", ["client", "shard"])
def test_a_node_that_took_a_job_silently_then_died_is_reported_node_lost(arbiter):
    """The PLACE reached the node, which claimed the job (granted) and started it, but no
    ACCEPT ever reached the shard: the placement timed out and the job went to another
    node, which was denied it.  When the silent node is declared dead, the job is
    reported NODE_LOST -- it was not waited on forever, and it did not run twice.
    (Seen in the VM lane under netem: an ACCEPT lost just before a kill -9.)"""
    from xxnode.cluster.dispatcher import Dispatcher
    from xxnode.cluster.synthetic import SyntheticExecutor
    from xxnode.config import builtin_classes as default_classes
    from xxnode.config.shard import ShardParams
    from xxnode.shard.server import Shard

    async def go():
        key = os.urandom(32)
        loop = asyncio.get_running_loop()
        shard = Shard(default_classes(), ShardParams(dead_after=1.5, place_timeout=0.3))
        addr = await shard.start(("127.0.0.1", 0), wire.Codec(key))
        places: asyncio.Queue = asyncio.Queue()

        def silent(msg, a):  # takes every PLACE and never answers it
            if type(msg) is wire.Place:
                places.put_nowait(msg)
            return loop.create_future()  # a reply that never comes

        node = await wire.open_endpoint(("127.0.0.1", 0), wire.Codec(key), silent)
        ex = SyntheticExecutor()
        honest = Dispatcher("honest", [addr], ex, heartbeat_s=0.1)
        try:
            await node.request(addr, wire.IdleJoin("silent", 64 << 30, 64 << 30, 0))
            async with ClusterClient([addr], key) as c:
                jid = await c.submit("high", {"sleep": 0}, wait=arbiter == "client")
                place = await asyncio.wait_for(places.get(), 5)
                judge = wire.parse_addr(place.arbiter) if place.arbiter else addr
                grant = await node.request(judge, wire.Claim(jid, "silent"))
                await honest.start(("127.0.0.1", 0), wire.Codec(key))  # takes the retry
                if arbiter == "client":
                    res = await c.result(jid, timeout=15)
                else:
                    deadline = loop.time() + 15
                    while shard.counts["done"] + shard.counts["nodes_lost"] < 2:
                        assert loop.time() < deadline, f"job never reported: {shard.counts}"
                        await asyncio.sleep(0.05)  # no event to wait on in-process
                    res = {"status": shard.finished.get(jid), "node": "silent"}
            return grant, res, dict(shard.counts), dict(honest.counts)
        finally:
            honest.close()
            node.close()
            shard.close()

    grant, res, counts, ran = asyncio.run(go())
    assert grant.ok
    assert res["status"] == wire.NODE_LOST and res["node"] == "silent"
    assert counts["place_timeouts"] >= 1 and counts["nodes_lost"] == 1
    assert ran["denied"] == 1 and ran["ran"] == 0  # the retry ran nothing


def test_idle_and_nodes_lists_longer_than_a_datagram_come_whole():
    """300 nodes do not fit one STATUS reply (9 KB): the shard pages its lists and the
    client joins the pages, so `xxctl nodes` works on a real fleet."""
    from xxnode.config import builtin_classes as default_classes
    from xxnode.shard.answers import STATUS_PAGE
    from xxnode.shard.server import Shard

    n_nodes = 300

    async def go():
        key = os.urandom(32)
        shard = Shard(default_classes())
        addr = await shard.start(("127.0.0.1", 0), wire.Codec(key))
        fleet = await wire.open_endpoint(("127.0.0.1", 0), wire.Codec(key))
        try:
            await asyncio.gather(
                *(
                    fleet.request(addr, wire.IdleJoin(f"node-{i:04d}", 8 << 30, 16 << 30, i % 5))
                    for i in range(n_nodes)
                )
            )
            async with ClusterClient([addr], key) as c:
                return await c.status("nodes"), await c.status("idle"), await c.status()
        finally:
            fleet.close()
            shard.close()

    (nodes,), (idle,), (summary,) = asyncio.run(go())
    assert n_nodes > 2 * STATUS_PAGE  # several pages, and one reply would not fit
    assert [r["node"] for r in nodes["nodes"]] == [f"node-{i:04d}" for i in range(n_nodes)]
    assert sorted(r["node"] for r in idle["idle"]) == [f"node-{i:04d}" for i in range(n_nodes)]
    assert summary["nodes"] == summary["idle"] == n_nodes
    with pytest.raises(ValueError):  # what paging avoids: the whole list in one reply
        wire.check(wire.StatusReply({"nodes": nodes["nodes"]}))


def test_detached_jobs_survive_kill_9_of_their_shard(cluster_factory):
    """With a state dir a shard answers only what is on disk: 300 detached jobs (their
    submitter gone once acked), the only shard killed -9 mid-run and restarted on the
    same address and state -- every job runs, exactly once, and the shard ends with
    nothing unfinished."""
    cl = cluster_factory(n_shards=1, n_nodes=3, shard_state=True)
    n = 300
    rng = random.Random(21)

    async def submit() -> list[bytes]:
        async with ClusterClient(cl.shard_addrs, cl.key) as c:
            await wait_registered(c, 3)
            specs = [(rng.choice(("high", "medium", "low")), {"sleep": 0.2}) for _ in range(n)]
            return await asyncio.gather(*(c.submit(k, s, wait=False) for k, s in specs))

    async def settle(timeout: float = 90.0) -> dict:
        async with ClusterClient(cl.shard_addrs, cl.key) as c:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                (row,) = await c.status()
                if row.get("jobs") == 0 and sum(cl.executions().values()) >= n:
                    return row
                assert loop.time() < deadline, (row, len(cl.executions()))
                await asyncio.sleep(0.1)  # processes' files and counters: no event

    ids = asyncio.run(submit())
    while sum(cl.executions().values()) < 40:  # some ran, some run, most wait
        time.sleep(0.02)
    shard = cl.shards[0][0]
    shard.kill()
    assert shard.wait() == -signal.SIGKILL
    cl.restart_shard(0)
    row = asyncio.run(settle())
    ran = cl.executions()
    assert sorted(ran) == sorted(j.hex() for j in ids)
    assert set(ran.values()) == {1}, [j for j, k in ran.items() if k > 1]
    assert row["counts"]["recovered"] > 0


def test_the_shard_rejects_a_bad_spec_and_logs_each_job_with_time_and_level(cluster_factory):
    """A spec no node could run is refused at the shard, naming the field; every job's end
    (at debug; at info only those that did not run) and the SIGTERM are in the shard's log,
    each line stamped and levelled."""
    cl = cluster_factory(n_shards=1, n_nodes=1, shard_args=("--log-level", "debug"))
    shard_proc, shard_addr = cl.shards[0]

    async def go():
        async with ClusterClient(cl.shard_addrs, cl.key) as c:
            await wait_registered(c, 1)
            done = await c.run("medium", {"sleep": 0.0}, timeout=10)
            bad = wire.Submit(os.urandom(16), "high", "", {"argv": "ls"}, 0, bytes(32), b"")
            ack = await c.ep.request(shard_addr, bad, timeout=5)
            rows = await c.status("shard")
            return done, ack, rows[0]

    done, ack, row = asyncio.run(go())
    assert done["status"] == 0
    assert not ack.ok and ack.reason == "spec.argv: Expected `array`, got `str`"
    assert row["counts"]["rejected"] == 1
    shard_proc.send_signal(signal.SIGTERM)
    assert shard_proc.wait(timeout=10) == 0
    log = (cl.tmp / "shard0.log").read_text().splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z xxshard (DEBUG|INFO|WARNING) "
    assert log and all(re.match(stamp, line) for line in log), log
    assert any(re.search(r"DEBUG job [0-9a-f]{32} \(medium\) done on node0: exit status 0", x)
               for x in log), log  # fmt: skip
    assert any("rejected: spec.argv" in x for x in log), log
    assert "stopping on SIGTERM" in log[-1]

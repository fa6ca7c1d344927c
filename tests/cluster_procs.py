"""Shards and synthetic dispatchers as real processes, and what the cluster tests check.

Shared by the host lane (``tests/host/test_cluster.py``: every process on loopback, loss
injected in the transport with XX_WIRE_DROP) and the network lab
(``tests/host/test_cluster_netns.py``, ``tests/vm/test_cluster_net.py``: every process
in its own network namespace behind a veth, loss from netem).

Each dispatcher runs the synthetic executor with ``--record``: it appends every job id it
*executes* to its own file, so "ran exactly once" is counted across processes, not
taken from anyone's word.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xxnode import wire
from xxnode.cluster_client import ClusterClient

CLASSES = ("high", "medium", "low")


@dataclass(frozen=True)
class Loopback:
    """Where a process runs when there is no lab: this namespace, 127.0.0.1."""

    ip: str = "127.0.0.1"

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(argv, **kw)


LOOPBACK = Loopback()


@dataclass
class Proc:
    p: subprocess.Popen
    addr: wire.Addr
    record: Path | None = None  # a node's executions file


class Cluster:
    """``n_shards`` shard and ``n_nodes`` dispatcher processes.

    ``where(role, i)`` says where process ``i`` of ``role`` ("shard" | "node") runs: an
    object with ``ip`` (the address it binds) and ``popen(argv, **kw)`` -- loopback by
    default, a ``tests.netlab.Host`` in the lab. ``drop`` is XX_WIRE_DROP for every
    process. Processes of one role start together; a cluster that fails to start
    leaves no process behind."""

    def __init__(
        self,
        tmp_path: Path,
        n_shards: int,
        n_nodes: int,
        drop: float = 0.0,
        where: Callable[[str, int], object] | None = None,
        start_timeout: float = 60.0,
    ):
        self.tmp = Path(tmp_path)
        self.key_file = self.tmp / "cluster.key"
        self.key_file.write_text(os.urandom(32).hex())
        self.key = wire.load_key(self.key_file)
        self.procs: list[subprocess.Popen] = []
        self.drop = drop
        self.where = where or (lambda role, i: LOOPBACK)
        self.start_timeout = start_timeout
        try:
            self.shard_procs = self._start_all("shard", n_shards)
            self.shard_addrs = [s.addr for s in self.shard_procs]
            self.node_procs = self._start_all("node", n_nodes)
        except BaseException:
            self.stop()
            raise
        # the shapes the loopback tests index: (proc, addr) and (proc, addr, record)
        self.shards = [(s.p, s.addr) for s in self.shard_procs]
        self.nodes = [(n.p, n.addr, n.record) for n in self.node_procs]

    def _env(self, seed: int) -> dict:
        env = dict(os.environ)
        if self.drop:
            env["XX_WIRE_DROP"] = f"{self.drop}:{seed}"
        return env

    def _argv(self, role: str, i: int, ip: str) -> tuple[list[str], Path | None]:
        if role == "shard":
            argv = ["-m", "xxnode.shard.main", "--listen", f"{ip}:0"]
            argv += ["--key-file", str(self.key_file)]
            return argv, None
        rec = self.tmp / f"node{i}.ran"
        argv = ["-m", "xxnode.dispatch", "--listen", f"{ip}:0"]
        argv += ["--shards", ",".join(wire.fmt_addr(a) for a in self.shard_addrs)]
        argv += ["--key-file", str(self.key_file), "--node-id", f"node{i}"]
        argv += ["--record", str(rec), "--heartbeat", "0.2"]
        return argv, rec

    def _start_all(self, role: str, n: int) -> list[Proc]:
        started = []
        for i in range(n):
            host = self.where(role, i)
            argv, rec = self._argv(role, i, host.ip)
            p = host.popen(
                [sys.executable, *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=self._env((100 if role == "shard" else 200) + i),
            )
            self.procs.append(p)
            started.append((p, rec))
        return [Proc(p, self._listening(p), rec) for p, rec in started]

    def _listening(self, p: subprocess.Popen) -> wire.Addr:
        """The address from the process's first line ("... listening on HOST:PORT")."""
        ready, _, _ = select.select([p.stdout], [], [], self.start_timeout)
        if not ready:
            raise AssertionError(f"{p.args} printed nothing in {self.start_timeout} s")
        line = p.stdout.readline()
        if "listening on" not in line:
            p.kill()
            raise AssertionError(f"{p.args}: {line!r} {p.stderr.read()}")
        return wire.parse_addr(line.split()[-1])

    def executions(self) -> collections.Counter:
        c: collections.Counter = collections.Counter()
        for _, _, rec in self.nodes:
            if rec.exists():
                c.update(rec.read_text().split())
        return c

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdout.close()
            p.stderr.close()


async def wait_registered(client: ClusterClient, n_nodes: int, timeout: float = 10.0):
    """Until every shard hears every node (the dispatchers' HELLO) -- an event, polled."""
    deadline = time.monotonic() + timeout
    rows: list[dict] = []
    while time.monotonic() < deadline:
        rows = await client.status("nodes")
        if all(len(r.get("nodes", [])) == n_nodes for r in rows):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"nodes did not register: {rows}")


def jobs(n: int, rng: random.Random):
    """Mixed load: low-class 'hogs' (longer), short high/medium requests."""
    for i in range(n):
        cls = rng.choice(CLASSES)
        yield i, cls, {"sleep": 0.02 if cls == "low" else 0.0}


def assert_exactly_once(cluster: Cluster, results: dict[bytes, dict], ids: list[bytes]):
    """Every job has a result; none ran twice; each one reported done ran exactly once
    (by the executors' own records). NODE_LOST is the declared policy for a started job
    on a dead node: reported, not retried."""
    ran = cluster.executions()
    assert len(results) == len(ids)
    twice = [j for j, n in ran.items() if n > 1]
    assert twice == [], f"{len(twice)} jobs ran more than once"
    assert not set(ran) - {j.hex() for j in ids}, "a job nobody submitted ran"
    for jid in ids:
        r = results[jid]
        if r["status"] == wire.NODE_LOST:
            continue
        assert r["status"] == 0, r
        assert ran[jid.hex()] == 1, f"job {jid.hex()} reported done but ran {ran[jid.hex()]}x"


async def submit_all(client, n, seed=1, window=100, timeout=60.0):
    """Submit n jobs with at most ``window`` outstanding; returns ids and results."""
    rng = random.Random(seed)
    ids: list[bytes] = []
    results: dict[bytes, dict] = {}
    sem = asyncio.Semaphore(window)

    async def one(cls, spec):
        async with sem:
            jid = await client.submit(cls, spec)
            ids.append(jid)
            results[jid] = await client.result(jid, timeout=timeout)

    await asyncio.gather(*(one(cls, spec) for _, cls, spec in jobs(n, rng)))
    return ids, results


async def wait_shards_done(client: ClusterClient, n: int, timeout: float = 10.0) -> list[dict]:
    """Until the shards together count n DONEs (a node tells the shard and the client
    concurrently, so the client can know first); returns the last status rows."""
    deadline = time.monotonic() + timeout
    rows = await client.status("shard")
    while time.monotonic() < deadline:
        if sum(r.get("counts", {}).get("done", 0) for r in rows) >= n:
            break
        await asyncio.sleep(0.05)
        rows = await client.status("shard")
    return rows

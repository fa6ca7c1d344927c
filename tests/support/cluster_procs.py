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
import contextlib
import os
import random
import select
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from xxnode import wire
from xxnode.cluster.client import ClusterClient

CLASSES = ("high", "medium", "low")


@dataclass(frozen=True)
class Loopback:
    """Where a process runs when there is no lab: this namespace, 127.0.0.1."""

    ip: str = "127.0.0.1"

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(argv, **kw)

    def entered(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


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
    default, a ``tests.support.netlab.Host`` in the lab. ``drop`` is XX_WIRE_DROP for every
    process. ``shard_port`` (when each shard has an address of its own) fixes the shards'
    port, so shards and nodes all start at once; otherwise shards get port 0 and the
    nodes start once the shards said where they listen. A cluster that fails to start
    leaves no process behind."""

    def __init__(
        self,
        tmp_path: Path,
        n_shards: int,
        n_nodes: int,
        drop: float = 0.0,
        where: Callable[[str, int], object] | None = None,
        start_timeout: float = 60.0,
        shard_port: int = 0,
        shard_state: bool = False,
        shard_args: tuple[str, ...] = (),
    ):
        self.tmp = Path(tmp_path)
        self.key_file = self.tmp / "cluster.key"
        self.key_file.write_text(os.urandom(32).hex())
        self.key = wire.load_key(self.key_file)
        self.procs: list[subprocess.Popen] = []
        self.drop = drop
        self.where = where or (lambda role, i: LOOPBACK)
        self.start_timeout = start_timeout
        self.shard_state = shard_state  # each shard journals to tmp/shardI.state
        self.shard_args = list(shard_args)  # more xxshard options (e.g. --log-level debug)
        try:
            if shard_port:  # addresses known up front: every process starts at once
                self.shard_addrs = [
                    (self.where("shard", i).ip, shard_port) for i in range(n_shards)
                ]
                shards = self._spawn_all("shard", n_shards, shard_port)
                nodes = self._spawn_all("node", n_nodes)
                self.shard_procs = self._await_listening(shards)
                self.node_procs = self._await_listening(nodes)
                assert [s.addr for s in self.shard_procs] == self.shard_addrs
            else:  # the nodes need the ports the shards were given
                self.shard_procs = self._await_listening(self._spawn_all("shard", n_shards))
                self.shard_addrs = [s.addr for s in self.shard_procs]
                self.node_procs = self._await_listening(self._spawn_all("node", n_nodes))
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

    def _argv(self, role: str, i: int, ip: str, port: int) -> tuple[list[str], Path | None]:
        if role == "shard":
            argv = ["-m", "xxnode.shard.main", "--listen", f"{ip}:{port}"]
            argv += ["--key-file", str(self.key_file)]
            if self.shard_state:
                argv += ["--state-dir", str(self.tmp / f"shard{i}.state")]
            return argv + self.shard_args, None
        rec = self.tmp / f"node{i}.ran"
        argv = ["-m", "xxnode.cluster.synthetic", "--listen", f"{ip}:0"]
        argv += ["--shards", ",".join(wire.fmt_addr(a) for a in self.shard_addrs)]
        argv += ["--key-file", str(self.key_file), "--node-id", f"node{i}"]
        argv += ["--record", str(rec), "--heartbeat", "0.2"]
        return argv, rec

    def _spawn_all(self, role: str, n: int, port: int = 0) -> list[tuple]:
        return [self._spawn(role, i, port) for i in range(n)]

    def _spawn(self, role: str, i: int, port: int = 0) -> tuple:
        host = self.where(role, i)
        argv, rec = self._argv(role, i, host.ip, port)
        # its log goes to a file (a shard writes a line per job: a pipe nobody reads fills)
        log = open(self.tmp / f"{role}{i}.log", "ab")  # noqa: SIM115 -- closed in stop()
        p = host.popen(
            [sys.executable, *argv],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=self._env((100 if role == "shard" else 200) + i),
        )
        p.log = log
        self.procs.append(p)
        return p, rec

    def restart_shard(self, i: int) -> None:
        """Start shard ``i`` again where it was (same address, same state dir)."""
        p, _ = self._spawn("shard", i, self.shard_addrs[i][1])
        assert self._listening(p) == self.shard_addrs[i]
        self.shards[i] = (p, self.shard_addrs[i])

    def _await_listening(self, started: list[tuple]) -> list[Proc]:
        return [Proc(p, self._listening(p), rec) for p, rec in started]

    def _listening(self, p: subprocess.Popen) -> wire.Addr:
        """The address from the process's first line ("... listening on HOST:PORT")."""
        ready, _, _ = select.select([p.stdout], [], [], self.start_timeout)
        if not ready:
            raise AssertionError(f"{p.args} printed nothing in {self.start_timeout} s")
        line = p.stdout.readline()
        if "listening on" not in line:
            p.kill()
            raise AssertionError(f"{p.args}: {line!r} {Path(p.log.name).read_text()}")
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
            p.log.close()


@contextlib.asynccontextmanager
async def client_at(cluster: Cluster, host=LOOPBACK, **kw) -> AsyncIterator[ClusterClient]:
    """A ClusterClient for ``cluster`` whose socket lives on ``host`` (in the lab: in that
    host's namespace, bound to its address -- the nodes CLAIM back to what the shard saw)."""
    c = ClusterClient(cluster.shard_addrs, cluster.key, **kw)
    with host.entered():
        await c.start((host.ip, 0))
    try:
        yield c
    finally:
        await c.close()


async def wait_idle_listed(client: ClusterClient, node_ids: list[str], timeout: float = 30.0):
    """Until each of ``node_ids`` is on some shard's idle list (where a burst of jobs is
    placed: a node not listed then gets none of it, by design) -- polled."""
    deadline = time.monotonic() + timeout
    listed: set[str] = set()
    while time.monotonic() < deadline:
        rows = await client.status("idle")
        listed = {e["node"] for r in rows for e in r.get("idle", [])}
        if set(node_ids) <= listed:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not idle-listed in {timeout} s: {sorted(set(node_ids) - listed)}")


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


async def submit_all(client, n, seed=1, window=100, timeout=60.0, results=None):
    """Submit n jobs with at most ``window`` outstanding; returns ids and results.
    ``results``, if given, fills as each job ends (a caller can watch the run's progress)."""
    rng = random.Random(seed)
    ids: list[bytes] = []
    results = {} if results is None else results
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


async def submit_and_kill_node(
    client: ClusterClient,
    cluster: Cluster,
    n_jobs: int,
    seed: int,
    victim: int = 0,
    started: int = 3,
    timeout: float = 60.0,
) -> tuple[list[bytes], dict[bytes, dict]]:
    """Submit ``n_jobs`` jobs of 0.5 s at once; kill -9 node ``victim`` as soon as it has
    started ``started`` of them (so some are running); return ids and results."""
    proc, _, rec = cluster.nodes[victim]
    rng = random.Random(seed)
    specs = [(rng.choice(CLASSES), {"sleep": 0.5}) for _ in range(n_jobs)]
    submitting = asyncio.gather(*(client.submit(cls, spec) for cls, spec in specs))
    deadline = time.monotonic() + timeout
    while not (rec.exists() and rec.read_text().count("\n") >= started):
        if time.monotonic() > deadline:
            raise AssertionError(f"node{victim} started fewer than {started} jobs in {timeout} s")
        await asyncio.sleep(0.01)  # an executor's file: no event to wait on
    proc.kill()  # SIGKILL; its jobs sleep 0.5 s: some are running
    ids = await submitting
    done = await asyncio.gather(*(client.result(j, timeout) for j in ids))
    return ids, dict(zip(ids, done, strict=True))


def assert_node_loss_accounted(
    cluster: Cluster, results: dict[bytes, dict], ids: list[bytes], victim: int = 0
) -> list[bytes]:
    """After kill -9 of node ``victim``: its started jobs are reported NODE_LOST (declared
    policy), the others were placed again; none ran twice, every job accounted for.
    Returns the lost ones."""
    assert_exactly_once(cluster, results, ids)
    name = f"node{victim}"
    lost = [j for j, r in results.items() if r["status"] == wire.NODE_LOST]
    started_on_victim = set(cluster.nodes[victim][2].read_text().split())
    assert lost, "the killed node was running jobs"
    assert all(results[j]["node"] == name for j in lost)
    others: collections.Counter = collections.Counter()
    for i, (_, _, rec) in enumerate(cluster.nodes):
        if i != victim and rec.exists():
            others.update(rec.read_text().split())
    # a lost job was granted to the victim (it may have died before recording it) and
    # ran nowhere else; whatever the victim started is either lost or finished there
    assert not {j.hex() for j in lost} & set(others)
    by_hex = {j.hex(): r for j, r in results.items()}
    assert all(
        by_hex[h]["status"] == wire.NODE_LOST or by_hex[h]["node"] == name
        for h in started_on_victim
    )
    done = [r for r in results.values() if r["status"] == 0]
    assert len(done) + len(lost) == len(ids)
    return lost

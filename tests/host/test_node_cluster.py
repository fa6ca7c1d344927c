"""xxnode with [cluster]: a job submitted to a shard runs on the node as a local job would —
in its class's cgroup, at its class's SCHED_FIFO priority — and the node is listed."""

import asyncio
import os
import subprocess
import sys

import pytest

from tests.support.harness import Daemon
from xxnode import wire
from xxnode.cluster.client import ClusterClient

# The job reports where the kernel put it and what it gave it.
REPORT = ["/bin/sh", "-c", "cat /proc/self/cgroup; cat /proc/self/sched | grep -E '^policy|^prio'"]


@pytest.fixture
def cluster(tmp_path):
    kf = tmp_path / "cluster.key"
    kf.write_text(os.urandom(32).hex())
    shard = subprocess.Popen(
        [sys.executable, "-m", "xxnode.shard.main", "--listen", "127.0.0.1:0",
         "--key-file", str(kf)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = shard.stdout.readline()
    assert "listening on" in line, line
    addr = line.split()[-1]
    node = Daemon(
        tmp_path / "node",
        extra=f'[cluster]\nshards = ["{addr}"]\nkey_file = "{kf}"\nlisten = "127.0.0.1:0"\n'
        f'node_id = "n1"\n',
    )
    node.start()
    yield node, [wire.parse_addr(addr)], wire.load_key(kf)
    node.cleanup()
    shard.kill()
    shard.wait()
    shard.stdout.close()


async def _submit(shards, key, cls):
    async with ClusterClient(shards, key) as c:
        for _ in range(200):  # the node's first heartbeat reaches the shard
            rows = await c.status("nodes")
            if any(r.get("nodes") for r in rows):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the node never registered with the shard")
        return await c.run(cls, {"argv": REPORT, "timeout": 30}, timeout=60)


def test_a_placed_job_runs_in_its_class_cgroup_at_its_class_priority(cluster):
    node, shards, key = cluster
    res = asyncio.run(_submit(shards, key, "high"))
    assert res["status"] == 0, res
    out = res["stdout"]
    assert f"/{node.name}/high/" in out  # the node's own cgroup tree, class high
    assert "policy" in out and " 1\n" in out.split("policy")[1].split("prio")[0]  # SCHED_FIFO
    jobs = node.call({"op": "jobs"})["jobs"]
    assert any(j["class"] == "high" and j["state"] == "succeeded" for j in jobs)


def test_bad_cluster_config_names_the_key(tmp_path):
    bad = Daemon(tmp_path / "bad", extra='[cluster]\nshards = ["nowhere"]\nkey_file = "/x"\n')
    r = subprocess.run(
        [sys.executable, "-m", "xxnode.node.main", "--config", str(bad.config), "--check"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2
    assert "cluster.shards[0]" in r.stderr
    assert "Traceback" not in r.stderr

"""xxnode with [cluster]: a job submitted to a shard runs on the node as a local job would —
in its class's cgroup, at its class's SCHED_FIFO priority — and the node is listed."""

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.harness import Daemon
from xxnode import wire
from xxnode.cluster.client import ClusterClient

OUTPUT_LIMIT = 4 << 20
XXCTL = str(Path(sys.executable).with_name("xxctl"))

# The job reports where the kernel put it and what it gave it.
REPORT = ["/bin/sh", "-c", "cat /proc/self/cgroup; cat /proc/self/sched | grep -E '^policy|^prio'"]


@pytest.fixture
def lone_shard(tmp_path):
    """One xxshard with no node joined (yet): its address and the cluster key file."""
    kf = tmp_path / "cluster.key"
    kf.write_text(os.urandom(32).hex())
    shard = subprocess.Popen(
        [sys.executable, "-m", "xxnode.shard.main", "--listen", "127.0.0.1:0",
         "--key-file", str(kf)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = shard.stdout.readline()
        assert "listening on" in line, line
        yield line.split()[-1], kf
    finally:
        shard.kill()
        shard.wait()
        shard.stdout.close()


@pytest.fixture
def cluster(tmp_path, lone_shard):
    addr, kf = lone_shard
    node = Daemon(
        tmp_path / "node",
        extra=f"output_limit = {OUTPUT_LIMIT}\n"
        f'[cluster]\nshards = ["{addr}"]\nkey_file = "{kf}"\nlisten = "127.0.0.1:0"\n'
        f'node_id = "n1"\n',
    )
    node.start()
    yield node, [wire.parse_addr(addr)], wire.load_key(kf), addr, kf
    node.cleanup()


def _ctl(addr, kf, *argv):
    return subprocess.run(
        [XXCTL, *argv[:1], "--shard", addr, "--key-file", str(kf), *argv[1:]],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _until(pred, what: str, timeout: float = 30.0):
    """Poll ``pred`` (a detached job has no event to wait on) until it returns a value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (v := pred()) is not None:
            return v
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout} s")


async def _submit(shards, key, cls, argv):
    async with ClusterClient(shards, key) as c:
        for _ in range(200):  # the node's first heartbeat reaches the shard
            rows = await c.status("nodes")
            if any(r.get("nodes") for r in rows):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the node never registered with the shard")
        return await c.run(cls, {"argv": argv, "timeout": 30}, timeout=60)


def test_a_placed_job_runs_in_its_class_cgroup_at_its_class_priority(cluster):
    node, shards, key, _, _ = cluster
    res = asyncio.run(_submit(shards, key, "high", REPORT))
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


def test_both_streams_come_back_whole_past_a_datagram(cluster):
    """3 MB of stdout and a line of stderr: more than a DONE datagram holds, so the
    submitter pulls them from the node by digest, byte for byte."""
    node, shards, key, _, _ = cluster
    argv = ["/bin/sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x; echo oops >&2"]
    res = asyncio.run(_submit(shards, key, "low", argv))
    assert res["status"] == 0, {k: v for k, v in res.items() if k not in ("stdout",)}
    assert res["stdout"] == "x" * 3_000_000
    assert res["stderr"] == "oops\n"
    assert not res.get("stdout_dropped") and not res.get("stderr_dropped")


def test_submit_wait_says_what_the_node_cut(cluster):
    node, _, _, addr, kf = cluster
    asyncio.run(_submit(*cluster[1:3], "low", ["true"]))  # the node has registered
    r = subprocess.run(
        [XXCTL, "submit", "--wait", "--shard", addr, "--key-file", str(kf), "--class", "low",
         "--", "/bin/sh", "-c", "head -c 5000000 /dev/zero; echo oops >&2"],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == OUTPUT_LIMIT
    dropped = f"{5_000_000 - OUTPUT_LIMIT:,}".replace(",", " ")
    assert f"stdout: {dropped} bytes dropped".encode() in r.stderr, r.stderr
    assert r.stderr.startswith(b"oops\n")


def test_submit_wait_with_no_node_says_why_and_honours_its_timeout(lone_shard):
    """A shard with no node joined: `submit --wait` says nothing can take the job, then
    gives up at --wait-timeout with exit 124, and the job is not started by anyone later
    (its arbiter is gone) -- nor is it left counted as running."""
    addr, kf = lone_shard
    t0 = time.monotonic()
    r = _ctl(addr, kf, "submit", "--wait", "--wait-timeout", "3", "--class", "high", "--", "true")
    took = time.monotonic() - t0
    assert r.returncode == 124, r
    assert "no node has joined that shard, so nothing can take it" in r.stderr
    assert "gave up after 3 s" in r.stderr and "will not start now" in r.stderr
    assert 3 <= took < 20


def test_wait_timeout_without_wait_is_a_usage_error(tmp_path):
    kf = tmp_path / "k"
    kf.write_text(os.urandom(32).hex())
    r = subprocess.run(
        [XXCTL, "submit", "--wait-timeout", "3", "--shard", "127.0.0.1:9", "--key-file", str(kf),
         "--class", "high", "--", "true"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2 and "--wait-timeout needs --wait" in r.stderr


def test_xxctl_job_shows_a_job_the_node_refused_after_placement(cluster):
    """A command the node does not have passes the first hop (it may exist elsewhere) and
    is refused on the node: `xxctl job ID` names the node and the node's reason."""
    _, _, _, addr, kf = cluster
    r = _ctl(addr, kf, "submit", "--class", "medium", "--", "/no/such/command")
    assert r.returncode == 0, r.stderr
    jid = r.stdout.strip()

    def done():
        j = json.loads(_ctl(addr, kf, "job", jid, "--json").stdout)
        return j if j["state"] == "done" else None

    info = _until(done, "the job did not end")
    assert info["node"] == "n1" and info["status"] == wire.FAILED_START
    shown = _ctl(addr, kf, "job", jid)
    text = shown.stdout
    assert shown.returncode == 0 and f"job {jid}: done on n1" in text, shown
    assert "/no/such/command" in text and "could not start" in text, shown


def test_xxctl_cancel_kills_a_running_cluster_job_and_its_submitter_hears(cluster):
    node, shards, key, addr, kf = cluster

    async def go():
        async with ClusterClient(shards, key) as c:
            jid = await c.submit("low", {"argv": ["sleep", "60"]})

            def running():
                j = json.loads(_ctl(addr, kf, "job", jid.hex(), "--json").stdout)
                return j if j.get("on_node", {}).get("local_state") == "running" else None

            info = await asyncio.to_thread(_until, running, "the job did not start")
            cancel = await asyncio.to_thread(_ctl, addr, kf, "cancel", jid.hex())
            res = await c.result(jid, timeout=30)
            return jid, info, cancel, res

    jid, info, cancel, res = asyncio.run(go())
    assert info["state"] == "placed" and info["node"] == "n1"
    assert cancel.returncode == 0 and "killed on n1" in cancel.stdout, cancel
    assert res["state"] == "killed" and res["reason"].startswith("cancelled: xxctl cancel")
    assert _ctl(addr, kf, "cancel", jid.hex()).returncode == 1  # already finished


def test_a_job_cancelled_while_queued_ends_cancelled_and_nothing_runs(lone_shard):
    """No node joined: the job waits at the shard; cancelled, its waiting submitter gets
    CANCELLED at once, and the shard remembers how it ended."""
    addr, kf = lone_shard

    async def go():
        async with ClusterClient([wire.parse_addr(addr)], wire.load_key(kf)) as c:
            jid = await c.submit("high", {"argv": ["true"]})
            queued = await c.job(jid)
            r = await c.cancel(jid, "test")
            return jid, queued, r, await c.result(jid, timeout=10)

    jid, queued, r, res = asyncio.run(go())
    after = json.loads(_ctl(addr, kf, "job", jid.hex(), "--json").stdout)
    assert queued["state"] == "queued" and queued["class"] == "high" and queued["node"] is None
    assert r == {"ok": True, "state": "cancelled while queued"}
    assert res["status"] == wire.CANCELLED and "cancelled: test" in res["error"]
    assert after["state"] == "done" and after["status"] == wire.CANCELLED

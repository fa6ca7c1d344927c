"""Idle function environments under real memory pressure: they go to zswap/swap first, a
running high-class job loses nothing, and a swapped environment answers its next invocation
correctly — on a kernel with the memory controller, swap and zswap (the VM lane)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.support.harness import Daemon
from tests.vm.test_functions import until
from xxnode.kernel import meminfo
from xxnode.kernel.cgroup import Cgroup

MiB = 1 << 20
HOLD = """
import hashlib
DATA = None
DIGEST = None

def handler(event, context):
    global DATA, DIGEST
    if DATA is None:
        DATA = bytes(range(256)) * (event["mib"] * 4096)  # compressible, like a heap
        DIGEST = hashlib.sha256(DATA).hexdigest()
    return {"intact": hashlib.sha256(DATA).hexdigest() == DIGEST, "mib": len(DATA) >> 20}
"""
# the high job: fills its memory, holds it until the test has seen the node act, then reads
# every byte back and says if it is intact
HIGH = """
import os, sys, time
data = b"\\x01" * ({mib} << 20)
open(sys.argv[1], "w").close()
while not os.path.exists(sys.argv[2]):  # bounded by the job's timeout
    time.sleep(0.05)
print("intact" if data.count(1) == len(data) else "bad")
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("fnmem"), max_running=4)
    d.start()
    yield d
    d.cleanup()


def invoke(node, code, cls, payload, n):
    req = {
        "op": "fn_run", "code": str(code), "runtime": "python3.11", "handler": "app.handler",
        "class": cls, "payload": base64.b64encode(json.dumps(payload).encode()).decode(),
        "env": {"N": str(n)}, "timeout": 120, "name": f"hold{n}",
    }  # fmt: skip
    with node.client(timeout=600) as c:
        return c.call(req)["result"]


def test_idle_environments_swap_first_and_come_back_intact(node, tmp_path):
    code = tmp_path / "hold"
    code.mkdir()
    (code / "app.py").write_text(HOLD)
    total = meminfo.meminfo()["MemTotal"]
    per_env = max(64, int(total * 0.07) // MiB)
    first = [invoke(node, code, "low", {"mib": per_env}, n) for n in range(5)]
    assert all(r["error"] is None and r["response"]["intact"] for r in first), first
    envs = {r["report"]["env"] for r in first}
    assert len(envs) == 5

    # an environment is frozen once its runtime is back in /next after answering, a moment
    # after the answer has reached us: nothing announces it, so the node is asked again
    def states():
        return {e["env"]: e["state"] for e in node.call({"op": "fn_envs"})["envs"]}

    until("the idle environments frozen", lambda: all(states()[e] == "frozen" for e in envs))

    # a high-class job that takes what is free down to below the node's low watermark (5 % of
    # RAM): the node must reclaim back to its target (10 %), and only from the idle
    avail = meminfo.meminfo()["MemAvailable"]
    need = (avail - int(total * 0.03)) // MiB
    gates = Path(tempfile.mkdtemp(prefix="xxgates-", dir="/run"))  # jobs run as nobody
    os.chmod(gates, 0o777)
    filled, release = gates / "filled", gates / "release"
    out: dict = {}
    argv = ["python3", "-c", HIGH.format(mib=need), str(filled), str(release)]
    t = threading.Thread(target=lambda: out.update(node.run("high", argv, timeout=600)))
    t.start()
    try:
        deadline = time.monotonic() + 200
        while True:  # the node's own counters say when it has acted: poll them
            mem = node.call({"op": "memory"})["memory"]
            if filled.exists() and mem["stats"]["reclaimed_by_class"].get("idle", 0) > 0:
                break
            assert time.monotonic() < deadline, ("no reclaim of idle environments", mem["stats"])
            assert t.is_alive(), out  # it holds its memory until released
            time.sleep(0.2)
    finally:
        release.touch()
        t.join(600)
        shutil.rmtree(gates, ignore_errors=True)
    res = out
    print(f"high job: {need} MiB of {avail // MiB} MiB available ({total // MiB} MiB RAM)")
    assert res["result"]["state"] == "succeeded", (res["result"], res.get("stderr"))
    assert res["stdout"].strip() == "intact"
    assert res["result"].get("oom_kills", 0) in (0, None)

    mem = node.call({"op": "memory"})["memory"]
    reclaimed = mem["stats"]["reclaimed_by_class"]
    print("reclaimed by class (MiB):", {k: v // MiB for k, v in reclaimed.items()},
          "idle environments:", mem["idle_environments"],
          "evictions:", mem["stats"]["idle_evictions"])  # fmt: skip
    assert reclaimed.get("idle", 0) > 0, reclaimed  # idle environments gave first
    assert reclaimed.get("high", 0) == 0
    swapped = {}
    for e in envs:
        cg = Cgroup(node.cgroup.path / "_envs" / e)
        if cg.exists():
            swapped[e] = (cg.read_int("memory.swap.current") or 0) + (
                cg.read_int("memory.zswap.current") or 0 if cg.has("memory.zswap.current") else 0
            )
    print("swap+zswap by environment (MiB):", {k: v // MiB for k, v in swapped.items()})
    assert sum(swapped.values()) > 0
    listed = {e["env"]: e["state"] for e in node.call({"op": "fn_envs"})["envs"]}
    assert any(listed.get(e) == "swapped" for e in envs), listed

    # every surviving environment answers correctly, warm; a killed one comes back cold
    t0 = time.monotonic()
    again = [invoke(node, code, "low", {"mib": per_env}, n) for n in range(5)]
    print(f"5 resumes in {time.monotonic() - t0:.1f} s:",
          [(r["report"]["cold"], r["report"]["duration_ms"]) for r in again])  # fmt: skip
    assert all(r["error"] is None and r["response"]["intact"] for r in again), again
    survivors = [r for r in again if r["report"]["env"] in swapped]
    assert survivors and all(r["report"]["cold"] is False for r in survivors)

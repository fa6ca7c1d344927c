"""An invocation's path when a part of it dies: gateway -> shard -> node -> environment.
Each death ends in the result or a clear error, never a hang past the function's timeout
plus the gateway's margin. The daemons are `xxctl up`'s, driven from here so one can be
killed with SIGKILL."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
import zipfile

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from xxnode.ctl.gate_cmds import _Up

SLOW = """
import time

def handler(event, context):
    time.sleep(event.get("sleep", 0))
    return {"slept": event.get("sleep", 0)}
"""
MARGIN = 5.0  # the gateway's default


@pytest.fixture
def up(tmp_path):
    u = _Up(tmp_path / "state", 0)
    url, creds = u.start()
    kv = dict(line.split(" = ") for line in creds.read_text().splitlines() if " = " in line)
    client = boto3.client(
        "lambda", endpoint_url=url, region_name="us-east-1",
        aws_access_key_id=kv["aws_access_key_id"], aws_secret_access_key=kv["aws_secret_access_key"],
        config=Config(retries={"total_max_attempts": 1}, read_timeout=300),
    )  # fmt: skip
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("app.py", SLOW)
    client.create_function(FunctionName="slow", Runtime="python3.11", Handler="app.handler",
                           Role="arn:aws:iam::123456789012:role/x", Timeout=20,
                           Code={"ZipFile": buf.getvalue()})  # fmt: skip
    client.invoke(FunctionName="slow", Payload=b"{}")  # warm: the code is on the node
    try:
        yield u, client
    finally:
        u.stop()


def proc(u: _Up, name: str):
    return next(p for n, p in u.procs if n == name)


def running(u: _Up) -> bool:
    """The node says when the handler has the event (its control socket: no event for it)."""
    from xxnode.node.client import Client

    with Client(str(u.state / "xxnode.sock")) as c:
        return any(e["state"] == "running" for e in c.call({"op": "fn_envs"})["envs"])


def invoke_in_thread(client, event: dict) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def go():
        t0 = time.monotonic()
        try:
            r = client.invoke(FunctionName="slow", Payload=json.dumps(event).encode())
            out["payload"] = json.loads(r["Payload"].read())
        except ClientError as e:
            out["error"] = e.response["Error"]
        out["s"] = time.monotonic() - t0

    t = threading.Thread(target=go)
    t.start()
    return t, out


def until(pred, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_shard_killed_mid_invocation_does_not_lose_the_result(up):
    u, client = up
    t, out = invoke_in_thread(client, {"sleep": 2})
    until(lambda: running(u), "the handler to have the event")
    os.kill(proc(u, "xxshard").pid, signal.SIGKILL)  # the node answers the gateway directly
    t.join(60)
    assert out.get("payload") == {"slept": 2}, out


def test_a_node_killed_mid_invocation_is_a_clear_error_within_timeout_and_margin(up):
    u, client = up
    t, out = invoke_in_thread(client, {"sleep": 15})
    until(lambda: running(u), "the handler to have the event")
    os.kill(proc(u, "xxnode").pid, signal.SIGKILL)
    t.join(20 + MARGIN + 30)
    assert not t.is_alive()
    assert out.get("error", {}).get("Code") == "ServiceException", out
    assert out["s"] < 20 + MARGIN + 5, out  # never past the function's timeout plus the margin


def event_ran(u: _Up, client, name: str) -> tuple[object, int]:
    """Send an Event; return (its record once finished, how many times the node ran it)."""
    from xxnode.ledger.store import open_store
    from xxnode.node.client import Client

    ev = client.invoke(FunctionName="slow", InvocationType="Event", Payload=b'{"sleep": 3}')
    rid = ev["ResponseMetadata"]["RequestId"]
    until(lambda: running(u), "the handler to have the event")
    os.kill(proc(u, name).pid, signal.SIGKILL)  # `up` starts it again, on its state dir
    deadline = time.monotonic() + 120
    with open_store(f"sqlite:///{u.state / 'gateway.db'}") as s:
        while (inv := s.get_invocation(rid)).status not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, inv
            time.sleep(0.2)
    with Client(str(u.state / "xxnode.sock")) as c:
        logs = c.call({"op": "fn_logs", "ref": "slow"})["invocations"]
    slept = [r for r in logs if r["response"] == {"slept": 3}]
    return inv, len(slept)


def test_an_event_runs_once_across_kill_9_of_the_gateway_running_it(up):
    u, client = up
    inv, runs = event_ran(u, client, "xxgate")
    assert inv.status == "succeeded" and runs == 1, (inv, runs)
    assert inv.attempts == 2  # the restarted gateway claimed it again, and asked, not ran


def test_an_event_runs_once_across_kill_9_of_the_shard(up):
    u, client = up
    inv, runs = event_ran(u, client, "xxshard")
    assert inv.status == "succeeded" and runs == 1, (inv, runs)


def test_two_ups_on_one_machine_keep_to_their_own(up, tmp_path):
    u, client = up
    other = _Up(tmp_path / "other", 0)
    assert other.cgroup_root != u.cgroup_root
    assert other.functions["uid_first"] != u.functions["uid_first"]
    try:
        other.start()  # its node clears only its own earlier run
        r = client.invoke(FunctionName="slow", Payload=b"{}")
        assert json.loads(r["Payload"].read()) == {"slept": 0}
    finally:
        other.stop()  # and kills only its own cgroup tree
    r = client.invoke(FunctionName="slow", Payload=b"{}")
    assert json.loads(r["Payload"].read()) == {"slept": 0} and "FunctionError" not in r


def test_the_ledger_equals_what_the_node_metered_across_kill_9_of_each_part(up):
    """A stream of invocations while the gateway, then the shard, then the node is killed
    with SIGKILL (`up` starts each again on its state dir); afterwards every record the
    node metered is in the ledger once, as metered, and the ledger holds nothing else."""
    from tests.support.xx_up import node_metered
    from xxnode.ledger.store import open_store

    u, client = up
    stop = threading.Event()
    seen = {"ok": 0, "failed": 0}

    def stream():
        while not stop.is_set():
            try:
                kind = "Event" if seen["ok"] % 5 == 4 else "RequestResponse"
                client.invoke(FunctionName="slow", InvocationType=kind,
                              Payload=b'{"sleep": 0.05}')  # fmt: skip
                seen["ok"] += 1
            except Exception:  # a part is down: the stream goes on, as a client's would
                seen["failed"] += 1
                time.sleep(0.05)

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for name in ("xxgate", "xxshard", "xxnode"):
            before = seen["ok"]
            until(lambda b=before: seen["ok"] >= b + 10, f"invocations before killing {name}", 60)
            os.kill(proc(u, name).pid, signal.SIGKILL)
            after = seen["ok"]
            until(lambda a=after: seen["ok"] >= a + 10, f"invocations after {name} came back", 90)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    node = node_metered(u.state, timeout=120)
    with open_store(f"sqlite:///{u.state / 'gateway.db'}") as s:
        ledger = {x.id: x for x in s.usage_records()}
    assert seen["ok"] >= 60, seen
    assert len(node) >= seen["ok"] * 0.9, (len(node), seen)  # Events may still be running
    assert set(ledger) == set(node), set(ledger) ^ set(node)
    for i, rec in node.items():
        x = ledger[i]
        assert (x.cpu_s, x.gb_s, x.price_class, x.node) == (
            pytest.approx(rec["cpu_ms"] / 1000),
            pytest.approx(rec["gb_s"]),
            rec["class"],
            rec["node"],
        )
    print(f"\n{seen['ok']} invocations answered, {seen['failed']} failed while a part was down; "
          f"{len(node)} metered, {len(ledger)} in the ledger")  # fmt: skip

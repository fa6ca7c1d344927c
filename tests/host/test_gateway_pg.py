"""Two gateways sharing one PostgreSQL store, as behind a load balancer: what one creates the
other serves, and an Event accepted by one whose gateway is then killed is run by the other.
PostgreSQL is a real throwaway server (tests/support/postgres.py)."""

from __future__ import annotations

import io
import json
import os
import signal
import time
import zipfile

import boto3
import pytest
from botocore.config import Config

from tests.support.postgres import PostgresServer
from xxnode.ctl.gate_cmds import _free_port, _Up
from xxnode.ledger.store import open_store

APP = """
def handler(event, context):
    return {"n": event.get("n"), "via": context.function_name}
"""


@pytest.fixture(scope="module")
def pg():
    with PostgresServer() as server:
        yield server


def client(url: str, creds) -> object:
    kv = dict(line.split(" = ") for line in creds.read_text().splitlines() if " = " in line)
    return boto3.client(
        "lambda", endpoint_url=url, region_name="us-east-1",
        aws_access_key_id=kv["aws_access_key_id"], aws_secret_access_key=kv["aws_secret_access_key"],
        config=Config(retries={"total_max_attempts": 1}, read_timeout=120),
    )  # fmt: skip


def test_two_gateways_share_one_postgresql_store(pg, tmp_path):
    store = pg.create_database("gw_shared")
    u = _Up(tmp_path / "state", 0, store=store)
    try:
        url_a, creds = u.start()
        url_b = u.add_gateway(_free_port(), event_workers=0)  # B accepts events, runs none
        a, b = client(url_a, creds), client(url_b, creds)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("app.py", APP)
        a.create_function(FunctionName="shared", Runtime="python3.11", Handler="app.handler",
                          Role="arn:aws:iam::123456789012:role/x", Code={"ZipFile": buf.getvalue()},
                          Tags={"xx:class": "medium"})  # fmt: skip
        # created through A, listed and invoked through B (which serves the code to the node)
        assert [f["FunctionName"] for f in b.list_functions()["Functions"]] == ["shared"]
        r = b.invoke(FunctionName="shared", Payload=json.dumps({"n": 1}).encode())
        assert json.loads(r["Payload"].read()) == {"n": 1, "via": "shared"}
        # an Event accepted by B (durably: in the store before the 202), whose gateway then
        # dies: A, which never saw the request, runs it
        gate_b = [p for n, p in u.procs if n == "xxgate"][1]
        ev = b.invoke(FunctionName="shared", InvocationType="Event", Payload=b'{"n": 2}')
        os.kill(gate_b.pid, signal.SIGKILL)
        rid = ev["ResponseMetadata"]["RequestId"]
        deadline = time.monotonic() + 60
        with open_store(store) as s:
            while (inv := s.get_invocation(rid)).status not in ("succeeded", "failed"):
                assert time.monotonic() < deadline, inv
                time.sleep(0.1)
        assert inv.status == "succeeded", inv
    finally:
        u.stop()

"""Functions through the cluster: a shard places an invocation — a function reference and the
event's digest instead of an argv — and the node runs it in its warm pool exactly as
`xxctl fn run` does locally; responses up to 6 MiB come back whole, by digest."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import pytest

from tests.support.harness import Daemon
from xxnode import wire
from xxnode.cluster import code
from xxnode.cluster.client import ClusterClient

XXCTL = str(Path(sys.executable).with_name("xxctl"))

APP = """
import hashlib, os, time

def handler(event, context):
    if "size" in event:  # a big response: a string of `size` bytes
        return "x" * event["size"]
    if "sleep" in event:
        time.sleep(event["sleep"])
    blob = event.get("blob", "")
    return {
        "request_id": context.aws_request_id,
        "blob_len": len(blob),
        "blob_sha": hashlib.sha256(blob.encode()).hexdigest(),
        "policy": os.sched_getscheduler(0),
        "greeting": os.environ.get("GREETING"),
    }
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One xxshard and one xxnode joined to it: (node, shard address, key file, code dir)."""
    root = tmp_path_factory.mktemp("fncluster")
    kf = root / "cluster.key"
    kf.write_text(os.urandom(32).hex())
    shard = subprocess.Popen(
        [sys.executable, "-m", "xxnode.shard.main", "--listen", "127.0.0.1:0",
         "--key-file", str(kf)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    node = None
    try:
        line = shard.stdout.readline()
        assert "listening on" in line, line
        addr = line.split()[-1]
        node = Daemon(
            root / "node",
            extra=f'[cluster]\nshards = ["{addr}"]\nkey_file = "{kf}"\n'
            'listen = "127.0.0.1:0"\nnode_id = "fn1"\n',
        )
        node.start()
        code = root / "echo"
        code.mkdir()
        (code / "app.py").write_text(textwrap.dedent(APP))
        os.chmod(code / "app.py", 0o644)
        yield node, addr, kf, code
    finally:
        if node is not None:
            node.cleanup()
        shard.kill()
        shard.wait()
        shard.stdout.close()


def fn_run(cluster, cls: str, payload: dict | str, *extra: str, code: Path | None = None):
    node, addr, kf, default_code = cluster
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return subprocess.run(
        [XXCTL, "fn", "run", "--cluster", "--shard", addr, "--key-file", str(kf), "--json",
         "--code", str(code or default_code), "--runtime", "python3.11",
         "--handler", "app.handler", "--class", cls, "--payload", text, *extra],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def ok(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, (r.returncode, r.stderr)
    return json.loads(r.stdout)


def test_an_invocation_placed_by_a_shard_runs_warm_at_its_class_with_the_same_report(cluster):
    node = cluster[0]
    first = ok(fn_run(cluster, "high", {}, "--env", "GREETING=hi", "--name", "echo"))
    assert set(first) == {"response", "error", "report"}
    assert first["error"] is None
    assert first["response"]["greeting"] == "hi"
    assert first["response"]["policy"] == os.SCHED_FIFO
    rep = first["report"]
    assert rep["class"] == "high" and rep["cold"] is True and rep["function"] == "echo"
    assert first["response"]["request_id"] == rep["request_id"]
    # the same function at another class: the same warm environment, switched to low
    low = ok(fn_run(cluster, "low", {}, "--env", "GREETING=hi", "--name", "echo"))
    assert low["report"]["env"] == rep["env"] and low["report"]["cold"] is False
    assert low["report"]["class"] == "low" and low["response"]["policy"] == os.SCHED_BATCH
    # the node ran them in its pool, as it does a local `xxctl fn run`
    stats = node.call({"op": "status"})["status"]["functions"]
    assert stats["invocations"] >= 2


def test_a_big_event_goes_by_digest_and_a_6_mib_response_comes_back_whole(cluster):
    blob = "e" * (512 << 10)  # far past what rides inline in a PLACE
    event = cluster[3].parent / "event.json"
    event.write_text(json.dumps({"blob": blob}))
    r = ok(fn_run(cluster, "medium", f"@{event}"))
    assert r["response"]["blob_len"] == len(blob)
    assert r["response"]["blob_sha"] == hashlib.sha256(blob.encode()).hexdigest()
    size = 6 * (1 << 20) - 64  # as JSON, with its quotes: just under Lambda's 6 MiB
    big = ok(fn_run(cluster, "medium", {"size": size}))
    assert big["error"] is None
    assert big["response"] == "x" * size
    # past it: the function's error, through the cluster as locally
    over = fn_run(cluster, "medium", {"size": 7 * (1 << 20)})
    assert over.returncode == 1, over.stderr
    err = json.loads(over.stdout)["error"]
    assert err["errorType"] == "Function.ResponseSizeTooLarge", err


def test_a_function_the_node_cannot_run_is_refused_with_its_reason(cluster, tmp_path):
    r = fn_run(cluster, "low", {}, code=tmp_path / "nowhere")
    assert r.returncode == 2
    assert "no such file or directory" in r.stderr and "Traceback" not in r.stderr
    r = fn_run(cluster, "no-such-class", {})
    assert r.returncode == 2 and "no-such-class" in r.stderr, r.stderr
    r = fn_run(cluster, "low", "not json")
    assert r.returncode == 2 and "must be JSON" in r.stderr


def test_an_invocation_cut_by_a_node_restart_is_reported_failed_and_not_run_again(cluster):
    node, addr, kf, code = cluster
    proc = subprocess.Popen(
        [XXCTL, "fn", "run", "--cluster", "--shard", addr, "--key-file", str(kf),
         "--code", str(code), "--runtime", "python3.11", "--handler", "app.handler",
         "--class", "low", "--payload", '{"sleep": 60}', "--timeout", "90", "--name", "slow"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not any(  # the node says when the handler has it: poll it
            e["function"] == "slow" and e["state"] == "running"
            for e in node.call({"op": "fn_envs"})["envs"]
        ):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        node.crash()
        node.start()
        out, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 2, (out, err)
    assert "restarted during the invocation" in err, err
    assert node.call({"op": "status"})["status"]["functions"]["invocations"] == 0  # not rerun
    assert not [e for e in node.call({"op": "fn_envs"})["envs"] if e["function"] == "slow"]


class _Store:
    """The code store's side of cluster/code.py, served from this test: what it was asked
    for, with which token. (The gateway's store speaks the same: GET /xx/code/DIGEST.)"""

    def __init__(self, key: bytes, blobs: dict[str, bytes]):
        self.key, self.blobs, self.asked = key, blobs, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                digest = self.path.removeprefix(code.PATH)
                outer.asked.append(digest)
                if not code.token_ok(outer.key, digest, self.headers.get(code.HEADER)):
                    self.send_error(403)
                elif digest not in outer.blobs:
                    self.send_error(404)
                else:
                    body = outer.blobs[digest]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def _zip(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(name, textwrap.dedent(text))
    return buf.getvalue()


async def _invoke_by_digest(addr, kf, fn: dict, n: int = 1) -> list[dict]:
    async with ClusterClient([wire.parse_addr(addr)], wire.load_key(kf)) as c:
        spec = {"function": fn, "timeout": 30}
        return await asyncio.gather(*(c.run("low", spec, b"{}", timeout=120) for _ in range(n)))


def test_code_by_digest_is_pulled_once_from_the_store_and_checked(cluster):
    node, addr, kf, _ = cluster
    key = wire.load_key(kf)
    good = _zip({"app.py": "def handler(e, c):\n    return 'from the store'\n"})
    digest = "sha256:" + hashlib.sha256(good).hexdigest()
    liar = "sha256:" + hashlib.sha256(b"what it claims").hexdigest()
    store = _Store(key, {digest: good, liar: good})
    try:
        fn = {"digest": digest, "code_url": store.url, "runtime": "python3.11",
              "handler": "app.handler", "name": "stored"}  # fmt: skip
        results = asyncio.run(_invoke_by_digest(addr, kf, fn, n=3))
        for r in results:
            assert r["status"] == 0, r
            assert json.loads(r["response"]) == "from the store"
        assert store.asked == [digest]  # three invocations at once, one pull
        # the node now has it: no more pulls
        asyncio.run(_invoke_by_digest(addr, kf, fn))
        assert store.asked == [digest]
        # a store whose bytes do not match the digest is refused, and nothing runs
        (bad,) = asyncio.run(_invoke_by_digest(addr, kf, {**fn, "digest": liar}))
        assert bad["status"] == wire.FAILED_START and "do not match the digest" in bad["error"]
        # code the store does not have: its answer, named
        missing = "sha256:" + "0" * 64
        (gone,) = asyncio.run(_invoke_by_digest(addr, kf, {**fn, "digest": missing}))
        assert "HTTP 404" in gone["error"], gone
        # and without the cluster key, nothing comes from the store
        with pytest.raises(code.FetchError, match="HTTP 403"):
            code.fetch(store.url, digest, b"not the cluster key", 1 << 20)
    finally:
        store.close()

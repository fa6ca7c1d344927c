"""Metrics and logs as an operator meets them: `xxctl up --metrics` (a real gateway, shard and
node, each serving /metrics), scraped by a real Prometheus server (Debian's), queried through
its HTTP API; and a daemon's log records on the wire in the journal's native format."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.poll import until
from tests.support.xx_up import ROLE, XXCTL, Up, zipped
from xxnode import logs, metrics

PROMETHEUS = "/usr/bin/prometheus"
N = {"high": 30, "low": 10}
JOBS = {"xxgate": 0, "xxshard": 1, "xxnode": 2}  # offsets from the --metrics port

APP = """
def handler(event, context):
    if event.get("fail"):
        raise ValueError("asked to fail")
    return {"n": event.get("n")}
"""


def free_ports(n: int) -> int:
    """A port p with p .. p+n-1 all free now (the daemons bind them right after)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65536:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError(f"no {n} consecutive free ports")


def get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def samples(text: str) -> dict[str, list]:
    """{sample name: [(labels, value), ...]}, parsed by prometheus_client's own parser."""
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    base = free_ports(3)
    u = Up(tmp_path_factory.mktemp("up") / "state", ("--metrics", f"127.0.0.1:{base}")).start()
    u.metrics_base = base
    yield u
    assert u.stop() == 0
    out = subprocess.run(["pgrep", "-f", str(u.state)], capture_output=True, text=True)
    assert out.stdout == "", "xxctl up left processes behind"


@pytest.fixture(scope="module")
def prometheus(up, tmp_path_factory):
    """A real Prometheus scraping the three daemons every second, on a port of its own."""
    if not Path(PROMETHEUS).exists():
        pytest.fail(f"{PROMETHEUS} missing: tools/setup installs Debian's prometheus")
    d = tmp_path_factory.mktemp("prometheus")
    scrape = [
        {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{up.metrics_base + off}"]}]}
        for job, off in JOBS.items()
    ]
    cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
           "scrape_configs": scrape}  # fmt: skip
    (d / "prometheus.yml").write_text(json.dumps(cfg))  # JSON is YAML
    port = free_ports(1)
    log = open(d / "prometheus.log", "wb")  # noqa: SIM115 -- closed below
    p = subprocess.Popen(
        [PROMETHEUS, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}", p, d / "prometheus.log"
    finally:
        p.kill()
        p.wait()
        log.close()
        shutil.rmtree(d / "data", ignore_errors=True)


def api(base: str, path: str, **params) -> dict:
    doc = json.loads(get(f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"))
    assert doc["status"] == "success", doc
    return doc["data"]


def test_prometheus_scrapes_all_three_and_answers_the_high_class_p99(up, prometheus):
    base, proc, plog = prometheus
    # Prometheus announces nothing, so its API is asked again (each scrape, each second, is
    # the event waited for)

    def targets_up():
        assert proc.poll() is None, plog.read_text()[-3000:]
        try:
            active = api(base, "targets")["activeTargets"]
        except urllib.error.URLError:  # not listening yet
            return None
        health = {t["labels"]["job"]: t["health"] for t in active}
        return health if health == dict.fromkeys(JOBS, "up") else None

    until(targets_up, 60)

    lam = up.client()
    for cls in N:
        lam.create_function(FunctionName=f"fn-{cls}", Role=ROLE, Runtime="python3.11",
                            Handler="app.handler", Code={"ZipFile": zipped({"app.py": APP})},
                            Tags={"xx:class": cls})  # fmt: skip
    slowest = 0.0
    for i in range(max(N.values())):
        for cls, n in N.items():
            if i < n:
                t0 = time.monotonic()
                r = lam.invoke(FunctionName=f"fn-{cls}", Payload=json.dumps({"n": i}).encode())
                slowest = max(slowest, time.monotonic() - t0) if cls == "high" else slowest
                assert r["StatusCode"] == 200 and json.loads(r["Payload"].read()) == {"n": i}

    # every daemon counted every invocation, each in its own stage
    def counted():
        rows = api(
            base, "query", query='sum by (stage, class) (xx_invocations_total{outcome="succeeded"})'
        )
        got = {
            (r["metric"]["stage"], r["metric"]["class"]): float(r["value"][1])
            for r in rows["result"]
        }
        want = {(s, c): float(n) for s in ("gateway", "shard", "node") for c, n in N.items()}
        return got if all(got.get(k) == v for k, v in want.items()) else None

    until(counted, 30)

    q = 'histogram_quantile(0.99, sum by (le) (rate(xx_latency_seconds_bucket{stage="gateway",class="high"}[1m])))'

    seen = []

    def p99():
        res = api(base, "query", query=q)["result"]
        seen[:] = [res, api(base, "query", query=q.split("(", 1)[1].split(",", 1)[1][:-1])]
        v = float(res[0]["value"][1]) if res else math.nan
        return v if math.isfinite(v) else None

    try:
        value = until(p99, 30)
    except AssertionError:
        raise AssertionError(f"no finite p99: {seen}") from None
    # the gateway's p99 lies inside the bucket holding the slowest round trip boto3 saw
    bound = min(b for b in metrics.BUCKETS if b >= slowest)
    assert 0 < value <= bound, (value, slowest)
    print(
        f"high p99 at the gateway: {value * 1e3:.1f} ms (slowest round trip {slowest * 1e3:.1f} ms)"
    )

    # queue time measured where invocations wait: shard (until a node's ACCEPT) and node
    rows = api(base, "query", query='sum by (stage) (xx_queue_seconds_count{class="high"})')
    assert {r["metric"]["stage"]: float(r["value"][1]) for r in rows["result"]} == {
        "shard": N["high"], "node": N["high"],
    }  # fmt: skip
    # the scrape-time state: budgets, environments, PSI, memory counters, queues
    for query in ('xx_budget_state{state="normal"} == 1', "xx_environments",
                  'xx_psi_stall_seconds_total{resource="memory",kind="some"}',
                  'xx_reclaimed_bytes_total{class="low"}', 'xx_swapin_bytes_total{class="high"}',
                  'xx_queued{stage="shard",class="high"}', 'xx_running{stage="node"}',
                  'xx_wire_events_total{job="xxshard"}'):  # fmt: skip
        assert api(base, "query", query=query)["result"], query
    envs = api(base, "query", query="sum(xx_environments)")["result"]
    assert float(envs[0]["value"][1]) >= 2  # a warm environment per function
    # every panel of the Grafana dashboard is PromQL this Prometheus accepts, and answers
    dash = json.loads((Path(__file__).parents[2] / "ops/grafana/xx-dashboard.json").read_text())
    empty = []
    for panel in dash["panels"]:
        for t in panel["targets"]:
            expr = t["expr"].replace("$__rate_interval", "1m")
            if not api(base, "query", query=expr)["result"]:  # api() asserts it parsed
                empty.append(panel["title"])
    # nothing was dropped, throttled or reclaimed here: those panels may be empty, no other
    assert set(empty) <= {"Wire drops by reason", "Budget state by tenant"} | {
        "Memory manager events",
        "Reclaimed and swapped in, by class",
        "Queued by class",
    }, empty


def test_each_daemon_serves_its_metrics_and_only_there(up):
    r = up.client().invoke(FunctionName="fn-low", Payload=b'{"fail": true}')
    assert r["FunctionError"] == "Unhandled"
    # the cluster job is the RequestId the caller got: what every daemon logs as the invocation
    rid = r["ResponseMetadata"]["RequestId"]
    shard = re.search(r'shards = \["([^"]+)"\]', (up.state / "node.toml").read_text())[1]
    out = subprocess.run(
        [XXCTL, "job", "--shard", shard, "--key-file", str(up.state / "cluster.key"), "--json",
         uuid.UUID(rid).hex], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["state"] == "done", out.stdout
    got = {job: samples(get(f"http://127.0.0.1:{up.metrics_base + off}/metrics"))
           for job, off in JOBS.items()}  # fmt: skip
    assert "xx_budget_state" in got["xxgate"] and "xx_budget_state" not in got["xxnode"]
    assert "xx_shard_nodes" in got["xxshard"]
    assert (
        "xx_memory_events_total" in got["xxnode"] and "process_cpu_seconds_total" in got["xxnode"]
    )
    stages = {job: {lab["stage"] for lab, _ in s.get("xx_latency_seconds_count", [])}
              for job, s in got.items()}  # fmt: skip
    assert stages == {"xxgate": {"gateway"}, "xxshard": {"shard"}, "xxnode": {"node"}}
    failed = {job: sum(v for lab, v in s["xx_invocations_total"]
                       if lab["class"] == "low" and lab["outcome"] != "succeeded")
              for job, s in got.items()}  # fmt: skip
    assert failed == {"xxgate": 1, "xxshard": 1, "xxnode": 1}  # the shard sees exit status 1
    # a failure is logged at info, by the gateway with its RequestId as the invocation
    gate_log = (up.state / "xxgate.log").read_text()
    assert "invoke fn-low:$LATEST (low) for" in gate_log and ": error in" in gate_log
    node_log = (up.state / "xxnode.log").read_text()
    assert "of fn-low (low) failed in" in node_log, node_log[-2000:]
    # the public API port has no /metrics: it wants a signature there, as on any Lambda route
    with pytest.raises(urllib.error.HTTPError) as e:
        get(f"{up.endpoint}/metrics")
    assert e.value.code == 403 and b"xx_" not in e.value.read()


# -- the journal's native protocol, on the wire -----------------------------------------------
def parse_native(data: bytes) -> dict[str, str]:
    """The receiving side of systemd's native protocol, written from its spec."""
    out, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, _, v = line.partition(b"=")
            out[k.decode()] = v.decode()
            i = nl + 1
        else:
            (n,) = struct.unpack_from("<Q", data, nl + 1)
            start = nl + 9
            out[line.decode()] = data[start : start + n].decode()
            assert data[start + n : start + n + 1] == b"\n"
            i = start + n + 1
    return out


def shard(tmp_path: Path, env: dict[str, str], *log_args: str) -> subprocess.Popen:
    """A real xxshard on a port of its own, logging as log_args say: the daemon whose log
    records these tests read (its first stdout line says when it listens)."""
    key = tmp_path / "key"
    key.write_text("ab" * 32)
    return subprocess.Popen(
        [sys.executable, "-m", "xxnode.shard.main", "--listen", "127.0.0.1:0", "--key-file",
         str(key), *log_args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )  # fmt: skip


def test_a_real_daemon_logs_native_journal_datagrams_with_its_fields(tmp_path):
    """xxshard with --log-target journal, its socket pointed at ours (XX_JOURNAL_SOCKET):
    every record a datagram in the native format, MESSAGE, PRIORITY, SYSLOG_IDENTIFIER."""
    path = str(tmp_path / "journal.sock")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    rx.settimeout(30)
    p = shard(tmp_path, {**os.environ, logs.ENV_SOCKET: path}, "--log-target", "journal")
    try:
        assert "listening on" in p.stdout.readline()
        first = parse_native(rx.recv(65536))
        assert first["SYSLOG_IDENTIFIER"] == "xxshard"
        assert first["PRIORITY"] == "4" and "state_dir" in first["MESSAGE"]  # the warning
        second = parse_native(rx.recv(65536))
        assert second["PRIORITY"] == "6" and second["MESSAGE"].startswith("classes: ")
    finally:
        p.terminate()
        p.wait(10)
        err = p.stderr.read()
        p.stdout.close()
        p.stderr.close()
        rx.close()
    assert err == "", err  # nothing fell back to stderr


def test_a_record_too_big_for_a_datagram_goes_in_a_sealed_memfd(tmp_path):
    path = str(tmp_path / "journal.sock")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    rx.settimeout(10)
    h = logs.JournalHandler("xxtest", path)
    try:
        rec = logging.LogRecord("xxnode", logging.ERROR, __file__, 1, "x" * 300_000, None, None)
        rec.xx = {"invocation": "abc", "class": "high"}
        h.emit(rec)
        msg, anc, _, _ = rx.recvmsg(1024, socket.CMSG_SPACE(4))
        assert msg == b"" and anc, "no fd came with the datagram"
        fd = struct.unpack("i", anc[0][2][:4])[0]
        try:
            data = os.pread(fd, 1 << 20, 0)
        finally:
            os.close(fd)
        fields = parse_native(data)
        assert fields["MESSAGE"] == "x" * 300_000 and fields["PRIORITY"] == "3"
        assert fields["XX_INVOCATION"] == "abc" and fields["XX_CLASS"] == "high"
    finally:
        h.close()
        rx.close()


def test_log_format_json_is_one_object_a_line_on_stderr(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    p = shard(tmp_path, env, "--log-format", "json")
    try:
        assert "listening on" in p.stdout.readline()
    finally:
        p.terminate()
        _, err = p.communicate(timeout=10)
    lines = [json.loads(line) for line in err.splitlines()]
    assert [d["msg"].split(":")[0] for d in lines[:2]] == ["no state_dir", "classes"]
    for d in lines:
        assert set(d) >= {"ts", "level", "prog", "logger", "msg"} and d["prog"] == "xxshard"
        assert d["ts"].endswith("Z") and d["level"] in ("info", "warning")

"""XX as an operator runs it: installed by `xxctl install` (vm/systemd-install), its three
units started by a real systemd, which is what restarts them. What an operator relies on:
each unit reports READY and a status; jobs and invocations run through the installed
daemons; a node daemon killed, stopped or hung loses none of its running jobs; the journal
finds an invocation's lines by its id. The tests run in file order and share the units."""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import subprocess
import tempfile
import textwrap
import time
import tomllib
import zipfile
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

UNITS = ("xxshard", "xxgate", "xxnode")
GATEWAY = "http://127.0.0.1:9000"
GATEWAY_DB = "sqlite:////var/lib/xxgate/gateway.db"
DROPIN = Path("/run/systemd/system/xxnode.service.d/zz-test-watchdog.conf")
ENV = {**os.environ, "XX_SHARDS": "127.0.0.1:7100"}
ADOPTED = r"recovered: (\d+) running job\(s\) adopted"  # the restarted xxnode's line
SHARD_DEAD_AFTER = 90.0  # s: longer than a node restart under TCG (see `started`)
SEEN: dict[str, str] = {}  # what one test leaves for a later one (the invocation id)


def sh(*argv: str, timeout: float = 300, check: bool = True) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=ENV)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r.stdout


def jobs_cgroup() -> str:
    """Where the installed node puts its jobs: node.toml's cgroup_root ("@self": its unit)."""
    root = tomllib.loads(Path("/etc/xx/node.toml").read_text())["node"]["cgroup_root"]
    return "system.slice/xxnode.service" if root == "@self" else root.strip("/")


def show(unit: str) -> dict[str, str]:
    props = "ActiveState,SubState,StatusText,NRestarts,MainPID,Result,Type,WatchdogUSec"
    out = sh("systemctl", "show", f"{unit}.service", "-p", props)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(unit: str) -> str:
    return sh("journalctl", "-b", "-u", f"{unit}.service", "--no-pager", "-o", "cat", check=False)


def logged_by(pid: str, pattern: str, timeout: float = 60) -> re.Match:
    """The first line of process ``pid`` in the journal that matches ``pattern`` (journald
    stores datagrams as it gets to them)."""
    deadline = time.monotonic() + timeout
    while True:
        out = sh("journalctl", "-b", f"_PID={pid}", "--no-pager", "-o", "cat")
        if m := re.search(pattern, out):
            return m
        assert time.monotonic() < deadline, f"pid {pid} never logged {pattern!r}:\n{out}"
        time.sleep(0.5)


def wait_unit(unit: str, done, what: str, timeout: float = 180) -> dict[str, str]:
    """Poll `systemctl show` until ``done(props)``: systemd announces unit changes only on
    D-Bus, which this minimal system does not run."""
    deadline = time.monotonic() + timeout
    while True:
        s = show(unit)
        if done(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"{unit}: {what} not within {timeout} s; now {s}\n{journal(unit)}")
        time.sleep(0.2)


def serving_again(before: dict[str, str]):
    """A predicate: the unit was restarted once more than ``before`` and runs a new main PID."""

    def done(s: dict[str, str]) -> bool:
        return (
            int(s["NRestarts"]) > int(before["NRestarts"])
            and s["ActiveState"] == "active"
            and s["SubState"] == "running"
            and s["MainPID"] not in ("0", before["MainPID"])
        )

    return done


def read_fifo(path: Path, timeout: float = 120) -> str:
    """What a job writes to the FIFO ``path`` once it runs (its writer's open is the event)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"no job wrote to {path} within {timeout} s"
        os.set_blocking(fd, True)  # the writer is there: read to its close
        data = b""
        while chunk := os.read(fd, 4096):
            data += chunk
        return data.decode()
    finally:
        os.close(fd)


class HeldJob:
    """A cluster job (`xxctl submit --wait`) that reports its PID, then waits for a release:
    whatever the test does to xxnode in between happens while the job surely runs."""

    def __init__(self, cls: str = "low"):
        self.dir = Path(tempfile.mkdtemp(prefix="xx-held-"))
        self.dir.chmod(0o755)  # jobs run as nobody
        for name in ("started", "release"):
            os.mkfifo(self.dir / name)
            (self.dir / name).chmod(0o666)
        script = f'echo $$ > {self.dir}/started; read x < {self.dir}/release; echo "survived $x"'
        self.proc = subprocess.Popen(
            ["xxctl", "submit", "--class", cls, "--wait", "--json", "--", "sh", "-c", script],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        )  # fmt: skip
        try:
            self.pid = int(read_fifo(self.dir / "started"))
        except BaseException:
            self.proc.kill()
            self.proc.communicate()
            raise

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def __enter__(self) -> HeldJob:
        return self

    def __exit__(self, *exc) -> None:
        """A failed test must not leave its job holding xxnode's cgroup for the next one."""
        if self.proc.poll() is None:
            fd = os.open(self.dir / "release", os.O_WRONLY | os.O_NONBLOCK) if self.alive() else -1
            if fd >= 0:
                os.write(fd, b"abandoned\n")
                os.close(fd)
            try:
                self.proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()

    def release(self) -> dict:
        with open(self.dir / "release", "w") as f:
            f.write("ok\n")
        out, err = self.proc.communicate(timeout=180)
        assert self.proc.returncode == 0, f"submit exit {self.proc.returncode}: {out}{err}"
        return json.loads(out)


@pytest.fixture(scope="module", autouse=True)
def started():
    """`systemctl start` of a Type=notify unit returns once the daemon said READY=1.

    One edit of the installed config first, as an operator would make it here: under TCG
    xxnode needs ~15 s to start (under 2 s on hardware), and a shard that calls a node dead
    after `dead_after` of silence (15 s in the shipped config) reports the node's started
    jobs lost (at most once) before the restarted daemon can report them. The restart
    tests need the shard to wait longer than that."""
    conf = Path("/etc/xx/shard.toml")
    text = conf.read_text()
    shipped = re.search(r"^dead_after = .*$", text, re.M)
    assert shipped, text  # the shipped config says how long, with its reason
    conf.write_text(text.replace(shipped.group(0), f"dead_after = {SHARD_DEAD_AFTER}", 1))
    sh("systemctl", "start", *(f"{u}.service" for u in UNITS))
    yield
    if DROPIN.exists():
        DROPIN.unlink()
        sh("systemctl", "daemon-reload")


def test_the_three_units_start_and_report_ready():
    status = {}
    for unit in UNITS:
        s = show(unit)
        assert s["Type"] == "notify", (unit, s)
        assert (s["ActiveState"], s["SubState"]) == ("active", "running"), (unit, s)
        assert s["WatchdogUSec"] not in ("0", "infinity"), (unit, s)
        status[unit] = s["StatusText"]
    assert status["xxshard"].startswith("listening on 127.0.0.1:7100"), status
    assert status["xxgate"].startswith("listening on http://127.0.0.1:9000"), status
    assert status["xxnode"], status
    assert "XX" in sh("systemctl", "status", "--no-pager", "xxnode.service", check=False)


def test_jobs_run_through_the_installed_node_and_shard():
    local = sh("xxctl", "run", "--class", "high", "--", "sh", "-c", "id -un; cat /proc/self/cgroup")
    user, cgroup = local.split()
    assert user == "nobody", local
    assert cgroup.startswith(f"0::/{jobs_cgroup()}/high/"), local
    res = json.loads(
        sh("xxctl", "submit", "--class", "medium", "--wait", "--json", "--", "echo", "hi")
    )
    assert res["stdout"] == "hi\n", res


APP = """
import os

def handler(event, context):
    if event.get("fail"):
        raise ValueError("asked to fail")
    return {"who": event.get("who"), "priority": os.sched_getparam(0).sched_priority}
"""


def test_boto3_invokes_a_function_through_the_installed_gateway():
    made = json.loads(sh("xxctl", "tenant", "create", "ops", "--store", GATEWAY_DB, "--json"))
    lam = boto3.client(
        "lambda", endpoint_url=GATEWAY, region_name="us-east-1",
        aws_access_key_id=made["access_key_id"], aws_secret_access_key=made["secret_access_key"],
        config=Config(retries={"max_attempts": 1}, read_timeout=180, connect_timeout=10),
    )  # fmt: skip
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("app.py", textwrap.dedent(APP))
    lam.create_function(
        FunctionName="hello", Role="arn:aws:iam::123456789012:role/r", Runtime="python3.11",
        Handler="app.handler", Code={"ZipFile": buf.getvalue()}, Tags={"xx:class": "high"},
    )  # fmt: skip
    r = lam.invoke(FunctionName="hello", Payload=b'{"who": "systemd"}')
    out = json.loads(r["Payload"].read())
    assert "FunctionError" not in r, out
    assert out["who"] == "systemd" and out["priority"] > 0, out
    # A failed invocation is what an operator looks up; success is logged only at debug.
    r = lam.invoke(FunctionName="hello", Payload=b'{"fail": true}')
    assert r.get("FunctionError") == "Unhandled", r
    SEEN["invocation"] = r["ResponseMetadata"]["RequestId"]


def test_the_journal_finds_an_invocations_lines_by_its_id():
    inv = SEEN.get("invocation")
    assert inv, "needs the invocation of the boto3 test"
    deadline = time.monotonic() + 60
    while True:  # journald stores datagrams as it gets to them
        out = sh("journalctl", "-b", "--no-pager", "-o", "json", f"XX_INVOCATION={inv}")
        lines = [json.loads(x) for x in out.splitlines()]
        if len({x.get("_SYSTEMD_UNIT") for x in lines}) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert lines, f"no journal line has XX_INVOCATION={inv}"
    assert {x["XX_INVOCATION"] for x in lines} == {inv}
    assert {x.get("XX_CLASS") for x in lines} == {"high"}, lines
    assert {x["XX_TENANT"] for x in lines if "XX_TENANT" in x} == {"ops"}, lines
    # one id across the daemons: the gateway's line and the node's
    units = {x.get("_SYSTEMD_UNIT") for x in lines}
    assert {"xxgate.service", "xxnode.service"} <= units, lines


@pytest.fixture
def node_up():
    """xxnode running as the test begins, whatever an earlier test left."""
    if show("xxnode")["ActiveState"] != "active":
        sh("systemctl", "reset-failed", "xxnode.service", check=False)
        sh("systemctl", "start", "xxnode.service")


def test_a_killed_node_daemon_is_restarted_and_readopts_its_running_job(node_up):
    with HeldJob() as job:
        before = show("xxnode")
        # --kill-who=main: the daemon alone, as a crash takes it
        sh("systemctl", "kill", "--kill-who=main", "-s", "KILL", "xxnode.service")
        after = wait_unit("xxnode", serving_again(before), "a restart after SIGKILL")
        assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1, after
        assert job.alive(), "the job died with its daemon"
        assert int(logged_by(after["MainPID"], ADOPTED)[1]) >= 1
        res = job.release()
        assert res["stdout"] == "survived ok\n", res


def test_stop_leaves_running_jobs_and_start_readopts_them(node_up):
    with HeldJob() as job:
        sh("systemctl", "stop", "xxnode.service")
        s = show("xxnode")
        assert s["ActiveState"] in ("inactive", "failed"), s
        assert job.alive(), "systemctl stop killed a running job"
        events = (Path("/sys/fs/cgroup") / jobs_cgroup() / "cgroup.events").read_text()
        assert "populated 1" in events, events
        sh("systemctl", "start", "xxnode.service")
        s = show("xxnode")
        assert s["ActiveState"] == "active", s
        assert int(logged_by(s["MainPID"], ADOPTED)[1]) >= 1
        res = job.release()
        assert res["stdout"] == "survived ok\n", res


def test_a_hung_daemon_is_restarted_by_the_watchdog(node_up):
    DROPIN.parent.mkdir(parents=True, exist_ok=True)
    DROPIN.write_text("[Service]\nWatchdogSec=4s\nTimeoutAbortSec=3s\n")
    sh("systemctl", "daemon-reload")
    sh("systemctl", "restart", "xxnode.service")  # the daemon reads $WATCHDOG_USEC at start
    before = show("xxnode")
    assert before["WatchdogUSec"] == "4s", before
    os.kill(int(before["MainPID"]), signal.SIGSTOP)  # the loop hangs, the pings stop
    wait_unit("xxnode", serving_again(before), "a watchdog restart of a stopped daemon")
    assert "Watchdog timeout" in sh(
        "journalctl", "-b", "-u", "xxnode.service", "--no-pager", "-o", "cat"
    ), "restarted, but not by the watchdog"

"""The three daemons speak sd_notify as systemd's Type=notify + WatchdogSec= expect: READY=1
once serving, WATCHDOG=1 from the event loop (none while the process is stopped, so
systemd would abort a hung one), STOPPING=1 on SIGTERM. A real AF_UNIX datagram socket
stands in for systemd's notify socket; the daemons are real processes."""

import os
import secrets
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support.harness import Daemon

WATCHDOG_USEC = 200_000  # a ping every 0.1 s


@pytest.fixture
def notify(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    s.bind(str(path))
    yield str(path), s
    s.close()


def _env(path: str) -> dict[str, str]:
    # no WATCHDOG_PID: systemd sets it to the main pid, which we do not know before exec
    return {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}


def _next(s: socket.socket, timeout: float) -> dict[str, str] | None:
    s.settimeout(timeout)
    try:
        data = s.recv(4096).decode()
    except TimeoutError:
        return None
    return dict(line.split("=", 1) for line in data.split("\n"))


def _until(s: socket.socket, key: str, timeout: float) -> dict[str, str]:
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        msg = _next(s, left)
        if msg is not None and key in msg:
            return msg
    raise AssertionError(f"no {key} within {timeout} s")


def _check_protocol(pid: int, s: socket.socket, start_timeout: float = 60) -> dict[str, str]:
    ready = _until(s, "READY", start_timeout)
    assert ready["READY"] == "1"
    t0 = time.monotonic()
    for _ in range(3):
        assert _until(s, "WATCHDOG", 2)["WATCHDOG"] == "1"
    assert time.monotonic() - t0 < 2, "pings every WATCHDOG_USEC/2"
    os.kill(pid, signal.SIGSTOP)  # a hung loop
    try:
        _next(s, 0.15)  # one already in flight may still arrive
        assert _next(s, 0.6) is None, "a stopped daemon must not ping"
    finally:
        os.kill(pid, signal.SIGCONT)
    assert _until(s, "WATCHDOG", 2)["WATCHDOG"] == "1"
    os.kill(pid, signal.SIGTERM)
    return _until(s, "STOPPING", 20) | ready


def _key(tmp_path) -> str:
    k = tmp_path / "cluster.key"
    k.write_text(secrets.token_hex(32))
    return str(k)


def _run(argv: list[str], env: dict[str, str], log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *argv], env={**os.environ, **env}, stdin=subprocess.DEVNULL,
        stdout=log, stderr=log,
    )  # fmt: skip


def _check_module(tmp_path, notify, argv: list[str], status: str) -> None:
    """`python -m argv` through the whole protocol, its READY=1 saying STATUS=status...,
    and a clean exit on the SIGTERM."""
    path, s = notify
    with open(tmp_path / "log", "wb") as log:
        p = _run(argv, _env(path), log)
    try:
        msg = _check_protocol(p.pid, s)
        assert msg["STATUS"].startswith(status)
        assert p.wait(20) == 0
    finally:
        p.kill()
        p.wait()


def test_xxshard_ready_watchdog_stopping(tmp_path, notify):
    argv = ["xxnode.shard.main", "--listen", "127.0.0.1:0", "--key-file", _key(tmp_path)]
    _check_module(tmp_path, notify, argv, "listening on 127.0.0.1:")


def test_xxgate_ready_watchdog_stopping(tmp_path, notify):
    argv = [
        "xxnode.gateway.main", "--listen", "127.0.0.1:0", "--public-url", "http://127.0.0.1:1",
        "--store", f"sqlite:///{tmp_path / 'g.db'}", "--shards", "127.0.0.1:9",
        "--key-file", _key(tmp_path),
    ]  # fmt: skip
    _check_module(tmp_path, notify, argv, "listening on http://127.0.0.1:")


def test_xxnode_ready_watchdog_stopping(tmp_path, notify):
    path, s = notify
    d = Daemon(tmp_path / "node")
    try:
        d.start(env=_env(path))
        _check_protocol(d.proc.pid, s)
        assert d.proc.wait(20) == 0
    finally:
        d.cleanup()

"""xxnode.sdnotify against a real AF_UNIX datagram socket standing in for systemd's
notify socket (the protocol's receiving end)."""

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from xxnode.sdnotify import Notifier, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    s.bind(str(path))
    s.settimeout(5)
    yield str(path), s
    s.close()


def test_ready_status_and_stopping_arrive_as_one_datagram_each(notify_socket):
    path, s = notify_socket
    n = Notifier(path, None)
    assert n.ready("listening on 127.0.0.1:7100")
    assert s.recv(4096) == b"READY=1\nSTATUS=listening on 127.0.0.1:7100"
    assert n.status("busy")
    assert s.recv(4096) == b"STATUS=busy"
    assert n.stopping()
    assert s.recv(4096) == b"STOPPING=1"
    assert n.sent == 3


def test_abstract_socket_names_start_with_at():
    name = f"xx-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        assert Notifier("@" + name, None).ready()
        assert s.recv(4096) == b"READY=1"


def test_from_environ_takes_the_variables_out_of_the_environment(notify_socket):
    path, _ = notify_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid()),
           "OTHER": "kept"}  # fmt: skip
    n = Notifier.from_environ(env)
    assert (n.address, n.interval) == (path, 2.0)
    assert env == {"OTHER": "kept"}  # the jobs a daemon starts cannot speak for it


@pytest.mark.parametrize(
    "env, expect",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "10000000"}, 5.0),  # no WATCHDOG_PID: ours
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "PID"}, 5.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}, None),  # someone else's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "ten"}, None),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_enabled_semantics(env, expect):
    pid = os.getpid()
    env = {k: (str(pid) if v == "PID" else v) for k, v in env.items()}
    assert watchdog_interval(env, pid) == expect


def test_outside_systemd_everything_is_a_no_op():
    n = Notifier.from_environ({})
    assert not n.enabled
    assert n.ready() is False
    assert n.stopping() is False

    async def go():
        return n.start_watchdog()

    assert asyncio.run(go()) is None


def test_a_vanished_socket_is_a_warning_not_an_error(tmp_path, caplog):
    n = Notifier(str(tmp_path / "gone"), None)
    assert n.ready() is False
    assert "sd_notify" in caplog.text


def test_pings_come_from_the_loop_and_stop_while_it_is_blocked(notify_socket):
    """WATCHDOG=1 every interval while the loop runs; none while a blocking call holds it
    (as systemd must see a hung loop), and again once it runs."""
    path, s = notify_socket
    s.settimeout(0.05)
    pings: list[float] = []
    done = threading.Event()

    def collect():
        while not done.is_set():
            try:
                if s.recv(64) == b"WATCHDOG=1":
                    pings.append(time.monotonic())
            except TimeoutError:
                pass

    t = threading.Thread(target=collect)
    t.start()
    n = Notifier(path, 0.02)
    block = {}

    async def daemon_loop():
        task = n.start_watchdog()
        assert task is not None
        await asyncio.sleep(0.2)
        block["start"] = time.monotonic()
        time.sleep(0.4)  # the hang: a blocking call on the loop's thread
        block["end"] = time.monotonic()
        await asyncio.sleep(0.2)
        task.cancel()

    try:
        asyncio.run(daemon_loop())
    finally:
        done.set()
        t.join()
    before = [p for p in pings if p < block["start"]]
    during = [p for p in pings if block["start"] + 0.01 < p < block["end"]]
    after = [p for p in pings if p > block["end"]]
    assert len(before) >= 5, pings
    assert during == [], "a blocked loop must not ping"
    assert len(after) >= 5, pings


@pytest.mark.parametrize("usec, on", [("1000000", "True"), ("", "False")])
def test_faulthandler_is_on_when_the_watchdog_is(notify_socket, usec, on):
    """systemd's watchdog kills with SIGABRT: the stacks must reach the journal then. In a
    fresh interpreter (pytest turns faulthandler on for itself)."""
    path, _ = notify_socket
    code = (
        "import faulthandler; from xxnode.sdnotify import Notifier; "
        f"Notifier.from_environ({{'NOTIFY_SOCKET': {path!r}, 'WATCHDOG_USEC': {usec!r}}}); "
        "print(faulthandler.is_enabled())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == on

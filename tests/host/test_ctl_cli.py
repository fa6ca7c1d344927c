"""The installed xxctl run as a real process: what an operator sees on a terminal or pipe."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

XXCTL = str(Path(sys.executable).with_name("xxctl"))


def _run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([XXCTL, *args], capture_output=True, text=True, **kw)


def test_version():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.startswith("xxctl ") and r.stdout.split()[1][0].isdigit()


def test_output_into_a_closed_pipe_is_quiet():
    r = subprocess.run(
        f"{XXCTL} --help | head -1", shell=True, capture_output=True, text=True, check=True
    )
    assert r.stdout.startswith("usage: xxctl") and r.stderr == ""


def test_writing_to_a_pipe_nobody_reads_is_quiet():
    r, w = os.pipe()
    os.close(r)  # every write by xxctl gets EPIPE, with no race against a reader
    try:
        p = subprocess.run([XXCTL, "--help"], stdout=w, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(w)
    assert p.stderr == "" and p.returncode in (0, 141)


def test_limit_below_one_is_a_usage_error():
    r = _run("jobs", "--limit", "-1")
    assert r.returncode == 2 and "must be at least 1" in r.stderr


def test_missing_key_names_the_path_and_the_option(tmp_path):
    env = {**os.environ, "XX_CLUSTER_KEY_FILE": str(tmp_path / "k")}
    r = _run("shards", "--shard", "127.0.0.1:1", env=env)
    assert r.returncode == 2
    assert f"no cluster key at {tmp_path / 'k'}; pass --key-file" in r.stderr
    assert "Errno" not in r.stderr


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)
def test_unprivileged_status_says_what_was_denied():
    d = Path(tempfile.mkdtemp(prefix="xxctl-", dir="/tmp"))  # pytest's tmp_path is 0700 above
    os.chmod(d, 0o711)
    path = d / "xxnode.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(str(path))
        srv.listen()
        os.chmod(path, 0o660)  # root:root, as the daemon's socket is to a non-member
        r = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", XXCTL, "status",
             "--socket", str(path)],
            capture_output=True,
            text=True,
        )  # fmt: skip
    finally:
        srv.close()
        shutil.rmtree(d)
    assert r.returncode == 1
    assert f"permission denied connecting to the xxnode socket {path}" in r.stderr
    assert "needs root or membership in the socket's group (group root)" in r.stderr
    assert "Errno" not in r.stderr

"""Run a throwaway xxnode (own config, state dir, socket and cgroup subtree) for tests and
benchmarks, and leave nothing behind: no cgroups, no processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from xxnode.kernel.cgroup import Cgroup, find_cgroup2_mount
from xxnode.kernel.cgroup_watch import PopulatedWatcher
from xxnode.node.client import Client

CLASSES = """
[[class]]
name = "high"
price = 2.0
priority = 30
[[class]]
name = "medium"
price = 1.5
priority = 20
[[class]]
name = "low"
price = 0.5
policy = "{low_policy}"
{low_priority}
"""


class Daemon:
    """xxnode as a child process. `start()` returns once its socket is up (--ready-fd)."""

    def __init__(
        self,
        workdir: Path | None = None,
        max_running: int = 4,
        extra: str = "",
        low_policy: str = "batch",
        classes: str | None = None,
    ):
        self.own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="xxnode-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = f"xxtest-{uuid.uuid4().hex[:10]}"
        mount = find_cgroup2_mount()
        assert mount is not None, "no cgroup2 mount"
        self.cgroup = Cgroup(mount / self.name)
        self.state_dir = self.workdir / "state"
        self.socket = self.workdir / "xxnode.sock"
        self.log_path = self.workdir / "xxnode.log"
        if classes is None:
            classes = CLASSES.format(
                low_policy=low_policy,
                low_priority="priority = 10" if low_policy == "fifo" else "",
            )
        self.config = self.workdir / "xx.toml"
        self.config.write_text(
            f"""[node]
state_dir = "{self.state_dir}"
socket = "{self.socket}"
cgroup_root = "{self.name}"
max_running = {max_running}
{extra}
{classes}"""
        )
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float | None = None, env: dict[str, str] | None = None) -> Daemon:
        # the VM lane imports Python over 9p under TCG: startup there takes tens of seconds
        if timeout is None:
            timeout = float(os.environ.get("XX_DAEMON_START_TIMEOUT", "180"))
        rd, wr = os.pipe()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xxnode.node.main",
                "--config",
                str(self.config),
                "--ready-fd",
                str(wr),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(wr,),
            env=None if env is None else {**os.environ, **env},
        )
        log.close()
        os.close(wr)
        try:
            import select

            ready, _, _ = select.select([rd], [], [], timeout)
            data = os.read(rd, 64) if ready else b""
        finally:
            os.close(rd)
        if not data.startswith(b"READY"):
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"xxnode did not start:\n{self.log()}")
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def client(self, timeout: float | None = 30.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def call(self, req: dict) -> dict:
        with self.client() as c:
            return c.call(req)

    def run(self, cls: str, argv: list[str], **kw) -> dict:
        """Submit and wait; returns the finished message (result, stdout, stderr)."""
        with self.client(timeout=None) as c:
            c.call({"op": "run", "class": cls, "argv": argv, "wait": True, **kw})
            return c.recv()

    def submit(self, cls: str, argv: list[str], **kw) -> str:
        return self.call({"op": "run", "class": cls, "argv": argv, **kw})["job"]

    def wait(self, jid: str) -> dict:
        with self.client(timeout=None) as c:
            c.send({"op": "wait", "job": jid})
            return c.recv()

    def env(self) -> dict[str, str]:
        return {**os.environ, "XX_NODE_SOCKET": str(self.socket)}

    def crash(self) -> None:
        """kill -9: jobs and shims keep running."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self) -> None:
        """Stop the daemon, kill every job and shim in its subtree, remove the subtree."""
        self.stop()
        if self.cgroup.exists():
            self.cgroup.kill()
            w = PopulatedWatcher()
            try:
                w.wait(self.cgroup, 10)
            finally:
                w.close()
            self.cgroup.remove_tree()
        if self.own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


def shared_dir(prefix: str = "xxtest-") -> Path:
    """A directory jobs (running as nobody) can read and write: /dev/shm, world-writable."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/dev/shm"))
    os.chmod(d, 0o777)
    return d

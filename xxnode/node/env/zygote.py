"""The zygote: a pre-initialised Python runtime (interpreter + awslambdaric imported) that
forks each new environment's first process, as Android's zygote and the SOCK paper do.

Why: exec'ing `python -m awslambdaric` costs ~50 ms before the handler's first import; a
fork of a process that has already paid for it costs about a millisecond, and the pages it
preloaded stay shared between every environment (copy-on-write; gc.freeze keeps the
collector from touching them). `provided` and `http` runtimes, and python when the zygote is
off, go through the same fork and sandbox and then exec their program.

The zygote runs as root (the sandbox needs it) and single-threaded (so a fork is safe). It
speaks to the daemon over a SOCK_SEQPACKET socketpair, one JSON message per packet:

    daemon → zygote  {"spawn": ID, "plan": {...sandbox.Plan}, "env": {...}, "mode":
                     "python"|"exec", "handler": H, "argv": [...]}  + the output pipe (SCM_RIGHTS)
    zygote → daemon  {"ready": PID} once; {"spawned": ID, "pid": N} | {"failed": ID,
                     "error": TEXT} per spawn; {"exit": ID, "status": WAIT_STATUS} per death

A failed sandbox step is reported through a close-on-exec pipe before the child could run
anything of the function's, so `failed` names the step and nothing ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

log = logging.getLogger("xxnode")
MAX_MESSAGE = 1 << 20


class SpawnFailed(Exception):
    """Nothing of the environment runs; the message says which step failed."""


# -- the zygote process ---------------------------------------------------------------------
def _preload() -> None:
    """What every python environment would import before its handler."""
    import http.client  # noqa: F401  (awslambdaric imports it lazily, on the first request)
    import json as _json  # noqa: F401
    import logging as _logging  # noqa: F401

    import awslambdaric.__main__  # noqa: F401
    import awslambdaric.bootstrap  # noqa: F401

    from xxnode.node.env import sandbox  # noqa: F401


def _child(req: dict, out_fd: int, status_w: int, close: list[int]) -> None:
    """In the forked child: never returns."""
    code = 127
    try:
        for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
            signal.signal(s, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        for fd in close:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(null)
        os.close(out_fd)
        os.setsid()
        from xxnode.node.env import sandbox

        try:
            sandbox.enter(sandbox.Plan.from_dict(req["plan"]))
        except sandbox.SandboxError as e:
            os.write(status_w, str(e).encode()[:4000])
            os._exit(127)
        env = req["env"]
        if req["mode"] == "exec":
            argv = req["argv"]
            try:
                os.execvpe(argv[0], argv, env)  # a bare name is looked up in the env's PATH
            except OSError as e:
                os.write(status_w, f"exec {argv[0]}: {e.strerror}".encode())
                os._exit(127)
        os.close(status_w)
        os.environ.clear()
        os.environ.update(env)
        sys.path.insert(0, "/var/task")
        sys.argv = ["awslambdaric", req["handler"]]
        gc.unfreeze()
        from awslambdaric.__main__ import main as ric_main

        try:
            ric_main(sys.argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _spawn(sock: socket.socket, req: dict, out_fd: int, keep: list[int]) -> int | None:
    from xxnode.kernel import clone3

    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    cg = req["plan"]["cgroup"]
    try:
        cg_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        for fd in (status_r, status_w, out_fd):
            os.close(fd)
        _send(sock, {"failed": req["spawn"], "error": f"cgroup {cg}: {e.strerror}"})
        return None
    try:
        pid = clone3.fork_into_cgroup(cg_fd)  # born in its cgroup: no migration to wait for
    except OSError:
        pid = os.fork()  # a kernel without CLONE_INTO_CGROUP: the child moves itself
        req["plan"]["join_cgroup"] = True
    if pid == 0:
        os.close(status_r)
        _child(req, out_fd, status_w, [sock.fileno(), cg_fd, *keep])
    os.close(cg_fd)
    os.close(status_w)
    os.close(out_fd)
    err = b""
    while chunk := os.read(status_r, 4096):
        err += chunk
    os.close(status_r)
    if err:
        _send(sock, {"failed": req["spawn"], "error": err.decode("utf-8", "replace")})
    else:
        _send(sock, {"spawned": req["spawn"], "pid": pid})
    return pid


def _send(sock: socket.socket, msg: dict) -> None:
    sock.send(json.dumps(msg).encode())


def zygote_main(fd: int, runtime_api: str) -> None:
    sock = socket.socket(fileno=fd)
    # awslambdaric's C++ client reads the address once, when it is imported (here): every
    # environment shares the one listener, so the zygote can import it for them all
    os.environ["AWS_LAMBDA_RUNTIME_API"] = runtime_api
    _preload()
    gc.collect()
    gc.freeze()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    children: dict[int, str] = {}
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    _send(sock, {"ready": os.getpid()})
    while True:
        for key, _ in sel.select():
            if key.fileobj is sock:
                try:
                    msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 4)
                except ConnectionResetError:
                    msg, fds = b"", []
                if not msg:
                    return  # the daemon is gone: its environments die with its cgroup tree
                req = json.loads(msg)
                if len(fds) != 1:
                    for f in fds:
                        os.close(f)
                    _send(sock, {"failed": req.get("spawn"), "error": "no output pipe"})
                    continue
                pid = _spawn(sock, req, fds[0], [wake_r, wake_w])
                if pid:
                    children[pid] = req["spawn"]
            else:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            eid = children.pop(pid, None)
            if eid is not None:
                _send(sock, {"exit": eid, "status": status})


# -- the daemon's side -----------------------------------------------------------------------
class Zygote:
    """The daemon's handle on its zygote: spawn() environments, hear of their deaths."""

    def __init__(self, on_exit: Callable[[str, int], None], runtime_api: str, cgroup=None):
        self.on_exit = on_exit
        self.runtime_api = runtime_api
        self.cgroup = cgroup  # where the zygote itself lives (never billed to a tenant)
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.pending: dict[str, asyncio.Future] = {}
        self.ready: asyncio.Future | None = None
        self.next_id = 0

    async def start(self, timeout: float = 30.0) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        loop = asyncio.get_running_loop()
        self.ready = loop.create_future()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xxnode.node.env.zygote",
                str(theirs.fileno()),
                self.runtime_api,
            ],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        if self.cgroup is not None:
            self.cgroup.attach(self.proc.pid)
        ours.setblocking(False)
        self.sock = ours
        loop.add_reader(ours, self._readable)
        await asyncio.wait_for(self.ready, timeout)

    async def spawn(self, req: dict, out_w: int) -> int:
        if self.sock is None:
            raise SpawnFailed("the zygote is not running")
        self.next_id += 1
        sid = req["spawn"]
        fut = asyncio.get_running_loop().create_future()
        self.pending[sid] = fut
        try:
            socket.send_fds(self.sock, [json.dumps(req).encode()], [out_w])
        except OSError as e:
            self.pending.pop(sid, None)
            raise SpawnFailed(f"zygote: {e}") from None
        return await fut

    def _readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            msg = json.loads(data)
            if "ready" in msg:
                self.ready.set_result(msg["ready"])
            elif "spawned" in msg:
                if (f := self.pending.pop(msg["spawned"], None)) and not f.done():
                    f.set_result(msg["pid"])
            elif "failed" in msg:
                if (f := self.pending.pop(msg["failed"], None)) and not f.done():
                    f.set_exception(SpawnFailed(msg["error"]))
            elif "exit" in msg:
                self.on_exit(msg["exit"], msg["status"])

    def _lost(self) -> None:
        log.error("the zygote exited; environments cannot start until it is restarted")
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock)
        self.sock.close()
        self.sock = None
        for f in self.pending.values():
            if not f.done():
                f.set_exception(SpawnFailed("the zygote exited"))
        self.pending.clear()
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(SpawnFailed("the zygote exited at start"))

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock)
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            self.proc = None


if __name__ == "__main__":
    zygote_main(int(sys.argv[1]), sys.argv[2])

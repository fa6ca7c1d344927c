"""The life of one execution environment, driven by its Runtime API requests:

    starting --/next--> idle (frozen) --assign--> busy --/response|/error--> answered
    answered --/next--> idle, or busy at once if an invocation was assigned meanwhile
       any state --exit | timeout | kill--> dead

One invocation at a time. Before an event is handed over, every thread of the environment is
set to that invocation's class (the handler cannot raise it: RLIMIT_RTPRIO 0, unprivileged,
no_new_privs), and the cgroup is thawed. Idle environments are frozen (cgroup.freeze): they
cost no CPU and the memory manager may take their pages first.

CPU is metered from the cgroup's cpu.stat between two hand-overs, so everything the
environment burns (its init included, and any thread that outlives a response) is billed to
an invocation of its own tenant.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Callable

from xxnode.classes import PriceClass
from xxnode.kernel import sched
from xxnode.kernel.cgroup import Cgroup, CgroupError
from xxnode.node.env.function import FunctionVersion
from xxnode.node.env.invocation import Invocation, error_doc

log = logging.getLogger("xxnode")

INIT_LOG_LIMIT = 64 << 10


class Environment:
    def __init__(
        self,
        env_id: str,
        fn: FunctionVersion,
        uid: int,
        cgroup: Cgroup,
        out_fd: int,
        response_limit: int,
        on_idle: Callable[[Environment], None],
        on_dead: Callable[[Environment], None],
    ):
        self.env_id, self.fn, self.uid, self.cgroup = env_id, fn, uid, cgroup
        self.response_limit = response_limit
        self.on_idle, self.on_dead = on_idle, on_dead
        self.state = "starting"
        self.pid = 0
        self.current: Invocation | None = None
        self.last: Invocation | None = None  # the latest assigned: whose chain calls inherit
        self.orphan: Invocation | None = None  # assigned, never delivered, env died: requeue
        # spawned for a cold invocation that is handed over once the spawn returns: until
        # then no other invocation may take it, though its runtime may already be in /next
        self.reserved = False
        self.delivered = False
        self.reply: Callable[[dict[str, str], bytes], None] | None = None
        self.frozen = False
        self.cls: PriceClass | None = None  # the class its threads are at now
        self.spawned = time.monotonic()
        self.init_ms = 0.0
        self.idle_since = 0.0
        self.invocations = 0
        self.cpu_mark = 0
        self.mem_at_start = 0
        self.init_log = bytearray()
        self.init_failure: dict | None = None
        self.exit_status: int | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.bridge = None  # the http runtime's in-node runtime (http_bridge.HttpBridge)
        self.loop = asyncio.get_running_loop()
        self.out_fd = out_fd
        os.set_blocking(out_fd, False)
        self.loop.add_reader(out_fd, self._read_output)

    # -- the pool's side ------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """Idle and free for any invocation of its function."""
        return self.state == "idle" and not self.reserved

    def assign(self, inv: Invocation, cls: PriceClass) -> None:
        """Hand `inv` to this environment: its class on every thread, thawed, delivered now
        if the runtime is waiting in /next, else when it asks."""
        if self.state == "dead":  # it died between its spawn and this hand-over
            inv.env_id, inv.cold, inv.started = self.env_id, True, time.monotonic()
            inv.add_log(bytes(self.init_log))
            inv.finish(None, "", self.init_failure or _died(inv.request_id, self.exit_status))
            return
        assert self.current is None and self.state in ("starting", "idle", "answered")
        self.current, self.delivered, self.last = inv, False, inv
        inv.env_id, inv.cold = self.env_id, self.invocations == 0
        self.invocations += 1
        self._set_class(cls)
        self._thaw()
        if self.state == "idle":
            self.state = "busy"
            if self.reply is not None:
                self._deliver()

    def kill(self, reason: str, error: dict | None = None) -> None:
        """Kill the whole tree (cgroup.kill); the current invocation, if any, ends with
        `error`. The environment is dead to the pool at once; its uid comes back when its
        cgroup is empty (the pool watches that)."""
        if self.state == "dead":
            return
        log.debug("env %s killed: %s", self.env_id, reason)
        try:
            self.cgroup.kill()
        except CgroupError as e:
            log.warning("env %s: cgroup.kill: %s", self.env_id, e)
        self._thaw()  # a frozen tree dies only once thawed on some kernels
        inv = self.current
        if inv is not None and not self.delivered and not inv.cold:
            # a warm environment that died before it took the event (it exited after its
            # last answer): the invocation goes back to the pool, it was never attempted
            self.current, self.orphan = None, inv
            self.invocations -= 1
        elif inv is not None:
            self._finish(None, "", error or {"errorType": "Runtime.Killed", "errorMessage": reason})
        self._dead()

    def exited(self, status: int) -> None:
        """The zygote reaped the environment's first process."""
        self.exit_status = status
        if self.state == "dead":
            return
        if self.current is not None and self.init_failure is None:
            self.init_failure = _died(self.current.request_id, status)
        self.kill(f"runtime exited (wait status {status})", self.init_failure)

    def timed_out(self) -> None:
        inv = self.current
        if inv is None:
            return
        self.kill(
            "timeout",
            {
                "errorType": "Sandbox.Timedout",
                "errorMessage": f"RequestId: {inv.request_id} Error: "
                f"Task timed out after {inv.timeout:.2f} seconds",
            },
        )

    # -- the Runtime API's side -----------------------------------------------------------
    def next(self, reply: Callable[[dict[str, str], bytes], None]) -> None:
        if self.state == "dead":
            return  # never answered: the tree is being killed
        if self.current is not None and self.delivered:
            # asked for more without answering: Lambda fails the invocation the same way
            self._finish(
                None,
                "",
                {"errorType": "Runtime.InvalidState", "errorMessage": "next before response"},
            )
        self.reply = reply
        if self.state == "starting":
            self.init_ms = (time.monotonic() - self.spawned) * 1000
            if self.current is not None:
                self.state = "busy"
        if self.current is not None:
            self.state = "busy"
            self._deliver()
        else:
            self.state = "idle"
            self.idle_since = time.monotonic()
            self.on_idle(self)
            if self.state == "idle" and self.current is None:
                self._freeze()

    def response(self, request_id: str, body: bytes, content_type: str) -> tuple[int, dict]:
        if not self._is_current(request_id):
            return _forbidden(request_id)
        self._finish(body, content_type, None)
        return 202, {}

    def error(self, request_id: str, body: bytes, error_type: str) -> tuple[int, dict]:
        if not self._is_current(request_id):
            return _forbidden(request_id)
        self._finish(None, "", error_doc(body, error_type))
        return 202, {}

    def init_error(self, body: bytes, error_type: str) -> tuple[int, dict]:
        if self.state != "starting":
            return 403, {"errorType": "InvalidStateTransition", "errorMessage": "init is over"}
        self.init_ms = (time.monotonic() - self.spawned) * 1000
        self.init_failure = error_doc(body, error_type)
        if self.current is not None:
            self._finish(None, "", self.init_failure)
        # the runtime exits next (awslambdaric does); the zygote's exit report kills the rest
        return 202, {}

    def disconnected(self) -> None:
        self.reply = None

    # -- internals ------------------------------------------------------------------------
    def _is_current(self, request_id: str) -> bool:
        return self.current is not None and self.delivered and self.current.request_id == request_id

    def _deliver(self) -> None:
        inv, reply = self.current, self.reply
        self.reply, self.delivered = None, True
        inv.started = time.monotonic()
        inv.init_ms = self.init_ms if inv.cold else 0.0
        inv.deadline_ms = int((time.time() + inv.timeout) * 1000)
        inv.add_log(bytes(self.init_log) + inv.start_line())
        self.init_log.clear()
        if not inv.cold:
            self.cpu_mark = self._cpu_us()  # a cold one bills its init too
        self.mem_at_start = self._memory()[0]
        self.timer = self.loop.call_at(self.loop.time() + inv.timeout, self.timed_out)
        reply(
            {
                "Content-Type": "application/json",
                "Lambda-Runtime-Aws-Request-Id": inv.request_id,
                "Lambda-Runtime-Deadline-Ms": str(inv.deadline_ms),
                "Lambda-Runtime-Invoked-Function-Arn": inv.fn.arn,
                "Lambda-Runtime-Trace-Id": f"Root=1-{int(time.time()):08x}-{inv.request_id[:24].replace('-', '')}",
            },
            inv.payload,
        )

    def _finish(self, body: bytes | None, ctype: str, error: dict | None) -> None:
        inv, self.current = self.current, None
        self.delivered = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._read_output(drain=True)  # what it printed before answering is in the pipe
        cpu = self._cpu_us()
        inv.cpu_us, self.cpu_mark = max(0, cpu - self.cpu_mark), cpu
        current, peak, source = self._memory()
        inv.max_memory, inv.memory_source = peak, source
        inv.mean_memory = (current + self.mem_at_start) // 2 if self.mem_at_start else current
        if inv.started == 0.0:
            inv.started = time.monotonic()  # never delivered (init failed): zero duration
            inv.add_log(bytes(self.init_log))  # what init printed explains why
            self.init_log.clear()
        inv.finish(body, ctype, error)
        if self.state == "busy":
            self.state = "answered"  # until its next /next: then idle, or busy at once

    def _set_class(self, cls: PriceClass) -> None:
        if self.cls is not None and self.cls.name == cls.name:
            return  # new threads inherit their creator's policy: nothing can have changed up
        prio = cls.priority if cls.is_rt else 0
        try:
            tids = self.cgroup.threads()
        except CgroupError:
            tids = []
        for tid in tids:
            try:
                sched.set_policy(tid, cls.sched_policy, prio)
            except ProcessLookupError:
                continue
            except OSError as e:
                log.warning("env %s: thread %d to %s: %s", self.env_id, tid, cls.name, e)
        self.cls = cls

    def _freeze(self) -> None:
        if not self.frozen:
            try:
                self.cgroup.freeze(True)
                self.frozen = True
            except CgroupError as e:
                log.debug("env %s: freeze: %s", self.env_id, e)

    def _thaw(self) -> None:
        if self.frozen:
            try:
                self.cgroup.freeze(False)
            except CgroupError as e:
                log.debug("env %s: thaw: %s", self.env_id, e)
            self.frozen = False

    def resident(self) -> int:
        """Bytes in RAM now (what killing it would free)."""
        return self._memory()[0]

    def _cpu_us(self) -> int:
        try:
            return self.cgroup.cpu_stat().get("usage_usec", 0)
        except CgroupError:
            return self.cpu_mark

    def _memory(self) -> tuple[int, int, str]:
        """(current, peak, source): the cgroup's memory.current/peak, else the resident
        sets of its processes from /proc (said so: a kernel without the memory controller)."""
        try:
            if self.cgroup.has("memory.current"):
                cur = self.cgroup.read_int("memory.current") or 0
                peak = (
                    self.cgroup.read_int("memory.peak") if self.cgroup.has("memory.peak") else None
                )
                return cur, peak or cur, "memory.current" + ("/memory.peak" if peak else "")
            rss = hwm = 0
            for pid in self.cgroup.procs():
                st = _proc_status(pid)
                rss += st.get("VmRSS", 0)
                hwm += st.get("VmHWM", 0)
            return rss, hwm, "proc-rss (no memory controller)"
        except CgroupError:
            return 0, 0, "unavailable"

    def _read_output(self, drain: bool = False) -> None:
        while True:
            try:
                data = os.read(self.out_fd, 1 << 16)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno != errno.EBADF:
                    log.debug("env %s output: %s", self.env_id, e)
                data = b""
            if not data:
                self._close_output()
                return
            if self.current is not None and self.delivered:
                self.current.add_log(data)
            elif self.current is not None or self.state == "starting":
                room = INIT_LOG_LIMIT - len(self.init_log)
                self.init_log += data[: max(room, 0)]
            if not drain:
                return

    def _close_output(self) -> None:
        if self.out_fd >= 0:
            self.loop.remove_reader(self.out_fd)
            os.close(self.out_fd)
            self.out_fd = -1

    def _dead(self) -> None:
        self.state = "dead"
        if self.bridge is not None:
            self.bridge.close()
        if self.reply is not None:
            self.reply = None
        self._read_output(drain=True)
        self._close_output()
        self.on_dead(self)

    def describe(self) -> dict:
        cur, _peak, _src = self._memory() if self.state != "dead" else (0, 0, "")
        # what xxctl fn envs shows: starting / running / idle / frozen / swapped
        state = "running" if self.state in ("busy", "answered") else self.state
        if state == "idle":
            state = "frozen" if self.frozen else "idle"
            if self._swapped():
                state = "swapped"
        return {
            "env": self.env_id,
            "function": self.fn.name,
            "version": self.fn.version,
            "tenant": self.fn.tenant,
            "runtime": self.fn.runtime,
            "state": state,
            "class": self.current.cls if self.current else None,
            "request_id": self.current.request_id if self.current else None,
            "last_class": self.cls.name if self.cls else None,
            "memory_bytes": cur,
            "idle_since": (time.time() - (time.monotonic() - self.idle_since))
            if state in ("idle", "frozen", "swapped")
            else None,
            "invocations": self.invocations,
            "init_ms": round(self.init_ms, 3),
            "uid": self.uid,
        }

    def _swapped(self) -> bool:
        try:
            return (
                (self.cgroup.read_int("memory.swap.current") or 0) > 0
                if self.cgroup.has("memory.swap.current")
                else False
            )
        except CgroupError:
            return False


def _died(request_id: str, status: int | None) -> dict:
    how = "killed" if status is None else (
        f"signal: {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
        else f"exit status {os.WEXITSTATUS(status)}"
    )  # fmt: skip
    return {
        "errorType": "Runtime.ExitError",
        "errorMessage": f"RequestId: {request_id} Error: Runtime exited with error: {how}",
    }


def _forbidden(request_id: str) -> tuple[int, dict]:
    return 403, {
        "errorType": "InvalidRequestID",
        "errorMessage": f"request id {request_id[:64]!r} is not this environment's invocation",
    }


def _proc_status(pid: int) -> dict[str, int]:
    """/proc/PID/status lines like `VmRSS:	  1234 kB`, in bytes."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Vm"):
                    k, _, v = line.partition(":")
                    parts = v.split()
                    if len(parts) == 2 and parts[1] == "kB":
                        out[k] = int(parts[0]) * 1024
    except OSError:
        pass
    return out

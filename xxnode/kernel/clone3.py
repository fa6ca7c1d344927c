"""clone3(CLONE_INTO_CGROUP) job launch through a per-job shim — the one module for it.

A job is born inside its cgroup leaf with its class's scheduling already set: no window in
which it runs elsewhere or at the wrong priority, and no fork of the (large) daemon: the shim
shares the daemon's memory (CLONE_VM) and the job is a vfork-style child of the shim. See
clone3.c / clone3.h (built by _clone3_build.py) for the C side and the process tree.

The shim protocol, which also lets a restarted daemon decide what happened to a job, lives
in the job's state directory:

    shim      created O_EXCL by the shim before it clones the job, flock'ed for the shim's
              life; content "pid N". A restarted daemon that finds no `shim` claims it itself
              (content "void") so a late shim can never start the job after all.
    stdout    the job's output, first `out_limit` bytes (stderr likewise)
    exit      written atomically (rename) by the shim after the job's main process exited and
              its cgroup was killed; flat keyed, e.g.
                  xx_exit 1
                  job_pid 1234
                  wait_status 256        (raw wait(2) status)
                  timed_out 0
                  start_ns 1700000000000000000   (CLOCK_REALTIME at clone)
                  end_ns 1700000000123000000     (CLOCK_REALTIME at exit)
                  stdout_bytes 12 / stdout_dropped 0 / stderr_bytes / stderr_dropped
                  fail_stage 0 / fail_errno 0    (set if the job never reached its code)
                  utime_us / stime_us / maxrss_kb (of the main process, from wait4)
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from xxnode.kernel.cgroup import parse_flat_keyed

try:
    from xxnode.kernel._clone3 import ffi, lib
except ImportError as e:  # pragma: no cover - only without a build
    ffi = lib = None
    _IMPORT_ERROR: ImportError | None = e
else:
    _IMPORT_ERROR = None

_STAGE_TEXT = {
    "OK": "ok",
    "CLAIM": "claim (job already claimed)",
    "SHIM_SETUP": "shim setup",
    "SHIM_SCHED": "shim sched_setscheduler",
    "CLONE_JOB": "clone3 into the job cgroup",
    "SCHED": "sched_setscheduler",
    "RLIMIT": "setrlimit RLIMIT_RTPRIO",
    "NO_NEW_PRIVS": "prctl PR_SET_NO_NEW_PRIVS",
    "STDIO": "stdio dup",
    "SETGROUPS": "setgroups",
    "SETGID": "setgid",
    "SETUID": "setuid",
    "CHDIR": "chdir",
    "EXEC": "execve",
    "CLONE_SHIM": "clone3 of the shim",
    "JOB_KILLED_AT_BIRTH": "job SIGKILLed at birth (cgroup kill_seq mismatch: a cgroup.kill'ed cgroup)",
    "SHIM_KILLED": "shim SIGKILLed before it reported",
    "OOM_ADJ": "writing /proc/self/oom_score_adj",
}
# The codes come from clone3.h (through the cdef): lib.XX_STAGE_<name>. -1 without a build.
STAGES = (
    {getattr(lib, f"XX_STAGE_{k}"): v for k, v in _STAGE_TEXT.items()} if lib is not None else {}
)
STAGE_CLAIM = lib.XX_STAGE_CLAIM if lib is not None else -1
STAGE_CLONE_SHIM = lib.XX_STAGE_CLONE_SHIM if lib is not None else -1
STAGE_SHIM_KILLED = lib.XX_STAGE_SHIM_KILLED if lib is not None else -1
STAGES_KILLED_AT_BIRTH = (
    (lib.XX_STAGE_JOB_KILLED_AT_BIRTH, lib.XX_STAGE_SHIM_KILLED) if lib is not None else ()
)

SHIM_FILE = "shim"
EXIT_FILE = "exit"


def unavailable_reason() -> str | None:
    """Why the extension cannot be used (not built), or None if it can (for status/doctor)."""
    return None if _IMPORT_ERROR is None else f"xxnode.kernel._clone3 not built: {_IMPORT_ERROR}"


class SpawnError(Exception):
    """The job did not reach its first instruction; `stage` says where it stopped."""

    def __init__(self, stage: int, err: int, shim_pid: int = 0, shim_pidfd: int = -1):
        self.stage, self.errno, self.shim_pid, self.shim_pidfd = stage, err, shim_pid, shim_pidfd
        what = STAGES.get(stage, f"stage {stage}")
        super().__init__(f"{what}: {os.strerror(err)}" if err else what)


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass
class SpawnRequest:
    path: str
    argv: list[str]
    env: dict[str, str]
    job_cgroup: Path
    job_dir: Path
    job_policy: int
    job_priority: int
    shim_policy: int
    shim_priority: int
    cwd: str | None = None
    stdin: bytes = b""
    user: User | None = None
    shim_cgroup: Path | None = None
    out_limit: int = 1 << 20
    timeout_s: float | None = None
    oom_score_adj: int | None = None  # None: inherit the daemon's


@dataclass
class Spawned:
    """A running job. The shim's stack block stays mapped until `release()` after the shim
    has been reaped (it runs in our address space)."""

    shim_pid: int
    shim_pidfd: int
    job_pid: int
    start_ns: int
    _block: object = field(repr=False, default=None)

    def release(self) -> None:
        if self._block is not None:
            lib.xx_stack_free(self._block)
            self._block = None


def _stdin_fd(data: bytes) -> int:
    if not data:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    fd = os.memfd_create("xx-stdin", os.MFD_CLOEXEC)
    os.write(fd, data) if len(data) < 65536 else _write_all(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _cstrings(items: list[str], keep: list) -> object:
    arr = ffi.new("char *[]", len(items) + 1)
    for i, s in enumerate(items):
        b = ffi.new("char[]", s.encode())
        keep.append(b)
        arr[i] = b
    arr[len(items)] = ffi.NULL
    keep.append(arr)
    return arr


def spawn(req: SpawnRequest) -> Spawned:
    """Start the shim and the job; return once the job has exec'd. Raises SpawnError if it
    never reached its code (the shim, if it ran, has then already been reaped... or will
    exit on its own: the caller gets its pidfd in the error to wait for it)."""
    if lib is None:
        raise RuntimeError(unavailable_reason())
    keep: list = []
    a = ffi.new("struct xx_spawn *")
    fds: list[int] = []
    block = lib.xx_stack_alloc()
    if block == ffi.NULL:
        raise SpawnError(STAGE_CLONE_SHIM, errno.ENOMEM)
    try:
        a.job_cgroup_fd = _opendir(req.job_cgroup, fds)
        a.shim_cgroup_fd = _opendir(req.shim_cgroup, fds) if req.shim_cgroup else -1
        a.job_dir_fd = _opendir(req.job_dir, fds)
        a.stdin_fd = _stdin_fd(req.stdin)
        fds.append(a.stdin_fd)
        rd, wr = os.pipe2(os.O_CLOEXEC)
        a.report_rd, a.report_wr = rd, wr  # xx_spawn closes both
        a.shim_policy, a.shim_prio = req.shim_policy, req.shim_priority
        a.job_policy, a.job_prio = req.job_policy, req.job_priority
        a.oom_score_adj = 1001 if req.oom_score_adj is None else req.oom_score_adj
        if req.user is not None:
            a.set_user = 1
            a.uid, a.gid = req.user.uid, req.user.gid
            groups = req.user.groups[:64]
            a.ngroups = len(groups)
            for i, g in enumerate(groups):
                a.groups[i] = g
        a.out_limit = req.out_limit
        a.timeout_ns = int(req.timeout_s * 1e9) if req.timeout_s else 0
        path = ffi.new("char[]", req.path.encode())
        keep.append(path)
        a.path = path
        a.argv = _cstrings(req.argv, keep)
        a.envp = _cstrings([f"{k}={v}" for k, v in req.env.items()], keep)
        if req.cwd:
            cwd = ffi.new("char[]", req.cwd.encode())
            keep.append(cwd)
            a.cwd = cwd
        pidfd = ffi.new("int *")
        rep = ffi.new("struct xx_report *")
        pid = lib.xx_spawn(a, block, pidfd, rep)
    except BaseException:
        lib.xx_stack_free(block)
        raise
    finally:
        for fd in fds:
            os.close(fd)
    if pid < 0:
        lib.xx_stack_free(block)
        raise SpawnError(rep.stage, rep.err)
    if rep.stage == STAGE_SHIM_KILLED:  # the shim is dead already (SIGKILL): reap it here
        os.waitid(os.P_PIDFD, pidfd[0], os.WEXITED)
        os.close(pidfd[0])
        lib.xx_stack_free(block)
        raise SpawnError(rep.stage, rep.err, pid)
    if rep.stage != lib.XX_STAGE_OK or rep.job_pid <= 0:
        # The shim exits by itself; the caller must reap it and then free the block, so we
        # hand both over in the error rather than block here.
        err = SpawnError(rep.stage, rep.err, pid, pidfd[0])
        err.spawned = Spawned(pid, pidfd[0], rep.job_pid, rep.start_ns, block)
        raise err
    return Spawned(pid, pidfd[0], rep.job_pid, rep.start_ns, block)


def run_to_exit(req: SpawnRequest) -> dict[str, int]:
    """Spawn, wait for the shim to exit, return its exit record ({} if it wrote none): the
    node's self-test and the doctor's probe, where the launch itself is what is tested.
    SpawnError as spawn() raises it, its shim (if any) already reaped."""
    try:
        sp = spawn(req)
    except SpawnError as e:
        if (sp := getattr(e, "spawned", None)) is not None:
            _reap(sp)
        raise
    _reap(sp)
    return read_exit(req.job_dir) or {}


def _reap(sp: Spawned) -> None:
    os.waitid(os.P_PIDFD, sp.shim_pidfd, os.WEXITED)
    os.close(sp.shim_pidfd)
    sp.release()


def _opendir(path: Path, fds: list[int]) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fds.append(fd)
    return fd


# -- the state-directory side of the shim protocol (used on restart) ----------------------


def read_exit(job_dir: Path) -> dict[str, int] | None:
    """The shim's exit record, or None if it has not written one (yet)."""
    try:
        text = (job_dir / EXIT_FILE).read_text()
    except FileNotFoundError:
        return None
    rec = parse_flat_keyed(text)
    return rec if rec.get("xx_exit") == 1 else None


def shim_state(job_dir: Path) -> tuple[str, int | None]:
    """What the shim file says: ("none", None) never claimed, ("void", None) claimed by a
    daemon, ("alive", pid) its shim holds the lock, ("dead", pid) its shim has exited.
    The shim links the file into place with its pid written and its lock held, so there is
    no half-claimed state to see."""
    path = job_dir / SHIM_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return "none", None
    try:
        rec = parse_flat_keyed(os.read(fd, 256).decode(errors="replace"))
        pid = rec.get("pid")
        if pid is None:  # a daemon's "void" claim: the shim writes its pid before the link
            return "void", None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return "alive", pid
        return "dead", pid
    finally:
        os.close(fd)


def claim_void(job_dir: Path) -> bool:
    """Claim a job no shim has claimed, so none ever will; False if a shim got there first."""
    try:
        fd = os.open(
            job_dir / SHIM_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
    except FileExistsError:
        return False
    except FileNotFoundError:
        return True  # no job dir: no shim could ever claim it
    os.write(fd, b"void\n")
    os.close(fd)
    return True


def decode_wait_status(status: int) -> tuple[int | None, int | None]:
    """(exit_code, signal) from a raw wait status."""
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    return None, None


# -- fork straight into a cgroup (the zygote's path) ----------------------------------------------
# struct clone_args (linux/sched.h), every field a __u64:
#   flags pidfd child_tid parent_tid exit_signal stack stack_size tls set_tid set_tid_size cgroup
class _CloneArgs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack",
            "stack_size", "tls", "set_tid", "set_tid_size", "cgroup",
        )
    ]  # fmt: skip


_CLONE_INTO_CGROUP = 0x200000000
_SYS_CLONE3 = 435  # x86_64
# PyDLL: the GIL stays held across the syscall, so the child resumes as the same, only thread
_pyapi = ctypes.PyDLL(None, use_errno=True)


def fork_into_cgroup(cgroup_fd: int) -> int:
    """os.fork(), but the child is born in the cgroup `cgroup_fd` (an O_DIRECTORY fd).

    Moving a process by writing cgroup.procs takes the cgroup threadgroup rwsem for writing,
    which waits for an RCU grace period: 1-14 ms measured here, most of a cold start.
    CLONE_INTO_CGROUP places the child at birth. CPython's own before/after-fork hooks run
    around the raw syscall, exactly as os.fork runs them, so the child's interpreter state
    is what os.fork would leave. Only for a single-threaded caller (the zygote)."""
    args = _CloneArgs(flags=_CLONE_INTO_CGROUP, exit_signal=signal.SIGCHLD, cgroup=cgroup_fd)
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _pyapi.syscall(ctypes.c_long(_SYS_CLONE3), ctypes.byref(args), ctypes.sizeof(args))
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone3(CLONE_INTO_CGROUP): {os.strerror(err)}")
    return pid

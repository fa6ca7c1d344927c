"""Capability probes: each one *does* the thing XX relies on, on this kernel, and undoes it.

File names lie (a controller can be listed yet not delegated; a PSI file can refuse a 1 s
window; swap can be configured but off), so every probe acts: it makes a scratch cgroup,
sets SCHED_FIFO on a parked child, arms a trigger, reclaims real pages. A failed probe names
the degraded mode XX runs in instead (DESIGN.md principle 3), or says that xxnode refuses to
start without it (cgroup2, SCHED_FIFO, clone3 into a cgroup). Nothing is left behind.

Why one module of ~400 lines: fourteen short probes that share the scratch cgroup, the
parked child and the table of degraded modes `xxctl doctor` prints beside them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import struct
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from xxnode.kernel import clone3, psi, sched, swap
from xxnode.kernel import rt_group as rt_group_mod
from xxnode.kernel.cgroup import Cgroup, CgroupError, find_cgroup2_mount
from xxnode.kernel.cgroup_watch import PopulatedWatcher

MiB = 1 << 20


@dataclass(frozen=True)
class Capability:
    name: str
    ok: bool
    detail: str
    degraded: str = ""  # the mode XX runs in without it; "" when ok

    def as_dict(self) -> dict:
        return asdict(self)


# What XX does without each capability, or "required: ..." where xxnode will not start
# without it. Shown by `xxctl doctor` and the daemons' status.
DEGRADED = {
    # xxnode refuses to start without the three marked "required" (node/host.py sets up the
    # cgroups and SCHED_FIFO, node/daemon.py checks clone3 and node/launch.py self-tests a
    # launch): no mode runs without them. Every other entry is a mode the daemon runs in.
    "cgroup2": "required: xxnode refuses to start without a cgroup2 mount (jobs live in "
    "cgroups: kill, freeze, accounting and re-adoption after a restart all need them)",
    "cgroup2.memory": "memory-unmanaged: no per-job memory accounting, class-ordered reclaim "
    "or swap limits; pressure is seen through PSI and /proc/meminfo only",
    "cgroup2.cpu": "cpu-core-only: CPU time from the core cpu.stat file; classes are enforced "
    "by SCHED_FIFO alone (no cpu.weight)",
    "cgroup2.pids": "no-pids-limit: a fork bomb inside a job is stopped only by its timeout",
    "sched_fifo": "required: xxnode refuses to start without SCHED_FIFO (classes are its "
    "priorities; without them a high class would not preempt a low one)",
    "clone3": "required: xxnode refuses to start without its launcher (clone3 with "
    "CLONE_INTO_CGROUP: a job is in its cgroup, at its class, from its first instruction)",
    "rt_throttling": "rt-unthrottled: a spinning high-class job could starve sshd and systemd",
    "psi": "no-pressure: memory pressure inferred from /proc/meminfo free memory only",
    "psi_trigger": "psi-polled: PSI averages are polled each tick instead of kernel triggers",
    "bpf": "no-ebpf: per-cgroup fault, reclaim and OOM counts come from cgroup files only",
    "btf": "no-co-re: the eBPF object cannot be relocated for this kernel; eBPF is off",
    "swap": "no-swap: low classes cannot be swapped out; under pressure only the class-ordered "
    "OOM order protects high classes",
    "zswap": "swap-direct: reclaimed pages go straight to the swap device, uncompressed",
    "memory_reclaim": "no-proactive-reclaim: XX cannot push a class out; the kernel's global "
    "reclaim chooses victims",
    "mount_ns": "no-functions: without a private mount namespace an environment would see "
    "every tenant's code and share /tmp, so the node runs jobs only",
    "sock_diag": "no-functions: the Runtime API cannot tell which environment is asking, so "
    "the node runs jobs only",
}


# -- a parked child ---------------------------------------------------------------------
class Parked:
    """A forked child that blocks on a pipe, so probes have a real task to move between
    cgroups, change the policy of, or make fault memory, without racing its startup."""

    def __init__(self) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._ack_r, ack_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: only os-level calls, then _exit
            try:
                os.close(self._cmd_w)
                os.close(self._ack_r)
                held = []
                while True:
                    op = os.read(cmd_r, 9)
                    if op[:1] == b"m":  # fault in N bytes of anonymous memory
                        n = int.from_bytes(op[1:9], "little")
                        buf = bytearray(n)
                        for i in range(0, n, 4096):
                            buf[i] = 1
                        held.append(buf)
                        os.write(ack_w, b"k")
                    else:
                        break
            finally:
                os._exit(0)
        os.close(cmd_r)
        os.close(ack_w)
        self.pid = pid

    def touch(self, nbytes: int) -> None:
        os.write(self._cmd_w, b"m" + nbytes.to_bytes(8, "little"))
        if os.read(self._ack_r, 1) != b"k":
            raise OSError(errno.ECHILD, "probe child died while faulting memory")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._cmd_w)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        os.close(self._ack_r)


@contextlib.contextmanager
def parked() -> Iterator[Parked]:
    child = Parked()
    try:
        yield child
    finally:
        child.close()


@contextlib.contextmanager
def scratch_cgroup(root: Cgroup, enable: tuple[str, ...] = ()) -> Iterator[Cgroup]:
    """A parent cgroup under `root` with `enable` turned on for its one child; yields the child.
    Both are removed afterwards (their processes must be gone by then)."""
    parent = root.create(f"xx-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}", exist_ok=False)
    try:
        missing = set(enable) - parent.enable(enable)
        if missing:
            raise CgroupError(errno.EOPNOTSUPP, f"cannot enable {' '.join(sorted(missing))}")
        child = parent.create("leaf")
        try:
            yield child
        finally:
            child.remove()  # probes reap their children first, so the leaf is empty here
    finally:
        parent.remove()


# -- probes -------------------------------------------------------------------------------
class Prober:
    """Runs each probe once; `results()` returns them in a stable order."""

    def __init__(self) -> None:
        mount = find_cgroup2_mount()
        self.root = Cgroup(mount) if mount else None
        self._results: dict[str, Capability] = {}

    def _add(self, name: str, ok: bool, detail: str) -> Capability:
        cap = Capability(name, ok, detail, "" if ok else DEGRADED[name])
        self._results[name] = cap
        return cap

    def _run(self, name: str, fn: Callable[[], tuple[bool, str]]) -> Capability:
        try:
            ok, detail = fn()
        except OSError as e:
            ok, detail = False, f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        return self._add(name, ok, detail)

    def ok(self, name: str) -> bool:
        cap = self._results.get(name)
        return bool(cap and cap.ok)

    def results(self) -> list[Capability]:
        order = [
            ("cgroup2", self.cgroup2),
            ("cgroup2.memory", lambda: self.controller("memory", "memory.max", "max")),
            ("cgroup2.cpu", self.cpu_controller),
            ("cgroup2.pids", lambda: self.controller("pids", "pids.max", "64")),
            ("sched_fifo", self.sched_fifo),
            ("clone3", self.clone3),
            ("rt_throttling", self.rt_throttling),
            ("psi", self.psi),
            ("psi_trigger", self.psi_trigger),
            ("bpf", self.bpf),
            ("btf", self.btf),
            ("swap", self.swap),
            ("zswap", self.zswap),
            ("memory_reclaim", self.memory_reclaim),
            ("mount_ns", self.mount_ns),
            ("sock_diag", self.sock_diag),
        ]
        return [self._run(name, fn) for name, fn in order]

    # Each probe returns (ok, detail).
    def cgroup2(self) -> tuple[bool, str]:
        if self.root is None:
            return False, "no cgroup2 mount in /proc/self/mountinfo"
        with scratch_cgroup(self.root) as cg, parked() as child:
            cg.attach(child.pid)
            if cg.procs() != [child.pid]:
                return False, f"a process written to {cg.path}/cgroup.procs did not move"
            cg.kill()
        offered = " ".join(sorted(self.root.controllers())) or "none"
        return True, f"mounted at {self.root.path}; controllers offered: {offered}"

    def controller(self, name: str, knob: str, value: str) -> tuple[bool, str]:
        if self.root is None:
            return False, "no cgroup2"
        if name not in self.root.controllers():
            return False, f"{name} is not offered at {self.root.path} (owned by cgroup v1?)"
        if name not in self.root.subtree_control():
            return False, (
                f"{name} is offered but not enabled in {self.root.path}/cgroup.subtree_control"
            )
        with scratch_cgroup(self.root, (name,)) as cg:
            cg.write(knob, value)
            got = cg.read(knob).strip()
        if got != value:
            return False, f"wrote {value} to {knob}, read back {got}"
        return True, f"enabled in a scratch cgroup; {knob} set and read back"

    def cpu_controller(self) -> tuple[bool, str]:
        rt_group = rt_group_mod.detect()[0]
        ok, detail = self.controller("cpu", "cpu.weight", "50")
        if not ok:
            if rt_group:
                detail += "; kernel has CONFIG_RT_GROUP_SCHED (xxnode would leave cpu off)"
            return ok, detail
        # Under CONFIG_RT_GROUP_SCHED a cgroup with the cpu controller has no RT runtime, so
        # SCHED_FIFO fails inside it. Do it to find out.
        with scratch_cgroup(self.root, ("cpu",)) as cg, parked() as child:
            cg.attach(child.pid)
            try:
                sched.set_policy(child.pid, os.SCHED_FIFO, 1)
            except OSError as e:
                return False, (
                    f"cpu controller blocks SCHED_FIFO in child cgroups ({e.strerror}): "
                    "CONFIG_RT_GROUP_SCHED; xxnode leaves cpu off"
                )
        return True, detail + "; SCHED_FIFO allowed inside it"

    def sched_fifo(self) -> tuple[bool, str]:
        with parked() as child:
            sched.set_policy(child.pid, os.SCHED_FIFO, 10)
            policy, prio = sched.get_policy(child.pid)
        if (policy, prio) != (os.SCHED_FIFO, 10):
            return False, f"set SCHED_FIFO/10, kernel reports {sched.POLICY_NAMES[policy]}/{prio}"
        lo, hi = os.sched_get_priority_min(os.SCHED_FIFO), os.sched_get_priority_max(os.SCHED_FIFO)
        return True, f"set on a child and read back; priorities {lo}..{hi}"

    def clone3(self) -> tuple[bool, str]:
        """The launcher end to end, as the node's self-test does: /bin/true into a scratch
        cgroup through the shim, reaped, its exit record read."""
        if (reason := clone3.unavailable_reason()) is not None:
            return False, reason
        if self.root is None:
            return False, "no cgroup2"
        with scratch_cgroup(self.root) as leaf, scratch_cgroup(self.root) as shims:
            jd = Path(tempfile.mkdtemp(prefix="xx-probe-"))
            watcher = PopulatedWatcher()
            try:
                req = clone3.SpawnRequest(
                    path="/bin/true", argv=["true"], env={}, job_cgroup=leaf.path,
                    job_dir=jd, job_policy=os.SCHED_OTHER, job_priority=0,
                    shim_policy=os.SCHED_OTHER, shim_priority=0, shim_cgroup=shims.path,
                )  # fmt: skip
                try:
                    rec = clone3.run_to_exit(req)
                except clone3.SpawnError as e:
                    return False, f"launching /bin/true into {leaf.path}: {e}"
            finally:  # both empty before scratch_cgroup removes them
                watcher.wait(leaf, 5.0)
                watcher.wait(shims, 5.0)
                watcher.close()
                shutil.rmtree(jd, ignore_errors=True)
        if rec.get("wait_status", -1) != 0:
            return False, f"/bin/true launched into a cgroup exited with {rec or 'no record'}"
        return True, "launched /bin/true into a scratch cgroup through the shim"

    def rt_throttling(self) -> tuple[bool, str]:
        rt = sched.rt_throttling()
        if rt is None:
            return False, "cannot read /proc/sys/kernel/sched_rt_{runtime,period}_us"
        runtime, period = rt
        if runtime < 0 or runtime >= period:
            return False, f"RT throttling off (runtime {runtime} us / period {period} us)"
        share = 100 * (period - runtime) / period
        return True, f"{runtime}/{period} us: SCHED_OTHER keeps {share:.0f}% under RT load"

    def psi(self) -> tuple[bool, str]:
        mem = psi.read_pressure(psi.PRESSURE_DIR / "memory")
        psi.read_pressure(psi.PRESSURE_DIR / "cpu")
        return True, f"memory some avg10={mem['some'].avg10:.2f} full avg10={mem['full'].avg10:.2f}"

    def psi_trigger(self) -> tuple[bool, str]:
        path = psi.PRESSURE_DIR / "memory"
        for window in (1_000_000, 2_000_000):
            try:
                with psi.Trigger(path, "some", 150_000, window):
                    pass
            except OSError as e:
                if e.errno == errno.EINVAL and window == 1_000_000:
                    continue
                raise
            if window == 1_000_000:
                return True, "armed 'some 150000 1000000' on /proc/pressure/memory"
            return True, (
                "armed with a 2 s window; 1 s refused (no CAP_SYS_RESOURCE: windows must be "
                "multiples of 2 s)"
            )
        return False, "no window accepted"

    def bpf(self) -> tuple[bool, str]:
        map_fd = _bpf_map_create()
        os.close(map_fd)
        prog_fd = _bpf_prog_load_trivial()
        os.close(prog_fd)
        from xxnode.kernel import bpf  # libbpf via cffi: only imported when bpf(2) works

        if not bpf.DEFAULT_OBJECT.exists():
            return True, "bpf(2) works; memwatch object not built (make -C ebpf)"
        ok, detail = bpf.probe()
        return ok, detail if ok else f"bpf(2) works but memwatch did not attach: {detail}"

    def btf(self) -> tuple[bool, str]:
        path = Path("/sys/kernel/btf/vmlinux")
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic != b"\x9f\xeb":
            return False, f"{path} has no BTF magic"
        return True, f"{path}: {path.stat().st_size // 1024} KiB"

    def swap(self) -> tuple[bool, str]:
        devices = swap.swap_devices()
        if not devices:
            return False, "no active swap device in /proc/swaps"
        return True, ", ".join(f"{d.name} {d.size_kib // 1024} MiB" for d in devices)

    def zswap(self) -> tuple[bool, str]:
        params = swap.zswap_params()
        if not params:
            return False, "zswap not built into this kernel"
        if params.get("enabled") != "Y":
            return False, "built in but disabled (/sys/module/zswap/parameters/enabled)"
        return True, (
            f"compressor {params.get('compressor', '?')}, pool {params.get('zpool', '?')}, "
            f"max {params.get('max_pool_percent', '?')}%"
        )

    def memory_reclaim(self) -> tuple[bool, str]:
        if not self.ok("cgroup2.memory"):
            return False, "needs cgroup2.memory"
        with scratch_cgroup(self.root, ("memory",)) as cg, parked() as child:
            cg.attach(child.pid)
            child.touch(16 * MiB)
            before = cg.read_int("memory.current") or 0
            t0 = time.monotonic()
            try:
                cg.write("memory.reclaim", "8M")
            except CgroupError as e:
                if e.errno == errno.EAGAIN:
                    return False, "memory.reclaim found nothing to reclaim (anon needs swap)"
                raise
            ms = (time.monotonic() - t0) * 1000
            after = cg.read_int("memory.current") or 0
        moved = (before - after) / MiB
        if moved < 4:
            return False, f"memory.reclaim '8M' moved only {moved:.1f} MiB"
        return True, f"reclaimed {moved:.1f} MiB of anon from a scratch cgroup in {ms:.0f} ms"

    def mount_ns(self) -> tuple[bool, str]:
        """A forked child makes the sandbox's mounts: its own namespace, a read-only tree,
        a tmpfs; the parent must not see them."""
        from xxnode.kernel import mount_ns

        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            msg = b"ok"
            try:
                mount_ns.unshare_mounts()
                mount_ns.make_tree_readonly("/")
                mount_ns.tmpfs("/tmp", size_bytes=MiB)
                with open("/tmp/xx-probe", "w") as f:
                    f.write("x")
            except OSError as e:
                msg = f"{e.strerror or e}".encode()
            os.write(w, msg)
            os._exit(0)
        os.close(w)
        msg = os.read(r, 512).decode()
        os.close(r)
        os.waitpid(pid, 0)
        if msg != "ok":
            return False, f"in a child: {msg}"
        if os.path.exists("/tmp/xx-probe"):
            os.unlink("/tmp/xx-probe")
            return False, "a mount made in a private namespace leaked to the host"
        return True, "private mount namespace, read-only tree (mount_setattr), tmpfs"

    def sock_diag(self) -> tuple[bool, str]:
        """A loopback connection from a child of another uid is traced to that uid."""
        import socket

        from xxnode.kernel.sock_diag import PeerLookup

        with socket.socket() as srv:
            srv.bind(("127.0.0.1", 0))
            srv.listen(1)
            pid = os.fork()
            if pid == 0:
                try:
                    os.setresuid(65534, 65534, 65534)
                    c = socket.create_connection(srv.getsockname(), timeout=5)
                    c.recv(1)
                finally:
                    os._exit(0)
            conn, peer = srv.accept()
            with conn, PeerLookup() as lookup:
                found = lookup.owner(conn.getsockname(), peer)
            os.waitpid(pid, 0)
        if found is None or found[0] != 65534:
            return False, f"the peer of a loopback connection was not found ({found})"
        return True, "NETLINK_SOCK_DIAG names the uid behind a loopback connection"


def probe_all() -> list[Capability]:
    return Prober().results()


# -- bpf(2), just enough to prove the syscall works -------------------------------------------
_NR_BPF = 321  # x86_64
_BPF_MAP_CREATE, _BPF_PROG_LOAD = 0, 5
_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    fd = _libc.syscall(_NR_BPF, cmd, buf, 128)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return fd


def _bpf_map_create() -> int:
    # union bpf_attr for MAP_CREATE: map_type, key_size, value_size, max_entries (u32 each)
    return _bpf(_BPF_MAP_CREATE, struct.pack("<IIII", 2, 4, 8, 1))  # BPF_MAP_TYPE_ARRAY


def _bpf_prog_load_trivial() -> int:
    # r0 = 0; exit  — a socket filter that drops everything; the verifier must accept it.
    insns = struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    insn_buf = ctypes.create_string_buffer(insns)
    license_buf = ctypes.create_string_buffer(b"GPL")
    # prog_type, insn_cnt, insns (u64 ptr), license (u64 ptr)
    attr = struct.pack(
        "<IIQQ", 1, 2, ctypes.addressof(insn_buf), ctypes.addressof(license_buf)
    )  # BPF_PROG_TYPE_SOCKET_FILTER
    return _bpf(_BPF_PROG_LOAD, attr)

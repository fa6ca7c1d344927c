"""What the node daemon sets up before it accepts work, and fails at start over rather than
failing every job: its own SCHED_FIFO priority, the locked state dir, the cgroup tree
(controllers enabled down to the class cgroups, the shims' cgroup), and the memory manager
with its eBPF counters. Every missing capability is either a StartupError with the reason
or a named degraded mode (DESIGN.md principle 3).

Cgroup layout under the root it owns:

    <root>/_shims-<ns>       every job's shim (not billed to the job); fresh per daemon run
    <root>/<class>/<job>     one leaf per job (JobCgroup); controllers enabled down to it
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from xxnode.config import NodeConfig
from xxnode.kernel import bpf, rt_group, sched, swap
from xxnode.kernel.cgroup import Cgroup, CgroupError, find_cgroup2_mount, own_cgroup
from xxnode.kernel.cgroup_watch import PopulatedWatcher
from xxnode.node.job_cgroup import JobCgroup
from xxnode.node.memory import JobRef, MemoryManager

log = logging.getLogger("xxnode")

ALL_CONTROLLERS = ("cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma", "misc")
SHIMS = "_shims"
DAEMON = "_daemon"


class StartupError(Exception):
    """The daemon cannot start; one line for the operator."""


class Host:
    """The node's hold on this machine: priority, state dir lock, cgroup tree, memory."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.degraded: list[str] = []
        self.watcher = PopulatedWatcher()
        self.lock_fd = -1
        self.rt_throttling: tuple[int, int] | None = None
        self.root: Cgroup | None = None
        self.rt_group: tuple[bool, str] = (False, "")
        self.withheld: dict[str, str] = {}
        self.enabled: set[str] = set()
        self.missing: list[str] = []
        self.shims: Cgroup | None = None
        self.memory: MemoryManager | None = None
        self.bpf: bpf.MemWatch | None = None

    @classmethod
    def setup(cls, cfg: NodeConfig, jobs: Callable[[], Iterable[JobRef]]) -> Host:
        """Everything that can fail before we accept work; `jobs` lists the running jobs
        for the memory manager."""
        h = cls(cfg)
        h._setup_sched()
        h._setup_state_dir()
        h._setup_cgroups()
        h._setup_memory(jobs)
        return h

    def job_dir(self, jid: str) -> Path:
        return self.cfg.state_dir / "jobs" / jid

    def job_cgroup(self, cls: str, jid: str) -> JobCgroup:
        return JobCgroup.of(self.root, cls, jid)

    def _setup_sched(self) -> None:
        prio = self.cfg.daemon_priority
        try:
            # reset-on-fork: nothing we start inherits our priority by accident; shims and
            # jobs set theirs explicitly
            sched.set_process_policy(os.getpid(), os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, prio)
        except OSError as e:
            raise StartupError(
                f"cannot run at SCHED_FIFO {prio}: {e.strerror} (needs root / CAP_SYS_NICE "
                "and RT runtime in the daemon's v1 cpu cgroup)"
            ) from None
        thr = self.rt_throttling = sched.rt_throttling()
        if thr is None:
            self.degraded.append("RT throttling settings unreadable")
        elif thr[0] < 0:
            self.degraded.append(
                "RT throttling is off (sched_rt_runtime_us=-1): SCHED_OTHER work can be starved "
                "by RT jobs; xxnode never changes it"
            )

    def _setup_state_dir(self) -> None:
        sd = self.cfg.state_dir
        try:
            sd.mkdir(parents=True, exist_ok=True)
            os.chmod(sd, 0o700)
            (sd / "jobs").mkdir(exist_ok=True)
            os.chmod(sd / "jobs", 0o711)  # job user needs no access; its cwd is elsewhere
            self.lock_fd = os.open(sd / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StartupError(f"state dir {sd}: {e.strerror}") from None
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StartupError(f"another xxnode owns the state dir {sd}") from None

    def _setup_cgroups(self) -> None:
        mount = find_cgroup2_mount()
        if mount is None:
            raise StartupError("no cgroup2 filesystem mounted")
        spec = self.cfg.cgroup_root
        if spec == "@self":
            self.root = Cgroup(mount / own_cgroup().lstrip("/"))
        else:
            rel = Path(spec.lstrip("/"))
            if ".." in rel.parts:
                raise StartupError(f"node.cgroup_root: must stay under {mount}, got {spec!r}")
            self.root = Cgroup(mount / rel)
        try:
            self.root.path.mkdir(parents=True, exist_ok=True)
            if spec == "@self":
                # no internal processes: leave the root to the subtree
                self.root.create(DAEMON).attach(os.getpid())
            available = self.root.controllers()
            self.rt_group = rt_group.detect()
            want = set(available)
            if self.rt_group[0] and "cpu" in want:
                want.discard("cpu")
                self.withheld["cpu"] = (
                    f"RT group scheduling is on ({self.rt_group[1]}): a cgroup with the cpu "
                    "controller gets no RT runtime, so SCHED_FIFO would be refused in it"
                )
            if self.rt_group[0] and "cpu" in available and self.root.has("cpu.weight"):
                self.degraded.append(
                    f"the cpu controller is enabled on {self.root.path} by its parent while RT "
                    "group scheduling is on: SCHED_FIFO jobs will be refused; disable cpu above"
                )
            if self.root.procs():
                raise StartupError(
                    f"{self.root.path} holds processes; a cgroup with controllers for its "
                    "children must not (use a fresh node.cgroup_root, or @self under systemd)"
                )
            self.enabled = self.root.enable(want)
            for c in self.cfg.classes:
                self.root.create(c.name).enable(self.enabled)
            self.rotate_shims()
        except CgroupError as e:
            raise StartupError(f"cgroup setup under {self.root.path}: {e}") from None
        missing = self.missing = [c for c in ALL_CONTROLLERS if c not in self.enabled]
        if missing:
            self.degraded.append(
                f"cgroup v2 controllers not available here: {' '.join(missing)} "
                f"(jobs still get their cgroup, SCHED_FIFO, cgroup.kill and cpu.stat"
                + ("; no pids.max" if "pids" in missing else "")
                + ("; no memory.peak" if "memory" in missing else "")
                + ")"
            )

    def _setup_memory(self, jobs: Callable[[], Iterable[JobRef]]) -> None:
        """The memory manager (class-ordered reclaim) and the eBPF counters it reports.
        Each missing piece is a named degraded mode, never a refusal to start."""
        managed = "memory" in self.enabled
        self.memory = MemoryManager(
            self.root, self.cfg.classes.ranks(), self.cfg.memory, jobs=jobs,
            memory_controller=managed, psi_ok=(self.root.path / "memory.pressure").exists(),
        )  # fmt: skip
        if not managed:
            self.degraded.append(
                "memory-unmanaged: no memory controller, so no class-ordered reclaim, swap "
                "limits or OOM groups; memory is watched through PSI and /proc/meminfo"
            )
        self.degraded += [f"memory: {problem}" for problem in self.memory.setup()]
        if managed and not swap.swap_devices():
            self.degraded.append(
                "no-swap: no swap device, so low classes cannot be swapped out; the OOM order "
                "by class is the only protection"
            )
        try:
            self.bpf = bpf.MemWatch.open()
            if self.bpf.missing:
                self.degraded.append(self.bpf.degraded())
        except bpf.BpfUnavailable as e:
            self.degraded.append(f"no-ebpf: {e}; per-job counters from cgroup files only")

    def rotate_shims(self) -> None:
        """Shims live in a cgroup created for this daemon run: a CLONE_INTO_CGROUP child dies
        at birth if its parent's cgroup and the target differ in kill_seq (6.14+, see
        kernel/clone3.c), and a fresh cgroup has never been killed. Empty ones of earlier
        runs go; those still holding adopted shims stay until they empty."""
        self.shims = self.root.create(f"{SHIMS}-{time.time_ns()}")
        self.remove_old_shims()

    def remove_old_shims(self) -> None:
        for cg in self.root.children():
            if cg.path.name.startswith(SHIMS) and cg.path != self.shims.path:
                try:
                    cg.remove()
                except CgroupError:
                    pass  # adopted shims still in it

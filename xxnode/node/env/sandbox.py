"""What a new environment's first process does to itself, as root, before it runs a line of
the function's code: into its cgroup, its own mount namespace, its class, its limits, its uid.

Runs in a freshly forked single-threaded child of the zygote (zygote.py), so plain Python
is safe here. The order matters: mounts and scheduling need root, so the uid goes last;
no_new_privs before it, so nothing the function execs can regain privilege.

The mount namespace a function sees:
    /            the host's tree, read-only (mount_setattr AT_RECURSIVE)
    /var/task    its code, read-only (a bind of the code store's tree for its digest)
    /bin/sh      bash, as on Lambda's images (Debian's is dash)
    /tmp         a private tmpfs of `tmp_size` bytes, the only writable place
    /dev/shm, /var/tmp   empty, read-only (Lambda has no shared memory either)
    hidden       the node's state dir (journal, jobs, code of every tenant) and its socket
                 directory: empty read-only tmpfs over each
    kept         the runtime's own directories (the interpreter, its packages, this
                 checkout) where a fresh tmpfs would hide them, e.g. a checkout in /tmp:
                 bound back read-only
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass

from xxnode.kernel import mount_ns

TASK_ROOT = "/var/task"
SH, BASH = "/bin/sh", "/bin/bash"
EMPTY_DIRS = ("/dev/shm", "/var/tmp")


@dataclass(frozen=True)
class Plan:
    cgroup: str  # the environment's leaf, a path under the cgroup2 mount
    uid: int
    gid: int
    code: str  # the unpacked code tree
    tmp_size: int
    hide: tuple[str, ...]
    policy: int
    priority: int
    max_processes: int
    join_cgroup: bool = False  # born elsewhere (no CLONE_INTO_CGROUP): move in first

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(**{**d, "hide": tuple(d["hide"])})


class SandboxError(Exception):
    """A step failed; the message names it."""


def enter(p: Plan) -> None:
    if p.join_cgroup:
        _step("cgroup", _join_cgroup, p.cgroup)
    _step("mount namespace", mount_ns.unshare_mounts)
    _step("/var/task", mount_ns.bind, p.code, TASK_ROOT, readonly=True)
    if os.path.exists(BASH) and os.path.realpath(SH) != os.path.realpath(BASH):
        # Lambda's OS images have bash as /bin/sh, and AWS's custom-runtime tutorial
        # (#!/bin/sh, `source`, `set -o pipefail`) depends on it
        _step("/bin/sh", mount_ns.bind, BASH, SH, readonly=True)
    _step("read-only root", mount_ns.make_tree_readonly, "/")
    runtime = runtime_dirs()
    _step("/tmp", mount_ns.tmpfs, "/tmp", size_bytes=p.tmp_size, keep=_below("/tmp", runtime))
    for d in EMPTY_DIRS:
        if os.path.isdir(d):
            _step(d, mount_ns.tmpfs, d, size_bytes=4096, readonly=True, keep=_below(d, runtime))
    for d in p.hide:
        if os.path.isdir(d):
            _step(f"hiding {d}", mount_ns.tmpfs, d, size_bytes=4096, mode=0o555, readonly=True)
    _step("chdir", os.chdir, TASK_ROOT)
    _step("rlimits", _limits, p.max_processes)
    _step("scheduling", os.sched_setscheduler, 0, p.policy, os.sched_param(p.priority))
    _step("no_new_privs", mount_ns.no_new_privs)
    _step("setgroups", os.setgroups, [])
    _step("setgid", os.setresgid, p.gid, p.gid, p.gid)
    _step("setuid", os.setresuid, p.uid, p.uid, p.uid)


def runtime_dirs() -> tuple[str, ...]:
    """Where this interpreter and its packages live: what an environment needs to run
    python and awslambdaric, wherever they were installed."""
    import xxnode

    found = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(xxnode.__file__))}
    found.update(p for p in sys.path if p)
    return tuple(sorted({os.path.realpath(p) for p in found if os.path.isdir(p)}))


def _below(top: str, dirs: tuple[str, ...]) -> tuple[str, ...]:
    """The outermost of `dirs` under `top` (sorted: a parent comes before what it holds)."""
    outer: list[str] = []
    for d in sorted(d for d in dirs if d.startswith(top + "/")):
        if not any(d.startswith(q + "/") for q in outer):
            outer.append(d)
    return tuple(outer)


def _step(what: str, fn, *args, **kw) -> None:
    try:
        fn(*args, **kw)
    except OSError as e:
        raise SandboxError(f"{what}: {e.strerror or e}") from None


def _join_cgroup(path: str) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write("0")


def _limits(max_processes: int) -> None:
    resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))  # the class is set for it, never by it
    resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))  # per uid
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

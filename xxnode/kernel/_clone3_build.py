"""cffi build script for xxnode.kernel._clone3 (out-of-line API mode; built by setup.py).

The C is in clone3.c; clone3.h holds what both sides share (stage codes, structs,
prototypes), and its XX_CDEF region is the cdef, so the two cannot drift apart.

Why C: after a raw clone3 in a threaded CPython, only async-signal-safe code may run in the
child. Everything between clone3 and execve (and the whole per-job shim) is therefore C that
makes raw syscalls through inline asm — no libc calls, no errno, no TLS, no PLT — because the
shim shares the daemon's address space (CLONE_VM) for its whole life.

Process tree of one job:

    xxnode ──clone3(CLONE_VM|CLONE_PIDFD|CLONE_CLEAR_SIGHAND|CLONE_INTO_CGROUP=_shims)──▶ shim S
    S ──clone3(CLONE_VM|CLONE_VFORK|CLONE_PIDFD|CLONE_INTO_CGROUP=<class>/<job>)──▶ job J ──execve

S claims the job (O_EXCL on <jobdir>/shim, flock held for its life), sets its own scheduling
(class priority + 1, so it can always enforce its job's timeout), clones J. J sets the class
policy while still root, RLIMIT_RTPRIO 0, no_new_privs, resets signals, dup2s stdio, drops to
the job user, chdirs and execs. S reports J's pid to the daemon, relays J's stdout/stderr into
<jobdir>/stdout|stderr up to a limit, kills J's cgroup at the deadline or when J exits, reaps J
and writes <jobdir>/exit atomically (write exit.tmp, rename). S outlives a crashed daemon, so
the exit status is never lost with it.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADER = HERE / "clone3.h"
SOURCE = HERE / "clone3.c"


def header_cdef(text: str) -> str:
    """The part of clone3.h between the XX_CDEF markers (cffi cannot parse the guards)."""
    begin, end = "/* XX_CDEF_BEGIN */", "/* XX_CDEF_END */"
    return text[text.index(begin) + len(begin) : text.index(end)]


def make_ffi() -> FFI:
    ffi = FFI()
    ffi.cdef(header_cdef(HEADER.read_text()))
    ffi.set_source(
        "xxnode.kernel._clone3",
        SOURCE.read_text(),
        include_dirs=[str(HERE)],
        depends=[str(HEADER), str(SOURCE)],
        # S shares the daemon's memory for its whole life: no stack canary read from the
        # caller's TLS, no memcpy/memset calls emitted through the PLT.
        extra_compile_args=[
            "-O2",
            "-fno-stack-protector",
            "-fno-builtin",
            "-fno-tree-loop-distribute-patterns",
        ],
    )
    return ffi


ffibuilder = make_ffi()

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parents[1]), verbose=True)

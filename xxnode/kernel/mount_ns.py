"""A sandbox's private mount namespace: the only module that calls unshare, mount,
mount_setattr or the prctls a sandbox child sets on itself.

The caller is a freshly forked, single-threaded child that builds its view of the file
system before it execs the function's runtime. Everything here acts on the calling thread's
namespace; nothing propagates back to the host, and the namespace dies with its last
process, so there is nothing to unmount afterwards. Python 3.11 has no os.unshare, hence
ctypes; every failure is OSError(errno).
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
ST_NOEXEC = 0x8  # statvfs f_flag
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
_NR_MOUNT_SETATTR = 442  # x86_64; the same on every arch (unified numbering from 424 up)
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
# int mount(const char *source, const char *target, const char *filesystemtype,
#           unsigned long mountflags, const void *data);
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
# int prctl(int option, unsigned long arg2, arg3, arg4, arg5) — variadic in glibc; pass full
# unsigned longs so the kernel, which checks the unused ones are 0, never sees stale bits.
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4


class _MountAttr(ctypes.Structure):
    # struct mount_attr { __u64 attr_set; __u64 attr_clr; __u64 propagation; __u64 userns_fd; };
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(r: int, what: str, path: str | os.PathLike | None = None) -> None:
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", None if path is None else os.fspath(path))


def _mount(src, dst, fstype, flags: int, data: str | None = None) -> None:
    r = _libc.mount(
        None if src is None else os.fsencode(src),
        os.fsencode(dst),
        None if fstype is None else fstype.encode(),
        flags,
        None if data is None else data.encode(),
    )
    _check(r, "mount", dst)


def _mount_setattr(path, attr_set: int, *, recursive: bool) -> None:
    attr = _MountAttr(attr_set, 0, 0, 0)
    r = _libc.syscall(
        _NR_MOUNT_SETATTR,
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.c_uint(AT_RECURSIVE if recursive else 0),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(r, "mount_setattr", path)


def unshare_mounts() -> None:
    """A private copy of our mount table. The copy starts in the host's peer groups (where
    "/" is shared, as under systemd, our mounts would appear on the host), so mark every
    mount private before mounting anything."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)


def bind(src, dst, *, readonly: bool, recursive: bool = False) -> None:
    """Bind `src` over `dst` (recursive: with the mounts below `src`). The bind takes no
    flags, so read-only is a second step: a bind remount for one mount (keeping the
    source's noexec; the kernel keeps atime flags), mount_setattr for a whole tree, since
    a remount would leave the submounts writable."""
    _mount(src, dst, None, MS_BIND | (MS_REC if recursive else 0))
    if not readonly:
        return
    if recursive:
        attrs = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
        _mount_setattr(dst, attrs, recursive=True)
        return
    keep = MS_NOEXEC if os.statvfs(dst).f_flag & ST_NOEXEC else 0
    _mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | keep)


def tmpfs(
    dst,
    *,
    size_bytes: int,
    mode: int = 0o1777,
    readonly: bool = False,
    nr_inodes: int | None = None,
    keep: tuple[str, ...] = (),
) -> None:
    """A fresh nosuid,nodev tmpfs; its pages are charged to the memory cgroup of whoever
    writes them, so the size bounds a sandbox's scratch space, not the host's.

    `keep`: directories below `dst` that must stay visible through it, read-only (the
    interpreter of a checkout under /tmp, say). Each is opened before the tmpfs hides it,
    then bound back from that fd (/proc/self/fd/N) onto a directory made in the tmpfs."""
    fds = [os.open(k, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for k in keep]
    try:
        opts = f"size={size_bytes},mode={mode:o}"
        if nr_inodes is not None:
            opts += f",nr_inodes={nr_inodes}"
        flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly and not keep else 0)
        _mount("tmpfs", dst, "tmpfs", flags, opts)
        for path, fd in zip(keep, fds, strict=True):
            os.makedirs(path, mode=0o755, exist_ok=True)
            bind(f"/proc/self/fd/{fd}", path, readonly=True, recursive=True)
        if readonly and keep:
            _mount(None, dst, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, opts)
    finally:
        for fd in fds:
            os.close(fd)


def make_tree_readonly(path="/") -> None:
    """Every mount at and below `path` read-only, in this namespace only (mount_setattr(2),
    Linux 5.12+). The kernel answers EBUSY if a mount has writers, so call it before the
    child opens anything for writing (fds inherited from before unshare point at the host's
    mounts, not our copies, and do not count)."""
    _mount_setattr(path, MOUNT_ATTR_RDONLY, recursive=True)


def no_new_privs() -> None:
    """execve can no longer grant privileges (setuid bits, file capabilities); inherited by
    every descendant and irrevocable."""
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def set_pdeathsig(sig: int, *, parent_pid: int | None = None) -> None:
    """Get `sig` when the parent *thread* that forked us exits. If the parent died before
    we asked, no signal will come: pass the parent's pid (its os.getpid() taken before the
    fork) and, if we have already been reparented, the signal is sent to ourselves now."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)

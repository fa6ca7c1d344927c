"""mount_ns on this host's kernel: every test builds its namespace in a forked child, which
reports through a pipe while the parent checks the host's view. The namespace dies with the
child, so nothing stays mounted; a test that needs a grandchild also proves it is gone."""

from __future__ import annotations

import errno
import os
import pickle
import re
import select
import signal
import struct
import traceback
from pathlib import Path

import pytest

from xxnode.kernel import mount_ns

MiB = 1 << 20
MS_SHARED = 1 << 20


def in_child(fn, while_alive=None):
    """Run fn() in a forked child and return its (picklable) result. `while_alive(result)`
    runs in the parent while the child and its namespace still exist."""
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(report_r)
            os.close(go_w)
            try:
                msg = ("ok", fn())
            except BaseException:
                msg = ("err", traceback.format_exc())
            data = pickle.dumps(msg)
            # length-prefixed, so the parent never waits for EOF (a grandchild may hold the fd)
            with os.fdopen(report_w, "wb") as f:
                f.write(struct.pack("=Q", len(data)) + data)
            os.read(go_r, 1)
            code = 0 if msg[0] == "ok" else 1
        finally:
            os._exit(code)
    os.close(report_w)
    os.close(go_r)
    msg = ("err", "child died without a report")
    try:
        with os.fdopen(report_r, "rb") as f:
            head = f.read(8)
            if len(head) == 8:
                msg = pickle.loads(f.read(struct.unpack("=Q", head)[0]))
        if msg[0] == "ok" and while_alive is not None:
            while_alive(msg[1])
    finally:
        os.close(go_w)
        _, status = os.waitpid(pid, 0)
    if msg[0] != "ok":
        pytest.fail(f"child failed:\n{msg[1]}")
    assert os.waitstatus_to_exitcode(status) == 0
    return msg[1]


def mounts() -> dict[str, tuple[str, set[str]]]:
    """/proc/self/mountinfo, e.g.
      36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    -> {mount point: (fstype, per-mount options | super options)}; the top mount wins."""
    out = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, post = line.split(" - ", 1)
        f, g = pre.split(), post.split()
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), f[4])
        out[point] = (g[0], set(f[5].split(",")) | set(g[2].split(",")))
    return out


def errno_of(fn, *args) -> int:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


def write(path, data: bytes = b"x") -> None:
    with open(path, "ab") as f:
        f.write(data)


def no_host_mounts_under(root: Path) -> None:
    assert not [p for p in mounts() if p.startswith(str(root))]


def test_tmpfs_is_seen_by_the_child_only(tmp_path):
    d = tmp_path / "scratch"
    d.mkdir()

    def child():
        mount_ns.unshare_mounts()
        mount_ns.tmpfs(d, size_bytes=MiB)
        write(d / "hello")
        st = os.stat(d)
        return mounts().get(str(d)), st.st_mode & 0o7777, st.st_dev

    def host(got):
        no_host_mounts_under(tmp_path)
        assert os.listdir(d) == []
        assert os.stat(d).st_dev != got[2]

    (fstype, opts), mode, _ = in_child(child, host)
    assert fstype == "tmpfs"
    assert {"nosuid", "nodev", "rw", "size=1024k"} <= opts  # mode=1777 is the default, unshown
    assert mode == 0o1777
    no_host_mounts_under(tmp_path)


@pytest.mark.parametrize("readonly", [False, True])
def test_tmpfs_keeps_what_it_is_told_to_keep_read_only(tmp_path, readonly):
    """A checkout (and its venv) under /tmp must survive the environment's fresh /tmp."""
    top = tmp_path / "top"
    kept = top / "checkout" / "venv"
    kept.mkdir(parents=True)
    (kept / "python").write_text("interpreter")
    (top / "checkout" / "secret").write_text("not kept")
    (top / "other").write_text("not kept")

    def child():
        mount_ns.unshare_mounts()
        mount_ns.tmpfs(top, size_bytes=MiB, readonly=readonly, keep=(str(kept),))
        seen = {
            "top": sorted(os.listdir(top)),
            "checkout": sorted(os.listdir(top / "checkout")),
            "python": (kept / "python").read_text(),
            "write_kept": _errno(lambda: (kept / "x").write_text("x")),
            "write_top": _errno(lambda: (top / "new").write_text("x")),
        }
        return seen

    got = in_child(child)
    assert got["top"] == ["checkout"] and got["checkout"] == ["venv"]
    assert got["python"] == "interpreter"
    assert got["write_kept"] == errno.EROFS
    assert got["write_top"] == (errno.EROFS if readonly else 0)
    assert not (kept / "x").exists() and (top / "other").exists()  # the host's tree untouched
    no_host_mounts_under(tmp_path)


def _errno(fn) -> int:
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno


def test_private_stops_propagation_back(tmp_path):
    """Where the parent's mount is shared (systemd makes "/" shared), a bare unshare would
    leave the child's copy in the same peer group: its mounts would appear in the parent.
    Build such a parent in a namespace of its own, and check both ways."""
    d = tmp_path / "shared"
    d.mkdir()

    def parent():
        mount_ns.unshare_mounts()
        mount_ns.tmpfs(d, size_bytes=MiB)
        mount_ns._mount(None, d, None, MS_SHARED)
        (d / "bare").mkdir()
        (d / "private").mkdir()
        seen = {}

        def bare():  # CLONE_NEWNS without the MS_PRIVATE step: the control
            if mount_ns._libc.unshare(mount_ns.CLONE_NEWNS) < 0:
                raise OSError(errno.EPERM, "unshare")
            mount_ns.tmpfs(d / "bare", size_bytes=MiB)

        def private():
            mount_ns.unshare_mounts()
            mount_ns.tmpfs(d / "private", size_bytes=MiB)

        in_child(bare, lambda _: seen.update(bare=str(d / "bare") in mounts()))
        in_child(private, lambda _: seen.update(private=str(d / "private") in mounts()))
        return seen

    assert in_child(parent) == {"bare": True, "private": False}
    no_host_mounts_under(tmp_path)


def test_bind_readonly_refuses_root(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_text("before")

    def child():
        mount_ns.unshare_mounts()
        mount_ns.bind(src, dst, readonly=True)
        return (
            (dst / "f").read_text(),
            errno_of(write, dst / "f"),
            errno_of(os.mkdir, dst / "new"),
            errno_of(write, src / "f", b"+child"),  # the source stays writable
            mounts()[str(dst)][1],
        )

    text, write_err, mkdir_err, src_err, opts = in_child(child)
    assert text == "before"
    assert write_err == mkdir_err == errno.EROFS
    assert src_err == 0 and (src / "f").read_text() == "before+child"
    assert {"ro", "nosuid", "nodev"} <= opts
    no_host_mounts_under(tmp_path)


def test_bind_readonly_keeps_noexec(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()

    def child():
        mount_ns.unshare_mounts()
        mount_ns._mount("tmpfs", src, "tmpfs", mount_ns.MS_NOEXEC, "size=64k")
        mount_ns.bind(src, dst, readonly=True)
        return mounts()[str(dst)][1]

    assert {"ro", "noexec", "nosuid", "nodev"} <= in_child(child)


def test_bind_recursive_readonly_covers_submounts(tmp_path):
    src, dst, flat = tmp_path / "src", tmp_path / "dst", tmp_path / "flat"
    for p in (src, src / "sub", dst, flat):
        p.mkdir()

    def child():
        mount_ns.unshare_mounts()
        mount_ns.tmpfs(src / "sub", size_bytes=MiB)
        write(src / "sub" / "f")
        mount_ns.bind(src, dst, readonly=True, recursive=True)
        mount_ns.bind(src, flat, readonly=True)
        return (
            errno_of(write, dst / "sub" / "f"),
            errno_of(write, dst / "g"),
            sorted(os.listdir(flat / "sub")),  # not recursive: the submount is not carried
            errno_of(write, src / "sub" / "f"),
        )

    assert in_child(child) == (errno.EROFS, errno.EROFS, [], 0)
    no_host_mounts_under(tmp_path)


def test_make_tree_readonly_in_the_child_only(tmp_path):
    f = tmp_path / "f"
    f.write_text("host")
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    def child():
        mount_ns.unshare_mounts()
        mount_ns.make_tree_readonly("/")
        # the sandbox pattern: everything read-only, then a writable scratch tmpfs on top
        mount_ns.tmpfs(scratch, size_bytes=MiB)
        return (
            errno_of(write, f),
            errno_of((tmp_path / "new").mkdir),
            errno_of(write, "/dev/shm/xx-mount-ns-test"),
            errno_of(write, scratch / "ok"),
            sorted(p for p, (_, o) in mounts().items() if "ro" not in o),
        )

    def host(_):
        write(f, b"+host")  # the parent writes while the child's tree is read-only

    f_err, mkdir_err, shm_err, scratch_err, writable = in_child(child, host)
    assert f_err == mkdir_err == shm_err == errno.EROFS
    assert scratch_err == 0
    assert writable == [str(scratch)]
    assert f.read_text() == "host+host"
    assert not (tmp_path / "new").exists()
    no_host_mounts_under(tmp_path)


def test_tmpfs_limits(tmp_path):
    big, few, ro, mode = (tmp_path / n for n in ("big", "few", "ro", "mode"))
    for p in (big, few, ro, mode):
        p.mkdir()

    def child():
        mount_ns.unshare_mounts()
        mount_ns.tmpfs(big, size_bytes=MiB)
        written, err = 0, 0
        with open(big / "fill", "wb") as fh:
            chunk = b"\0" * 65536
            try:
                while written < 2 * MiB:
                    written += fh.write(chunk)
                    fh.flush()
            except OSError as e:
                err = e.errno
        mount_ns.tmpfs(few, size_bytes=MiB, nr_inodes=4)
        files, ierr = 0, 0
        try:
            while files < 100:
                write(few / str(files))
                files += 1
        except OSError as e:
            ierr = e.errno
        mount_ns.tmpfs(ro, size_bytes=MiB, readonly=True)
        mount_ns.tmpfs(mode, size_bytes=MiB, mode=0o750)
        return err, written, ierr, files, errno_of(write, ro / "x"), os.stat(mode).st_mode & 0o7777

    err, written, ierr, files, ro_err, mode_bits = in_child(child)
    assert err == errno.ENOSPC and written <= MiB
    assert ierr == errno.ENOSPC and files < 4
    assert ro_err == errno.EROFS
    assert mode_bits == 0o750
    no_host_mounts_under(tmp_path)


def no_new_privs_flag() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("NoNewPrivs:"):
            return int(line.split()[1])
    raise AssertionError("no NoNewPrivs in /proc/self/status")


def test_no_new_privs_is_set_and_inherited():
    def child():
        before = no_new_privs_flag()
        mount_ns.no_new_privs()
        return before, no_new_privs_flag(), in_child(no_new_privs_flag)

    assert in_child(child) == (0, 1, 1)
    assert no_new_privs_flag() == 0


PR_SET_CHILD_SUBREAPER = 36


def reaped(c) -> int:
    """Run `c` (which forks G, returns G's pid and exits) under a subreaper S, so the
    orphaned G is S's to reap, not pid 1's. Returns G's wait status; a G that outlives
    its parent by 10 s is killed and fails the test."""

    def s():
        if mount_ns._libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0:
            raise OSError(errno.EPERM, "PR_SET_CHILD_SUBREAPER")
        fds = []
        g = in_child(c, lambda g: fds.append(os.pidfd_open(g)))
        ready, _, _ = select.select(fds, [], [], 10)
        if not ready:
            signal.pidfd_send_signal(fds[0], signal.SIGKILL)
        _, status = os.waitpid(g, 0)
        os.close(fds[0])
        return bool(ready), status

    exited, status = in_child(s)
    assert exited, "G outlived its parent"
    return status


def _pause_forever():
    while True:
        signal.pause()


def test_pdeathsig_kills_the_orphan():
    """Child C forks G; G arms SIGKILL-on-parent-death and waits forever; C exits; G dies."""

    def c():
        armed_r, armed_w = os.pipe()
        g = os.fork()
        if g == 0:
            try:
                mount_ns.set_pdeathsig(signal.SIGKILL)
                os.write(armed_w, b"a")
                _pause_forever()
            finally:
                os._exit(1)
        assert os.read(armed_r, 1) == b"a"
        return g

    status = reaped(c)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_pdeathsig_parent_already_gone():
    """G arms only after C has exited: no signal would come, so parent_pid makes G signal
    itself (or, if G was quicker than C's reparenting, the kernel signals it)."""

    def c():
        parent = os.getpid()
        hold_r, hold_w = os.pipe()
        g = os.fork()
        if g == 0:
            try:
                os.close(hold_w)
                os.read(hold_r, 1)  # EOF: C has exited
                mount_ns.set_pdeathsig(signal.SIGKILL, parent_pid=parent)
                _pause_forever()
            finally:
                os._exit(1)
        return g

    status = reaped(c)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

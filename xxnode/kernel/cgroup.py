"""cgroup v2: the only module that reads or writes cgroupfs.

XX puts every job in a cgroup of its own so the kernel, not the daemon, enforces what
the class decides, and so a restarted daemon can find its jobs again in the tree.
Every file format we parse is shown beside its parser.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = "/proc/self/mountinfo"


class CgroupError(OSError):
    """A cgroupfs operation failed; the message names the file."""


def find_cgroup2_mount(mountinfo: str = MOUNTINFO) -> Path | None:
    """The first cgroup2 mount point, or None.

    /proc/self/mountinfo lines look like
      35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid,... shared:9 - cgroup2 cgroup2 rw,...
    fields after " - " are: fstype, source, super options.
    """
    try:
        text = Path(mountinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        if sep and post.split(" ", 1)[0] == "cgroup2":
            return Path(pre.split(" ")[4].replace("\\040", " "))
    return None


def own_cgroup(pid: int | str = "self") -> str:
    """This process's cgroup v2 path relative to the mount, from /proc/PID/cgroup ("0::/a/b")."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return "/"


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Flat keyed files (cpu.stat, memory.stat, memory.events, cgroup.events):
    "usage_usec 1234\\nuser_usec 1000\\n" -> {"usage_usec": 1234, ...}. Non-integers are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            continue
    return out


@dataclass(frozen=True)
class Cgroup:
    """One cgroup directory. Cheap to make; nothing is touched until a method is called."""

    path: Path

    # -- tree -------------------------------------------------------------------------
    def child(self, name: str) -> Cgroup:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"bad cgroup name {name!r}")
        return Cgroup(self.path / name)

    def create(self, name: str, exist_ok: bool = True) -> Cgroup:
        cg = self.child(name)
        try:
            cg.path.mkdir(exist_ok=exist_ok)
        except OSError as e:
            raise CgroupError(e.errno, f"mkdir {cg.path}: {e.strerror}") from None
        return cg

    def exists(self) -> bool:
        return (self.path / "cgroup.procs").exists()

    def children(self) -> list[Cgroup]:
        try:
            return sorted(Cgroup(p) for p in self.path.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

    def remove(self) -> None:
        """rmdir; the cgroup must hold no processes (kill and wait for `populated 0` first)."""
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise CgroupError(e.errno, f"rmdir {self.path}: {e.strerror}") from None

    def remove_tree(self) -> None:
        for c in self.children():
            c.remove_tree()
        self.remove()

    def __lt__(self, other: Cgroup) -> bool:
        return str(self.path) < str(other.path)

    @property
    def id(self) -> int:
        """The cgroup id BPF sees (bpf_get_current_cgroup_id) is the directory's inode number."""
        return os.stat(self.path).st_ino

    # -- raw file I/O -----------------------------------------------------------------
    def has(self, filename: str) -> bool:
        return (self.path / filename).exists()

    def read(self, filename: str) -> str:
        try:
            return (self.path / filename).read_text()
        except OSError as e:
            raise CgroupError(e.errno, f"read {self.path / filename}: {e.strerror}") from None

    def write(self, filename: str, value: str | int) -> None:
        """One write(2) per call: cgroupfs acts on each write, so never buffer or split it."""
        path = self.path / filename
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as e:
            raise CgroupError(e.errno, f"open {path}: {e.strerror}") from None
        try:
            os.write(fd, str(value).encode())
        except OSError as e:
            raise CgroupError(e.errno, f"write {value!r} to {path}: {e.strerror}") from None
        finally:
            os.close(fd)

    def read_int(self, filename: str) -> int | None:
        """Single-value files ("123\\n" or "max\\n"); None for "max" or a missing file."""
        try:
            text = self.read(filename).strip()
        except CgroupError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return None if text == "max" else int(text)

    def read_keyed(self, filename: str) -> dict[str, int]:
        try:
            return parse_flat_keyed(self.read(filename))
        except CgroupError as e:
            if e.errno == errno.ENOENT:
                return {}
            raise

    # -- controllers ------------------------------------------------------------------
    def controllers(self) -> set[str]:
        """cgroup.controllers: "cpuset cpu io memory pids" — what the parent delegates here."""
        return set(self.read("cgroup.controllers").split())

    def subtree_control(self) -> set[str]:
        return set(self.read("cgroup.subtree_control").split())

    def enable(self, controllers: set[str] | list[str]) -> set[str]:
        """Enable each controller for the children, one write each so one refusal (e.g. cpu
        under RT group scheduling) does not take the others with it. Returns those enabled."""
        done = set()
        for c in sorted(controllers):
            try:
                self.write("cgroup.subtree_control", f"+{c}")
                done.add(c)
            except CgroupError:
                continue
        return done

    # -- processes --------------------------------------------------------------------
    def procs(self) -> list[int]:
        """cgroup.procs: one pid per line."""
        try:
            return [int(x) for x in self.read("cgroup.procs").split()]
        except CgroupError as e:
            if e.errno == errno.ENOENT:
                return []
            raise

    def threads(self) -> list[int]:
        try:
            return [int(x) for x in self.read("cgroup.threads").split()]
        except CgroupError as e:
            if e.errno == errno.ENOENT:
                return []
            raise

    def attach(self, pid: int) -> None:
        self.write("cgroup.procs", pid)

    def kill(self) -> None:
        """cgroup.kill (5.14+): SIGKILL every process in the subtree, forks in flight included."""
        self.write("cgroup.kill", 1)

    def freeze(self, frozen: bool = True) -> None:
        self.write("cgroup.freeze", 1 if frozen else 0)

    def events(self) -> dict[str, int]:
        """cgroup.events: "populated 1\\nfrozen 0\\n"."""
        return self.read_keyed("cgroup.events")

    def populated(self) -> bool:
        return bool(self.events().get("populated", 0))

    # -- accounting -------------------------------------------------------------------
    def cpu_stat(self) -> dict[str, int]:
        """cpu.stat: "usage_usec N\\nuser_usec N\\nsystem_usec N\\n..." (core file: no controller needed)."""
        return self.read_keyed("cpu.stat")

    def memory_stat(self) -> dict[str, int]:
        """memory.stat: "anon N\\nfile N\\n...\\nzswap N\\nzswapped N\\n..." bytes, or event counts."""
        return self.read_keyed("memory.stat")

    def memory_events(self) -> dict[str, int]:
        """memory.events: "low N\\nhigh N\\nmax N\\noom N\\noom_kill N\\n"."""
        return self.read_keyed("memory.events")


def root() -> Cgroup | None:
    mount = find_cgroup2_mount()
    return Cgroup(mount) if mount else None

"""Wake up when a cgroup empties, without polling: cgroup.events and epoll.

The kernel calls kernfs_notify() on cgroup.events whenever "populated" or "frozen" flips;
an open cgroup.events file then polls as EPOLLPRI until it is read again. So one epoll
instance watches every job leaf, and its fd can sit in an asyncio loop (add_reader).

    cgroup.events:  populated 1
                    frozen 0
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable
from pathlib import Path

from xxnode.kernel.cgroup import Cgroup, parse_flat_keyed


def _populated(fd: int) -> bool:
    os.lseek(fd, 0, os.SEEK_SET)  # re-reading also re-arms the notification
    return bool(parse_flat_keyed(os.read(fd, 4096).decode()).get("populated", 0))


class PopulatedWatcher:
    """Calls back once per watch, when the cgroup holds no process (at once if already so)."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._watches: dict[int, tuple[Path, Callable[[], None]]] = {}

    def fileno(self) -> int:
        return self._ep.fileno()

    def watch(self, cg: Cgroup, callback: Callable[[], None]) -> None:
        try:
            fd = os.open(cg.path / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            callback()  # no cgroup, no processes
            return
        try:
            self._ep.register(fd, select.EPOLLPRI)
        except PermissionError:  # a regular file, not kernfs (a fake tree): it never notifies
            populated = _populated(fd)
            os.close(fd)
            if not populated:
                callback()
            return
        self._watches[fd] = (cg.path, callback)
        if not _populated(fd):
            self._fire(fd)

    def watching(self, cg: Cgroup) -> bool:
        return any(path == cg.path for path, _ in self._watches.values())

    def _fire(self, fd: int) -> None:
        _, callback = self._watches.pop(fd)
        self._ep.unregister(fd)
        os.close(fd)
        callback()

    def handle_ready(self) -> None:
        """Handle ready watches; call when fileno() is readable."""
        for fd, _ in self._ep.poll(0):
            if fd in self._watches and not _populated(fd):
                self._fire(fd)

    def wait(self, cg: Cgroup, timeout: float | None = None) -> bool:
        """Blocking form for tools and tests: True once empty, False on timeout."""
        done: list[bool] = []
        self.watch(cg, lambda: done.append(True))
        deadline = None if timeout is None else _now() + timeout
        while not done and self.watching(cg):
            left = None if deadline is None else max(0.0, deadline - _now())
            if left == 0.0:
                break
            if self._ep.poll(left):
                self.handle_ready()
        if not done:
            for fd, (path, _) in list(self._watches.items()):
                if path == cg.path:
                    self._watches.pop(fd)
                    self._ep.unregister(fd)
                    os.close(fd)
        return bool(done)

    def close(self) -> None:
        for fd in list(self._watches):
            self._ep.unregister(fd)
            os.close(fd)
        self._watches.clear()
        self._ep.close()


def _now() -> float:
    return time.monotonic()

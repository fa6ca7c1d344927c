"""Pressure stall information: the only module that reads PSI files or arms PSI triggers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PRESSURE_DIR = Path("/proc/pressure")


@dataclass(frozen=True)
class Pressure:
    avg10: float
    avg60: float
    avg300: float
    total_us: int


def parse_pressure(text: str) -> dict[str, Pressure]:
    """/proc/pressure/memory and cgroup memory.pressure:
      some avg10=0.00 avg60=0.00 avg300=0.00 total=0
      full avg10=0.00 avg60=0.00 avg300=0.00 total=0
    -> {"some": Pressure(...), "full": Pressure(...)}"""
    out = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        kv = dict(f.split("=", 1) for f in fields)
        out[kind] = Pressure(
            float(kv["avg10"]), float(kv["avg60"]), float(kv["avg300"]), int(kv["total"])
        )
    return out


def read_pressure(path: str | os.PathLike) -> dict[str, Pressure]:
    return parse_pressure(Path(path).read_text())


class Trigger:
    """A PSI trigger: the kernel wakes poll(POLLPRI) when stall time in `window_us` exceeds
    `stall_us`. Unprivileged writers (no CAP_SYS_RESOURCE) need a window that is a multiple
    of 2 s; the kernel answers EINVAL otherwise. The trigger lives as long as the fd."""

    def __init__(self, path: str | os.PathLike, kind: str, stall_us: int, window_us: int):
        if kind not in ("some", "full"):
            raise ValueError(f"PSI trigger kind must be some or full, not {kind!r}")
        self.path = Path(path)
        self.spec = f"{kind} {stall_us} {window_us}"
        self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)
        try:
            os.write(self.fd, self.spec.encode() + b"\0")
        except OSError:
            os.close(self.fd)
            raise

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Trigger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""System-wide memory counters: the only module that reads /proc/meminfo and /proc/vmstat."""

from __future__ import annotations

from pathlib import Path

KiB = 1024


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo: "MemTotal:       24567890 kB\\nHugePages_Total:       0\\n" -> bytes
    (lines without a unit are counts and kept as they are)."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[key] = int(parts[0]) * (KiB if parts[1:] == ["kB"] else 1)
    return out


def meminfo() -> dict[str, int]:
    return parse_meminfo(Path("/proc/meminfo").read_text())


def vmstat() -> dict[str, int]:
    """/proc/vmstat: "pswpout 123\\nzswpout 45\\n" event counters (pages)."""
    out = {}
    for line in Path("/proc/vmstat").read_text().splitlines():
        key, _, value = line.partition(" ")
        out[key] = int(value)
    return out


def swap_written() -> int:
    """Bytes written to swap since boot, the device's and zswap's together: what a push-out
    cost, as opposed to what it freed (a clean page is dropped without a write)."""
    v = vmstat()
    return (v.get("pswpout", 0) + v.get("zswpout", 0)) * 4096

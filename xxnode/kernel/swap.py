"""Swap devices and zswap: the only module that reads /proc/swaps or zswap's parameters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC_SWAPS = Path("/proc/swaps")
ZSWAP_PARAMS = Path("/sys/module/zswap/parameters")


@dataclass(frozen=True)
class SwapDevice:
    name: str
    kind: str
    size_kib: int
    used_kib: int
    priority: int


def parse_swaps(text: str) -> list[SwapDevice]:
    """/proc/swaps:
    Filename    Type       Size     Used   Priority
    /dev/vda    partition  1048572  0      -2
    """
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) >= 5:
            out.append(SwapDevice(f[0], f[1], int(f[2]), int(f[3]), int(f[4])))
    return out


def swap_devices() -> list[SwapDevice]:
    try:
        return parse_swaps(PROC_SWAPS.read_text())
    except OSError:
        return []


def zswap_params() -> dict[str, str]:
    """Each file under /sys/module/zswap/parameters holds one value: enabled "Y", compressor "lzo"..."""
    if not ZSWAP_PARAMS.is_dir():
        return {}
    return {p.name: p.read_text().strip() for p in ZSWAP_PARAMS.iterdir()}


def set_zswap_param(name: str, value: str) -> None:
    (ZSWAP_PARAMS / name).write_text(value)

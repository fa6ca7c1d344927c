"""Per-process knobs under /proc, and the syscalls that act on another process's memory.

The OOM killer ranks tasks by oom_score_adj (-1000..1000) plus their share of memory; XX
sets it by class so the kernel's last resort follows the class order too. process_madvise
lets the daemon fault a job's swapped memory back in before the job needs it, or push a
range of it out; /proc/PID/pagemap says which pages of a range are in RAM, and
process_vm_readv reads a range (a read fault keeps a swapped page's copy in swap, so the page
comes back clean — the memory manager's clean reserve rests on that).
"""

from __future__ import annotations

import ctypes
import os
from array import array
from pathlib import Path

_NR_PROCESS_MADVISE = 440  # x86_64
MADV_WILLNEED = 3
MADV_PAGEOUT = 21
_IOV_MAX = 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
_PM_PRESENT = 63  # /proc/PID/pagemap: bit 63 page present in RAM (bit 62: swapped)
_libc = ctypes.CDLL(None, use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


CAP_SYS_RESOURCE = 24


def has_capability(bit: int, pid: int | str = "self") -> bool:
    """From /proc/PID/status "CapEff:\t000001ffffffffff" (a hex bitmask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def set_oom_score_adj(pid: int, value: int) -> None:
    Path(f"/proc/{pid}/oom_score_adj").write_text(str(value))


def oom_score_adj(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


def anon_ranges(pid: int) -> list[tuple[int, int]]:
    """Private anonymous (and heap/stack) mappings of a process, from /proc/PID/maps:
      7f12a4000000-7f12a8000000 rw-p 00000000 00:00 0
      5581c8a2b000-5581c8a4c000 rw-p 00000000 00:00 0          [heap]
    Only writable private mappings without a backing file can hold swapped pages."""
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        f = line.split()
        if len(f) < 5 or f[1][:2] != "rw" or f[1][3] != "p":
            continue
        if len(f) >= 6 and not f[5].startswith("["):
            continue  # file-backed
        if len(f) >= 6 and f[5] in ("[vvar]", "[vdso]", "[vsyscall]"):
            continue
        lo, hi = (int(x, 16) for x in f[0].split("-"))
        out.append((lo, hi - lo))
    return out


def process_madvise(pidfd: int, ranges: list[tuple[int, int]], advice: int) -> int:
    """Advise another process's memory; returns bytes advised. Batches at IOV_MAX."""
    done = 0
    for i in range(0, len(ranges), _IOV_MAX):
        batch = ranges[i : i + _IOV_MAX]
        iov = (_Iovec * len(batch))(*[_Iovec(a, n) for a, n in batch])
        r = _libc.syscall(_NR_PROCESS_MADVISE, pidfd, iov, len(batch), advice, 0)
        if r < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"process_madvise: {os.strerror(err)}")
        done += r
    return done


def prefetch(pid: int) -> int:
    """Ask the kernel to read a process's swapped anonymous pages back in (MADV_WILLNEED)."""
    fd = os.pidfd_open(pid)
    try:
        return process_madvise(fd, anon_ranges(pid), MADV_WILLNEED)
    finally:
        os.close(fd)


def pageout(pid: int, ranges: list[tuple[int, int]]) -> int:
    """Push a process's ranges out (MADV_PAGEOUT): a clean page (its copy still in swap) is
    dropped at once, a dirty one written to swap first. Returns bytes advised."""
    fd = os.pidfd_open(pid)
    try:
        return process_madvise(fd, ranges, MADV_PAGEOUT)
    finally:
        os.close(fd)


def present_pages(pid: int, addr: int, length: int) -> int:
    """Pages of [addr, addr+length) in RAM, from /proc/PID/pagemap (8 bytes a page)."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        data = f.read(length // PAGE * 8)
    entries = array("Q")
    entries.frombytes(data[: len(data) // 8 * 8])
    return sum(e >> _PM_PRESENT for e in entries)


def read_range(pid: int, addr: int, length: int, block: int = 1 << 20) -> int:
    """Read [addr, addr+length) of another process (process_vm_readv) into a scratch
    buffer, faulting its pages in as reads. Returns bytes read (less if the range ends)."""
    buf = ctypes.create_string_buffer(block)
    local = _Iovec(ctypes.addressof(buf), block)
    done = 0
    while done < length:
        n = min(block, length - done)
        local.len = n
        remote = _Iovec(addr + done, n)
        r = _libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if r < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"process_vm_readv: {os.strerror(err)}")
        if r == 0:
            break
        done += r
    return done

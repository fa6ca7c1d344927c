"""The syscalls the clean reserve rests on, against a real process on this kernel:
/proc/PID/pagemap says which pages of a range are in RAM, process_vm_readv faults a range
in as reads, MADV_PAGEOUT is accepted (this host has no swap, so anonymous pages stay; the
VM lane's tests/vm/test_memory.py shows them go and come back clean)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xxnode.kernel import proc

MiB = 1 << 20
CHILD = r"""
import mmap, sys
m = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, 32 << 20, 4096):  # the first half touched, the second not
    m[i] = 1
print("ready", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def child():
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout.readline().strip() == "ready"
    yield p
    p.stdin.close()
    p.wait(10)


def test_pagemap_tells_touched_from_untouched_and_a_remote_read_faults_pages_in(child):
    (start,) = [a for a, n in proc.anon_ranges(child.pid) if n >= 64 * MiB]
    touched, untouched = start, start + 32 * MiB
    assert proc.present_pages(child.pid, touched, 32 * MiB) == 32 * MiB // proc.PAGE
    assert proc.present_pages(child.pid, untouched, 32 * MiB) == 0
    assert proc.read_range(child.pid, untouched, 8 * MiB) == 8 * MiB
    assert proc.present_pages(child.pid, untouched, 8 * MiB) == 8 * MiB // proc.PAGE
    # pageout is accepted on a live process; with no swap the anonymous pages stay
    assert proc.pageout(child.pid, [(untouched, 8 * MiB)]) == 8 * MiB


def test_a_gone_process_is_an_oserror_not_a_crash(child):
    pid = child.pid
    child.stdin.close()
    child.wait(10)
    with pytest.raises(OSError):
        proc.read_range(pid, 0x10000, MiB)
    with pytest.raises(OSError):
        proc.pageout(pid, [(0x10000, MiB)])

"""memwatch on this host's kernel (6.18): build the CO-RE object, load it, attach it, and see
it count a child's page faults against the child's own cgroup.

The host's cgroup v2 has no memory controller and no swap, so reclaim and OOM are the VM
lane's business (tests/vm/test_bpf.py); here the page-fault path, the loader and its
degraded modes are checked for real.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from xxnode.kernel import bpf
from xxnode.kernel.cgroup import Cgroup, find_cgroup2_mount

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
PAGE = 4096

# The child: wait until the parent has moved it into the scratch cgroup, fault in N MiB of
# fresh anonymous memory one 4 KiB page at a time (no THP: one fault per page), report, then
# wait to be released so the cgroup stays populated while the parent reads the counters.
CHILD = """
import mmap, os, sys
go, done, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
os.read(go, 1)
if n:
    m = mmap.mmap(-1, n)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    for off in range(0, n, 4096):
        m[off] = 1
os.write(done, b"d")
os.read(go, 1)
"""


@pytest.fixture(scope="session")
def obj() -> Path:
    """Build the object as CI does; a build failure fails the lane loudly."""
    subprocess.run(["make", "-s", "-C", str(REPO / "ebpf")], check=True)
    path = REPO / "ebpf" / "memwatch.bpf.o"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def mw(obj):
    w = bpf.MemWatch.open(obj)
    yield w
    w.close()


@pytest.fixture
def scratch():
    """A fresh cgroup v2 directory, removed afterwards (its processes killed first)."""
    root = find_cgroup2_mount()
    assert root is not None, "no cgroup2 mount"
    cg = Cgroup(root).create(f"xx-test-bpf-{uuid.uuid4().hex[:8]}", exist_ok=False)
    yield cg
    if cg.procs():
        cg.kill()
    for _ in range(500):  # cgroup.kill is asynchronous: rmdir works once the last task is gone
        try:
            cg.remove()
            break
        except OSError:
            time.sleep(0.01)
    assert not cg.path.exists()


class Faulter:
    """A child parked on a pipe; `fault()` moves it into `cg` first, then lets it fault."""

    def __init__(self, nbytes: int):
        self.go_r, self.go_w = os.pipe()
        self.done_r, self.done_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(self.go_r), str(self.done_w), str(nbytes)],
            pass_fds=(self.go_r, self.done_w),
        )
        os.close(self.go_r)
        os.close(self.done_w)

    def fault(self, cg: Cgroup) -> None:
        cg.attach(self.proc.pid)
        os.write(self.go_w, b"g")
        assert os.read(self.done_r, 1) == b"d", "child died before faulting"

    def finish(self) -> None:
        os.write(self.go_w, b"g")
        assert self.proc.wait(timeout=30) == 0
        os.close(self.go_w)
        os.close(self.done_r)


def _settles_to(want: set[int]) -> set[int]:
    """Our programs, once the kernel has freed detached ones: a program is released after
    an RCU grace period, not inside close(), so poll for it (up to 5 s)."""
    deadline = time.monotonic() + 5
    while (ids := _our_prog_ids()) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return ids


def _our_prog_ids() -> set[int]:
    out = subprocess.run(
        ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {p["id"] for p in json.loads(out) if p.get("name") == "on_page_fault"}


# -- the object and the loader ----------------------------------------------------------------


def test_counters_struct_matches_memwatch_h():
    """bpf.CgroupCounters must mirror struct memwatch_counters field for field."""
    text = (REPO / "ebpf" / "memwatch.h").read_text()
    body = re.search(r"struct memwatch_counters \{(.*?)\n\};", text, re.S).group(1)
    c_fields = re.findall(r"__u64\s+(\w+);", body)
    assert tuple(c_fields) == bpf.FIELDS
    assert f"#define MEMWATCH_MAX_CGROUPS {bpf.MAX_CGROUPS}\n" in text
    assert f"#define MEMWATCH_UNATTRIBUTED {bpf.UNATTRIBUTED}\n" in text
    assert set(bpf.FIELDS) == {c for cs in bpf.HOOK_COUNTERS.values() for c in cs}


def test_every_tracepoint_hook_attaches_on_this_kernel(mw):
    attached = set(mw.attached())
    assert {
        "tp_btf/page_fault_user",
        "tp_btf/mm_vmscan_memcg_reclaim_begin",
        "tp_btf/mm_vmscan_memcg_reclaim_end",
        "tp_btf/mm_vmscan_direct_reclaim_begin",
        "tp_btf/mm_vmscan_direct_reclaim_end",
        "tp_btf/mark_victim",
    } <= attached
    # Every program is either attached or named with a reason, never silently dropped.
    assert attached | set(mw.missing) == set(bpf.HOOK_COUNTERS)
    assert all(mw.missing.values())
    assert ("page_faults" in mw.valid_counters()) and ("oom_kills" in mw.valid_counters())
    assert bool(mw.degraded()) == bool(mw.missing)


def test_page_faults_are_counted_against_the_faulting_cgroup(mw, scratch):
    n_mib = 64
    expected = n_mib * MiB // PAGE
    cgid = scratch.id
    assert mw.get(cgid) is None  # a fresh cgroup has no entry until something happens in it

    child = Faulter(n_mib * MiB)
    try:
        child.fault(scratch)
        got = mw.read()[cgid]
        one = mw.get(cgid)
    finally:
        child.finish()
    print(f"page faults in {scratch.path.name}: {got.page_faults} (expected >= {expected})")
    assert expected <= got.page_faults <= expected * 1.25 + 2000
    assert expected <= got.write_faults <= got.page_faults
    assert one == got  # get() and read() agree on the same (idle) cgroup
    assert got.oom_kills == 0 and got.reclaim_events == 0


def test_an_idle_cgroup_gets_none_of_a_neighbours_faults(mw, scratch):
    """Two children in two cgroups: only the one that faults is charged with the faults."""
    root = find_cgroup2_mount()
    idle_cg = Cgroup(root).create(f"xx-test-bpf-idle-{uuid.uuid4().hex[:8]}", exist_ok=False)
    idle_id = idle_cg.id
    busy = Faulter(32 * MiB)
    idle = Faulter(0)
    try:
        idle.fault(idle_cg)  # moved in, then faults nothing
        busy.fault(scratch)
        counts = mw.read()
    finally:
        busy.finish()
        idle.finish()
        idle_cg.remove()
    assert counts[scratch.id].page_faults >= 32 * MiB // PAGE
    # Waking up and answering the pipe costs the idle interpreter ~600 faults of its own
    # (measured); the neighbour's 8192 must not land here.
    assert counts.get(idle_id, bpf.CgroupCounters()).page_faults < 2000


def test_forget_drops_an_entry(mw, scratch):
    child = Faulter(MiB)
    try:
        child.fault(scratch)
    finally:
        child.finish()
    assert mw.get(scratch.id).page_faults >= MiB // PAGE
    mw.forget(scratch.id)
    assert mw.get(scratch.id) is None


def test_close_detaches_and_unloads(obj):
    before = _our_prog_ids()
    w = bpf.MemWatch.open(obj)
    during = _our_prog_ids()
    w.close()
    assert len(during - before) == 1
    assert _settles_to(before) == before
    with pytest.raises(ValueError):
        w.read()


def test_an_excluded_hook_is_named_and_the_rest_still_attach(obj):
    with bpf.MemWatch.open(obj, exclude={"tp_btf/page_fault_user"}) as w:
        assert "tp_btf/page_fault_user" not in w.attached()
        assert w.missing["tp_btf/page_fault_user"] == "excluded"
        assert "tp_btf/mark_victim" in w.attached()
        assert "page_faults" not in w.valid_counters()
        assert "tp_btf/page_fault_user" in w.degraded()


def test_excluding_everything_is_unavailable(obj):
    with pytest.raises(bpf.BpfUnavailable, match="no program"):
        bpf.MemWatch.open(obj, exclude=set(bpf.HOOK_COUNTERS))


def test_missing_object_is_unavailable_with_the_fix(tmp_path):
    with pytest.raises(bpf.BpfUnavailable, match="make -C ebpf"):
        bpf.MemWatch.open(tmp_path / "nope.bpf.o")


def test_a_file_that_is_not_an_elf_object_is_unavailable(tmp_path):
    bad = tmp_path / "bad.bpf.o"
    bad.write_text("not an ELF file\n")
    with pytest.raises(bpf.BpfUnavailable, match="cannot open"):
        bpf.MemWatch.open(bad)


def test_probe_loads_and_attaches_for_real(obj):
    before = _our_prog_ids()
    ok, detail = bpf.probe(obj)
    assert ok, detail
    assert "tp_btf/page_fault_user" in detail
    assert _settles_to(before) == before  # the probe leaves nothing attached
    ok, detail = bpf.probe(obj.parent / "missing.bpf.o")
    assert not ok and "make -C ebpf" in detail

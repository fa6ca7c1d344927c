"""`xxctl doctor` on this host: the probes act on the real kernel and leave nothing behind."""

import json
import subprocess

import pytest

from xxnode.kernel.cgroup import find_cgroup2_mount


def cgroup_tree() -> set[str]:
    root = find_cgroup2_mount()
    return {str(p) for p in root.rglob("*") if p.is_dir()} if root else set()


@pytest.fixture(scope="module")
def doctor():
    before = cgroup_tree()
    proc = subprocess.run(["xxctl", "doctor", "--json"], capture_output=True, text=True)
    after = cgroup_tree()
    return proc, before, after


def test_doctor_json_names_every_capability(doctor):
    proc, _, _ = doctor
    assert proc.returncode == 0, proc.stderr
    caps = json.loads(proc.stdout)["capabilities"]
    names = [c["name"] for c in caps]
    for name in ("cgroup2", "cgroup2.memory", "cgroup2.cpu", "cgroup2.pids", "sched_fifo",
                 "clone3", "rt_throttling", "psi", "psi_trigger", "bpf", "btf", "swap", "zswap",
                 "memory_reclaim"):  # fmt: skip
        assert name in names
    for c in caps:
        assert set(c) == {"name", "ok", "detail", "degraded"}
        assert c["detail"]
        assert bool(c["degraded"]) == (not c["ok"])  # a missing capability names its mode


def test_doctor_matches_what_this_kernel_really_has(doctor):
    """Cross-check each verdict against an independent look at the kernel."""
    proc, _, _ = doctor
    caps = {c["name"]: c["ok"] for c in json.loads(proc.stdout)["capabilities"]}
    root = find_cgroup2_mount()
    assert caps["cgroup2"] == (root is not None)
    offered = set((root / "cgroup.controllers").read_text().split()) if root else set()
    enabled = set((root / "cgroup.subtree_control").read_text().split()) if root else set()
    for ctl in ("memory", "pids"):
        assert caps[f"cgroup2.{ctl}"] == (ctl in offered and ctl in enabled)
    with open("/proc/swaps") as f:
        has_swap = len(f.read().splitlines()) > 1
    assert caps["swap"] == has_swap
    assert caps["memory_reclaim"] <= caps["cgroup2.memory"]
    # SCHED_FIFO and the launcher work for root on every machine of our kind.
    assert caps["sched_fifo"]
    assert caps["clone3"]


def test_doctor_leaves_no_cgroup_behind(doctor):
    _, before, after = doctor
    assert {p for p in after - before if "xx-probe" in p} == set()


def test_doctor_human_output_reads_as_a_table():
    out = subprocess.run(["xxctl", "doctor"], capture_output=True, text=True, check=True).stdout
    assert "capabilities ok" in out.splitlines()[-1]
    assert "sched_fifo" in out

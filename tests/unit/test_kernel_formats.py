"""The kernel file formats our parsers read, from samples of real files."""

from xxnode.kernel.cgroup import find_cgroup2_mount, parse_flat_keyed
from xxnode.kernel.psi import parse_pressure
from xxnode.kernel.swap import parse_swaps

MOUNTINFO = """\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 26 0:30 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
36 26 0:31 / /sys/fs/cgroup/cpu rw,nosuid shared:11 - cgroup cgroup rw,cpu
"""


def test_cgroup2_mount_is_found_among_v1_mounts(tmp_path):
    f = tmp_path / "mountinfo"
    f.write_text(MOUNTINFO)
    assert str(find_cgroup2_mount(str(f))) == "/sys/fs/cgroup/unified"


def test_no_cgroup2_mount_gives_none(tmp_path):
    f = tmp_path / "mountinfo"
    f.write_text(MOUNTINFO.replace("cgroup2 cgroup2", "tmpfs tmpfs"))
    assert find_cgroup2_mount(str(f)) is None


def test_flat_keyed_file():
    assert parse_flat_keyed("usage_usec 1520\nuser_usec 1000\nsystem_usec 520\n") == {
        "usage_usec": 1520,
        "user_usec": 1000,
        "system_usec": 520,
    }
    assert parse_flat_keyed("populated 1\nfrozen 0\n") == {"populated": 1, "frozen": 0}


def test_pressure_file():
    p = parse_pressure(
        "some avg10=1.50 avg60=0.20 avg300=0.00 total=123456\n"
        "full avg10=0.75 avg60=0.10 avg300=0.00 total=6543\n"
    )
    assert p["some"].avg10 == 1.5 and p["some"].total_us == 123456
    assert p["full"].avg60 == 0.1


def test_proc_swaps():
    devs = parse_swaps(
        "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        "/dev/vda                                partition\t1048572\t\t2048\t\t-2\n"
    )
    assert [(d.name, d.kind, d.size_kib, d.used_kib, d.priority) for d in devs] == [
        ("/dev/vda", "partition", 1048572, 2048, -2)
    ]
    assert parse_swaps("Filename Type Size Used Priority\n") == []

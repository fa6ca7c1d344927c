"""Is RT group scheduling (CONFIG_RT_GROUP_SCHED) active? The one place that asks.

Why it matters: with RT group scheduling, every cgroup that has the cpu controller gets its
own RT bandwidth, 0 by default, and cgroup v2 has no knob to raise it — so sched_setscheduler
(SCHED_FIFO) fails with EPERM for any task in such a cgroup. XX's jobs must be SCHED_FIFO in
their own cgroups, so the daemon must not enable the cpu controller in its subtree there.

Since 6.16 a kernel built with it can still have it off at boot (`rt_group_sched=0`, or
CONFIG_RT_GROUP_SCHED_DEFAULT_DISABLED=y without `rt_group_sched=1`); the v1 cpu controller's
cpu.rt_runtime_us shows it when the kernel config cannot be read.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path


def _kernel_config() -> tuple[dict[str, str], str] | None:
    """CONFIG_* lines from /proc/config.gz or /boot/config-<release>."""
    sources = [Path("/proc/config.gz"), Path(f"/boot/config-{os.uname().release}")]
    for src in sources:
        try:
            raw = gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes()
        except OSError:
            continue
        conf = {}
        for line in raw.decode(errors="replace").splitlines():
            key, sep, value = line.partition("=")
            if sep and key.startswith("CONFIG_"):
                conf[key] = value
        return conf, str(src)
    return None


def _cmdline_flag() -> str | None:
    try:
        for word in Path("/proc/cmdline").read_text().split():
            if word.startswith("rt_group_sched="):
                return word.split("=", 1)[1]
    except OSError:
        pass
    return None


def detect() -> tuple[bool, str]:
    """(active, how we know)."""
    found = _kernel_config()
    if found is not None:
        conf, src = found
        if conf.get("CONFIG_RT_GROUP_SCHED") != "y":
            return False, f"CONFIG_RT_GROUP_SCHED not set ({src})"
        flag = _cmdline_flag()
        if flag is not None:
            on = flag not in ("0", "n", "off")
            return on, f"CONFIG_RT_GROUP_SCHED=y ({src}), rt_group_sched={flag} on the command line"
        if conf.get("CONFIG_RT_GROUP_SCHED_DEFAULT_DISABLED") == "y":
            return False, f"CONFIG_RT_GROUP_SCHED=y but disabled by default ({src})"
        return True, f"CONFIG_RT_GROUP_SCHED=y ({src})"
    for knob in Path("/sys/fs/cgroup").glob("*/cpu.rt_runtime_us"):
        return True, f"{knob} exists"
    return False, "no kernel config readable and no v1 cpu.rt_runtime_us"

"""`xxctl doctor`: what this kernel gives XX, probed for real, and what XX does without it."""

from __future__ import annotations

import json
import logging
import os
import sys

from xxnode.kernel.capabilities import probe_all
from xxnode.kernel.cgroup import Cgroup, find_cgroup2_mount


def delegation_note(offered: set[str], subtree: set[str]) -> str | None:
    """`status` counts a controller missing unless it reaches xxnode's cgroup_root, i.e. is
    in the mount root's cgroup.subtree_control; cgroup.controllers alone (what the cgroup2
    probe reports as offered) is not enough. Say which are offered but not passed down."""
    held = sorted(offered - subtree)
    if not held:
        return None
    return (
        f"offered at the cgroup2 root but not in its cgroup.subtree_control, so xxnode's "
        f"cgroup_root does not get them and `xxctl status` lists them missing: {' '.join(held)}"
    )


def _root_note() -> str | None:
    mount = find_cgroup2_mount()
    if mount is None:
        return None
    root = Cgroup(mount)
    try:
        return delegation_note(root.controllers(), root.subtree_control())
    except OSError:
        return None


def register(sub) -> None:
    p = sub.add_parser("doctor", help="probe the kernel capabilities XX uses")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    if os.geteuid() != 0:
        print(
            "xxctl doctor: probes create cgroups and set SCHED_FIFO; run as root", file=sys.stderr
        )
        return 2
    logging.getLogger("xxnode").setLevel(logging.ERROR)  # each probe's detail says it already
    caps = probe_all()
    note = _root_note()
    if args.json:
        print(
            json.dumps(
                {
                    "kernel": os.uname().release,
                    "capabilities": [c.as_dict() for c in caps],
                    "controllers_not_delegated": note,
                },
                indent=2,
            )
        )
        return 0
    width = max(len(c.name) for c in caps)
    print(f"kernel {os.uname().release}")
    for c in caps:
        mark = "\033[32m●\033[0m" if c.ok and sys.stdout.isatty() else ("●" if c.ok else "○")
        state = "ok     " if c.ok else "MISSING"
        print(f"{mark} {c.name:<{width}}  {state}  {c.detail}")
        if not c.ok:
            print(f"  {'':<{width}}  degraded: {c.degraded}")
    if note:
        print(f"  note: {note}")
    missing = [c.name for c in caps if not c.ok]
    print(
        f"\n{len(caps) - len(missing)}/{len(caps)} capabilities ok"
        + (f"; degraded: {', '.join(missing)}" if missing else "")
    )
    return 0

"""`xxctl doctor`: what this kernel gives XX, probed for real, and what XX does without it."""

from __future__ import annotations

import json
import logging
import os
import sys

from xxnode.kernel.probe import probe_all


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
    if args.json:
        print(
            json.dumps(
                {"kernel": os.uname().release, "capabilities": [c.as_dict() for c in caps]},
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
    missing = [c.name for c in caps if not c.ok]
    print(
        f"\n{len(caps) - len(missing)}/{len(caps)} capabilities ok"
        + (f"; degraded: {', '.join(missing)}" if missing else "")
    )
    return 0

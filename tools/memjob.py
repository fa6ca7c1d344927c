#!/usr/bin/env python3
"""A job that holds N MiB of anonymous memory and can prove it lost none of it.

    memjob.py MIB [--passes K] [--busy]

Faults in MIB MiB (each page: its 8-byte index, then zeros — compressible like heap),
prints "ready <seconds>", then, for each line read on stdin, re-reads every page K times
and prints "ok <seconds>" or "bad <pages>". EOF ends it: exit 0 if every check passed, 3 if
any page came back wrong. With --busy it keeps re-reading its pages between commands, as
a running job touches its heap. Used by the VM tests and tools/bench_memory as the unit of
memory-hungry work: its timings are the "latency" of a memory-bound job.
"""

import sys
import time

PAGE = 4096


def main() -> int:
    mib = int(sys.argv[1])
    passes = int(sys.argv[sys.argv.index("--passes") + 1]) if "--passes" in sys.argv else 1
    n = mib * 256
    t0 = time.monotonic()
    buf = bytearray(mib << 20)
    for i in range(n):
        buf[i * PAGE : i * PAGE + 8] = i.to_bytes(8, "little")
    print(f"ready {time.monotonic() - t0:.3f}", flush=True)
    if "--busy" in sys.argv:
        import threading

        line = threading.Event()

        def wait_line() -> None:
            sys.stdin.readline()
            line.set()

        threading.Thread(target=wait_line, daemon=True).start()
        i = 0
        while not line.is_set():  # touch one page at a time, as a working job does
            _ = buf[(i % n) * PAGE]
            i += 1
        lines = ["check", *sys.stdin]
    else:
        lines = sys.stdin
    failed = False
    for _ in lines:
        t0 = time.monotonic()
        bad = 0
        for _ in range(passes):
            bad += sum(
                1 for i in range(n) if buf[i * PAGE : i * PAGE + 8] != i.to_bytes(8, "little")
            )
        failed |= bool(bad)
        print(f"bad {bad}" if bad else f"ok {time.monotonic() - t0:.3f}", flush=True)
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""A job that holds N MiB of anonymous memory whose every page it can verify later.

Usage: memhog.py MIB. Prints "ready" once the memory is faulted in, then waits for a line
on stdin, re-reads every page and exits 0 if each still carries its own index (nothing was
lost on the way to swap and back), 3 otherwise. Pages are an 8-byte index and zeros, so
zswap compresses them as it would typical heap.
"""

import sys

PAGE = 4096
mib = int(sys.argv[1])
n = mib * 256
buf = bytearray(mib << 20)
for i in range(n):
    buf[i * PAGE : i * PAGE + 8] = i.to_bytes(8, "little")
print("ready", flush=True)
sys.stdin.readline()
bad = sum(1 for i in range(n) if buf[i * PAGE : i * PAGE + 8] != i.to_bytes(8, "little"))
print(f"bad pages {bad}", flush=True)
sys.exit(3 if bad else 0)

"""Low-class memory kept in RAM but clean, so a higher class can be given it at once.

Reclaim's cost is the write: compressing a page into zswap or sending it to the swap
device. A page whose copy is already in swap costs nothing to reclaim — MADV_PAGEOUT only
unmaps it. So while the node is calm the memory manager takes waiting low-class jobs'
memory a chunk at a time, pages it out (the write) and reads it straight back (a read
fault keeps the swap copy): the job keeps its memory resident, the node keeps it in use,
and when a higher class needs room the chunk goes in a fraction of the time. Measured in
the VM lane (docs/memory.md): 128 MiB of dirty pages take 1.4–4.6 s to push out, the same
pages once clean 0.2–0.3 s.

What keeps a copy valid, each handled here or by the manager:
  * a read fault keeps the page's swap slot only while swap is less than half full (the
    kernel's vm_swap_full()): past that read-back pages lose their copy, so the manager
    stops making pages clean;
  * zswap on newer kernels drops its compressed copy when a page is loaded (the page
    comes back dirty); the manager probes this at start and turns the reserve off
    where it is so (`clean-reserve-off`). Sending the bottom class straight to the
    swap device instead was tried and measured worse: writes to a device finish after
    the reclaim that started them, so reclaim overshoots (tools/bench_memory, docs/memory.md);
  * a job that runs may write its pages again: the manager forgets a job's spans when it
    sees the job run, and releasing a span that was written anyway only costs the write.

Why its own module: the spans are state the reclaim thread and the preclean thread share
under one lock, and none of it is about when to act (the manager decides) or on whom (the
pure policy.swap_victims decides).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from xxnode.kernel import proc
from xxnode.kernel.cgroup import Cgroup, CgroupError

log = logging.getLogger("xxnode.memory")
# A chunk is made clean only if this much of it is in RAM: reading it back also brings its
# swapped pages in, and that growth must stay small next to what the chunk frees later.
MIN_PRESENT = 0.9


@dataclass(frozen=True)
class Span:
    pid: int
    addr: int
    length: int
    resident: int  # bytes in RAM when it was made clean: what releasing it frees


class CleanPages:
    def __init__(self, chunk: int):
        self.chunk = chunk
        self._lock = threading.Lock()
        self._spans: dict[str, list[Span]] = {}
        self.made = 0  # bytes made clean since start
        self.released_by_class: dict[str, int] = {}
        self.aborted = 0  # chunks left out (not read back) because a higher class needed room

    def by_job(self) -> dict[str, int]:
        with self._lock:
            return {j: sum(s.resident for s in spans) for j, spans in self._spans.items()}

    def total(self) -> int:
        return sum(self.by_job().values())

    def keep_only(self, job_ids: set[str]) -> None:
        """Forget the spans of jobs that ended or were seen running."""
        with self._lock:
            for j in set(self._spans) - job_ids:
                del self._spans[j]

    def make_clean(self, job_id: str, leaf: Cgroup, want: int, abort: Callable[[], bool]) -> int:
        """Make up to `want` bytes of one job's memory clean, chunk by chunk. `abort()` is
        asked after each write: when a higher class needs the room now, the chunk just
        written stays out (it is free memory) and the work stops. Returns bytes made clean."""
        with self._lock:
            known = {(s.pid, s.addr) for s in self._spans.get(job_id, [])}
        done = 0
        try:
            pids = leaf.procs()
        except CgroupError:
            return 0
        for pid in pids:
            try:
                ranges = proc.anon_ranges(pid)
            except OSError:
                continue
            for lo, n in ranges:
                for addr in range(lo, lo + n - self.chunk + 1, self.chunk):
                    if done >= want:
                        return done
                    if (pid, addr) in known:
                        continue
                    try:
                        present = proc.present_pages(pid, addr, self.chunk) * proc.PAGE
                        if present < self.chunk * MIN_PRESENT:
                            continue
                        proc.pageout(pid, [(addr, self.chunk)])
                        if abort():
                            self.aborted += 1
                            return done
                        proc.read_range(pid, addr, self.chunk)
                    except OSError:
                        break  # the process ended or the mapping changed: next process
                    with self._lock:
                        self._spans.setdefault(job_id, []).append(
                            Span(pid, addr, self.chunk, present)
                        )
                    self.made += present
                    done += present
        return done

    def release(self, job_id: str, cls: str, nbytes: int) -> int:
        """Push out up to `nbytes` of a job's clean spans; returns the bytes they held."""
        with self._lock:
            spans = self._spans.get(job_id, [])
            taken = []
            while spans and sum(s.resident for s in taken) < nbytes:
                taken.append(spans.pop())
            if not spans:
                self._spans.pop(job_id, None)
        by_pid: dict[int, list[Span]] = {}
        for s in taken:
            by_pid.setdefault(s.pid, []).append(s)
        freed = 0
        for pid, spans in by_pid.items():  # one syscall per process
            with contextlib.suppress(OSError):  # the process ended: its memory is gone too
                proc.pageout(pid, [(s.addr, s.length) for s in spans])
                freed += sum(s.resident for s in spans)
        self.released_by_class[cls] = self.released_by_class.get(cls, 0) + freed
        return freed

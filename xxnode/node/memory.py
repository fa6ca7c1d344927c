"""The node's memory manager: class-ordered swap under pressure, prefetch when it passes.

XX never asks for a memory limit. When the machine runs short, the pages that go are the
lowest class's: priority scheduling means those jobs will not run soon anyway. The loop:

  * wake on a PSI trigger on the XX root (the kernel tells us within ~100 ms that tasks
    stall on memory) or on a periodic tick (the fallback, and the only path without PSI);
  * read the state once — MemAvailable, PSI, each job's memory and CPU progress — into a
    `Sample` everything else consults (oomd's context object);
  * if available memory is under the target, ask `policy.swap_victims` whom to push out
    and write `memory.reclaim` on their cgroups (in a worker thread: the write blocks
    until the kernel has reclaimed), zswap first, the swap device behind it;
  * when pressure has passed for a while, fault swapped jobs back in with
    process_madvise(MADV_WILLNEED), highest class first, within the free headroom;
  * optionally, while the node is calm, keep a clean reserve (node/clean_pages.py):
    waiting low-class memory written to swap and read back, still in RAM and in use, that a
    higher class is given in a fraction of a write's time.

Idle function environments (node/env/) come first of all: they are sampled as jobs of the
"idle" rank, below every class, so reclaim takes their pages before any job's; when reclaim
cannot free enough (no swap, swap full), the pool kills idle environments, least valuable
first (policy.warm_pool.victims), before a running job is starved. A busy environment is
sampled at its current invocation's class.

Static protection, set once per class cgroup: the top class gets memory.swap.max 0 and
memory.low max (the kernel's own reclaim leaves it alone too); every job's processes get
an oom_score_adj by class, so if reclaim cannot keep up the OOM killer takes the lowest
class first, and memory.oom.group makes it take the whole job.

Constants, each with its reason:
  target_free   MemAvailable we restore (10% of RAM): room for a new high-class job's
                first seconds without a stall.
  low_free      below this (5%) we reclaim even if PSI has not fired: PSI needs stalls to
                happen first, and a burst can OOM before the trigger's window closes.
  min_chunk     the smallest reclaim worth a syscall (32 MiB).
  max_chunk     the largest single memory.reclaim write (64 MiB): the write blocks until
                done, so big requests are split and the state re-read between them — a
                PSI event or a finished job changes what is needed.
  class_ceilings  off by default: memory.high on every class below the top, at what it
                holds plus an equal share of the free memory above target_free (policy.
                swap_victims.class_ceilings), re-set every wake-up. Our own reclaim runs after
                the fact, at the speed of one writer; with the ceiling a filling low class's
                own allocations reclaim its own pages and wait (senpai's and TMO's way), so
                free memory stays at the target while it fills and our reclaim halves. But in
                tools/bench_memory it did not improve the high class's median slowdown (1.28x
                against 1.02x without, settle 20; 1.19x against 1.14x, settle 0) and gave one
                4.4x run in six, so it is opt-in. Only while swap has room for max_chunk:
                without somewhere to put its pages a class at its ceiling would be throttled
                instead of growing, where the OOM order (lowest class first) is the better
                answer.
  quiet_s       pressure-free time before prefetching and thawing (5 s): swapping back in
                while the high class still grows would only swap out again.
  clean_reserve  off by default (0): measured in tools/bench_memory it gave no gain, because
                the 2x overcommit fills half the swap before the reserve can grow (a read
                fault keeps a page's copy only below that); set it (e.g. 0.30, what a
                high-class job may ask beyond the free target) where swap has room. Made at
                idle CPU priority by a thread of its own, only while nothing needs memory;
                released before any reclaim that writes.
  freeze_swapped  off by default; when on, a job we reclaim from is frozen (cgroup.freeze)
                until quiet_s has passed, so it cannot fault its pages back meanwhile —
                tools/bench_memory --active measures whether that helps.

Why one module of ~500 lines: the sample, the reclaim worker thread and the prefetch share
one lock and one view of the jobs (a split would pass that lock around); whom to push out
is decided elsewhere, in the pure ``policy.swap_victims`` the simulator runs too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import logging
import mmap
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from xxnode.config.memory import MemoryConfig
from xxnode.kernel import meminfo, proc, psi
from xxnode.kernel.cgroup import Cgroup, CgroupError
from xxnode.node.clean_pages import CleanPages
from xxnode.policy.swap_victims import (
    JobMemory,
    choose_precleans,
    choose_victims,
    class_ceilings,
    clean_release_order,
)

log = logging.getLogger("xxnode.memory")
MiB = 1 << 20
PAGE = 4096
# Idle function environments rank below every class: frozen, they will not touch their
# pages until their next invocation, whatever its class (issue: "idle costs almost nothing")
IDLE = "idle"
IDLE_RANK = -1
# MemAvailable is read this often while clean memory is held: a job faulting in 1 GiB/s
# eats a 1 GiB node's whole 10 % free target in 100 ms and then stalls until pages are
# freed; looking every 50 ms acts with half of it left. A read of /proc/meminfo costs
# tens of microseconds.
WATCH_S = 0.05


@dataclass(frozen=True)
class JobRef:
    """What the daemon tells us about a job: enough to find and rank it."""

    job_id: str
    cls: str
    leaf: Cgroup
    started_at: float


@dataclass
class JobSample:
    job_id: str
    cls: str
    rank: int
    current: int
    swap: int
    zswapped: int
    anon: int
    cpu_usec: int
    running: bool
    started_at: float
    leaf: Cgroup | None = None  # where to act on it (None in pure decision tests)


@dataclass
class Sample:
    """One read of everything the decisions need (taken once per wake-up)."""

    at: float
    total: int
    available: int
    psi_some_avg10: float
    psi_full_avg10: float
    jobs: list[JobSample]


@dataclass
class ReclaimEvent:
    at: float  # wall clock
    job: str
    cls: str
    requested: int
    reclaimed: int
    ms: float
    reaction_ms: float | None  # PSI wake-up -> reclaim start, when a trigger caused it
    cause: str


@dataclass
class Stats:
    reclaims: int = 0
    reclaimed_by_class: dict[str, int] = field(default_factory=dict)
    prefetched_by_class: dict[str, int] = field(default_factory=dict)
    psi_events: int = 0
    psi_events_by: dict[str, int] = field(default_factory=dict)  # root or class name
    shortfall_events: int = 0
    idle_evictions: int = 0  # times idle environments were killed because reclaim fell short
    tick_errors: int = 0  # ticks that raised; logged, and the loop went on
    clean_made: int = 0  # bytes made clean (written to swap, read back) since start
    clean_released_by_class: dict[str, int] = field(default_factory=dict)
    clean_aborted: int = 0  # chunks written but not read back: a higher class needed room
    clean_paused: str = ""  # why no memory is being made clean now, if it is wanted


class MemoryManager:
    def __init__(
        self,
        root: Cgroup,
        class_ranks: dict[str, int],
        cfg: MemoryConfig,
        jobs: Callable[[], Iterable[JobRef]],
        *,
        memory_controller: bool,
        psi_ok: bool = True,
    ):
        self.root = root
        self.ranks = class_ranks
        self.top_rank = max(class_ranks.values())
        self.cfg = cfg
        self.jobs = jobs
        self.managed = memory_controller  # without it we only watch
        self.psi_ok = psi_ok
        self.events: deque[ReclaimEvent] = deque(maxlen=256)
        self.stats = Stats()
        self.last: Sample | None = None
        self._cpu_seen: dict[str, int] = {}
        self._adjusted: set[int] = set()
        self._frozen: dict[str, Cgroup] = {}  # job id -> its frozen leaf
        self.ceilings: dict[str, int | None] = {}  # class -> memory.high written (None: max)
        self._last_pressure = float("-inf")
        self._last_write_need = float("-inf")  # last time reclaim had to write (not just drop)
        self._wake: asyncio.Event | None = None
        self._psi_at: float | None = None  # first PSI event since the last step, for reaction
        self._psi_pending = False  # a PSI event came since the last step began
        self._reclaiming = False  # a memory.reclaim write is under way (worker thread)
        self._stop = threading.Event()
        self.trigger_error: str | None = None
        self.trigger_note = "armed"
        self.min_oom_adj = -999 if proc.has_capability(proc.CAP_SYS_RESOURCE) else 0
        self.clean = CleanPages(cfg.clean_chunk)
        self.clean_off = ""  # why the clean reserve was turned off, if it was
        # kill idle function environments to free `need` bytes (the daemon sets it; called
        # from the worker thread, so it must hand over to the loop itself)
        self.evict: Callable[[int], None] | None = None

    # -- static protection -------------------------------------------------------------
    def oom_adj(self, cls: str) -> int:
        """Bottom class 1000 (always above any task at the default 0), top class -999
        (killable, but below everything else), classes between spaced evenly. Going below 0
        needs CAP_SYS_RESOURCE; without it the top class sits at 0, level with system tasks."""
        r, top = self.ranks[cls], self.top_rank
        if top == 0:
            return 0
        return round(1000 - (1000 - self.min_oom_adj) * r / top)

    def setup(self) -> list[str]:
        """Per-class swap and protection settings; returns what could not be set."""
        problems = []
        if self.min_oom_adj == 0:
            problems.append(
                "oom-order-partial: no CAP_SYS_RESOURCE, so the top class's oom_score_adj is 0 "
                "(level with system tasks) instead of -999"
            )
        if not self.managed:
            return problems
        for cls, rank in self.ranks.items():
            cg = self.root.child(cls)
            top = rank == self.top_rank
            for knob, value in (
                ("memory.swap.max", "0" if top else "max"),
                ("memory.zswap.max", "0" if top else "max"),
                ("memory.zswap.writeback", "1"),
                ("memory.low", "max" if top else "0"),
                ("memory.high", "max"),  # a ceiling left by a daemon that died is lifted
            ):
                if not cg.has(knob):
                    continue
                try:
                    cg.write(knob, value)
                except CgroupError as e:
                    problems.append(str(e))
        if self.cfg.clean_reserve_fraction > 0:
            self.clean_off = self._probe_clean_copies()
            if self.clean_off:
                problems.append(self.clean_off)
        # memory.low only protects as far as every ancestor does.
        with contextlib.suppress(CgroupError):
            if self.root.has("memory.low"):
                self.root.write("memory.low", "max")
        self._setup_zswap(problems)
        return problems

    def _setup_zswap(self, problems: list[str]) -> None:
        from xxnode.kernel import swap as kswap

        params = kswap.zswap_params()
        if not params:
            return
        wanted = {"enabled": "Y"}
        if self.cfg.zswap_compressor:
            wanted["compressor"] = self.cfg.zswap_compressor
        if self.cfg.zswap_max_pool_percent:
            wanted["max_pool_percent"] = str(self.cfg.zswap_max_pool_percent)
        for k, v in wanted.items():
            if params.get(k) == v:
                continue
            try:
                kswap.set_zswap_param(k, v)
            except OSError as e:
                problems.append(f"zswap {k}={v}: {e.strerror}")

    def adopt(self, job: JobRef) -> None:
        """Give a job's processes its class's OOM rank (children inherit it)."""
        adj = self.oom_adj(job.cls)
        for pid in job.leaf.procs():
            if pid in self._adjusted:
                continue
            with contextlib.suppress(OSError):
                proc.set_oom_score_adj(pid, adj)
                self._adjusted.add(pid)

    # -- reading -----------------------------------------------------------------------
    def sample(self, refs: Iterable[JobRef] | None = None) -> Sample:
        """Read the world once: a pure read (no writes), over `refs` when given — the
        loop's snapshot of the jobs, since the daemon's job table changes under the loop."""
        mi = meminfo.meminfo()
        some = full = 0.0
        if self.psi_ok:
            with contextlib.suppress(OSError, KeyError):
                p = psi.read_pressure(self.root.path / "memory.pressure")
                some, full = p["some"].avg10, p["full"].avg10
        jobs = []
        seen = {}
        for ref in self.jobs() if refs is None else refs:
            rank = IDLE_RANK if ref.cls == IDLE else self.ranks.get(ref.cls)
            if rank is None:
                continue
            try:
                cpu = ref.leaf.cpu_stat().get("usage_usec", 0)
                st = ref.leaf.memory_stat() if self.managed else {}
                cur = (ref.leaf.read_int("memory.current") or 0) if self.managed else 0
                swp = (ref.leaf.read_int("memory.swap.current") or 0) if self.managed else 0
            except CgroupError:
                continue  # the job ended between listing and reading
            running = cpu > self._cpu_seen.get(ref.job_id, -1)
            seen[ref.job_id] = cpu
            jobs.append(
                JobSample(
                    ref.job_id,
                    ref.cls,
                    rank,
                    cur,
                    swp,
                    st.get("zswapped", 0),
                    st.get("anon", 0),
                    cpu,
                    running,
                    ref.started_at,
                    ref.leaf,
                )  # fmt: skip
            )
        self._cpu_seen = seen
        self.clean.keep_only({j.job_id for j in jobs if not j.running})
        return Sample(
            time.monotonic(), mi.get("MemTotal", 0), mi.get("MemAvailable", 0), some, full, jobs
        )

    def _fast_sample(self) -> Sample | None:
        """On a PSI wake-up, act before re-reading every job: the last sample (at most one
        tick old) still says who the low-class jobs are; only MemAvailable is read fresh.
        The next step, after the first chunk, reads everything again."""
        last = self.last
        if last is None or time.monotonic() - last.at > 2 * self.cfg.tick_s:
            return None
        mi = meminfo.meminfo()
        return dataclasses.replace(
            last, at=time.monotonic(), available=mi.get("MemAvailable", last.available)
        )

    # -- deciding ----------------------------------------------------------------------
    def need(self, s: Sample, psi_woke: bool) -> int:
        """Bytes to push out now: restore target_free when under it and either PSI saw
        stalls or we are below the low watermark."""
        target = int(s.total * self.cfg.target_free_fraction)
        low = int(s.total * self.cfg.low_free_fraction)
        short = target - s.available
        if short <= 0 or not (psi_woke or s.available < low):
            return 0
        return max(short, self.cfg.min_chunk)

    def victims(self, s: Sample, need: int) -> list[tuple[JobSample, int]]:
        by_id = {j.job_id: j for j in s.jobs}
        mem = [JobMemory(j.job_id, j.rank, j.running, max(j.anon, 0), j.started_at) for j in s.jobs]
        return [(by_id[jid], n) for jid, n in choose_victims(mem, need, self.top_rank)]

    # -- acting ------------------------------------------------------------------------
    def reclaim(self, job: JobSample, nbytes: int, cause: str, woke_at: float | None) -> int:
        """Push up to `nbytes` of one job out; returns what the kernel took."""
        leaf = job.leaf
        t0 = time.monotonic()
        # pgsteal counts pages the kernel took from this cgroup; memory.current would also
        # move with the job's own faults and with zswap's compressed pool.
        before = leaf.memory_stat().get("pgsteal", 0)
        t_write = time.monotonic()  # the reclaim starts here
        self._reclaiming = True
        try:
            leaf.write("memory.reclaim", str(nbytes))
        except CgroupError as e:
            if e.errno != errno.EAGAIN:  # EAGAIN: the kernel found less than asked
                log.warning("reclaim %s: %s", job.job_id, e)
                return 0
        finally:
            self._reclaiming = False
        after = leaf.memory_stat().get("pgsteal", 0)
        ev = ReclaimEvent(
            time.time(), job.job_id, job.cls, nbytes, max(after - before, 0) * PAGE,
            (time.monotonic() - t0) * 1000,
            (t_write - woke_at) * 1000 if woke_at is not None else None, cause,
        )  # fmt: skip
        self.events.append(ev)
        self.stats.reclaims += 1
        self.stats.reclaimed_by_class[job.cls] = (
            self.stats.reclaimed_by_class.get(job.cls, 0) + ev.reclaimed
        )
        log.info(
            "reclaimed %d MiB from %s (%s) in %.0f ms", ev.reclaimed // MiB, job.job_id,
            job.cls, ev.ms,
        )  # fmt: skip
        if self.cfg.freeze_swapped:
            # A job whose pages we just pushed out would fault them straight back in if it
            # ran; frozen, it waits (as a preempted job would) until the pressure is over.
            with contextlib.suppress(CgroupError):
                leaf.freeze(True)
                self._frozen[job.job_id] = leaf
        return ev.reclaimed

    def _set_ceilings(self, s: Sample) -> None:
        """Re-set the lower classes' memory.high from this wake-up's MemAvailable and what
        each class holds now (read just before the write, so a ceiling is never put under
        a class's memory: a write below it would reclaim, here, synchronously)."""
        if not self.cfg.class_ceilings:
            return
        mi = meminfo.meminfo()
        room = mi.get("SwapFree", 0) >= self.cfg.max_chunk
        below = [c for c, r in self.ranks.items() if r < self.top_rank]
        current = {}
        for c in below:
            with contextlib.suppress(CgroupError):
                current[c] = self.root.child(c).read_int("memory.current") or 0
        target = int(s.total * self.cfg.target_free_fraction)
        for c, value in class_ceilings(current, self.ranks, s.available, target).items():
            want = value if room and c in current else None
            old = self.ceilings.get(c)
            if want == old or (want and old and abs(want - old) < MiB):
                continue
            try:
                self.root.child(c).write("memory.high", "max" if want is None else want)
                self.ceilings[c] = want
            except CgroupError as e:
                log.warning("memory.high on %s: %s", c, e)

    def lift_ceilings(self) -> None:
        """memory.high back to max: a node that stops managing memory must not leave its
        lower classes throttled."""
        for c, v in list(self.ceilings.items()):
            if v is not None:
                with contextlib.suppress(CgroupError):
                    self.root.child(c).write("memory.high", "max")
            self.ceilings[c] = None

    def _release_clean(self, s: Sample, woke_at: float | None) -> int:
        """Under the free target, clean memory goes first, PSI or not: it costs no write,
        so there is no reason to wait for stalls before giving it up."""
        short = int(s.total * self.cfg.target_free_fraction) - s.available
        held = self.clean.by_job()
        if short <= 0 or not held:
            return 0
        mem = [JobMemory(j.job_id, j.rank, j.running, 0, j.started_at) for j in s.jobs]
        cls = {j.job_id: j.cls for j in s.jobs}
        freed = 0
        for jid, n in clean_release_order(mem, held, short, self.top_rank):
            t0 = time.monotonic()
            got = self.clean.release(jid, cls[jid], n)
            ms = (time.monotonic() - t0) * 1000
            reaction = (t0 - woke_at) * 1000 if woke_at is not None else None
            self.events.append(
                ReclaimEvent(time.time(), jid, cls[jid], n, got, ms, reaction, "clean")
            )
            log.info("released %d MiB of clean memory from %s (%s) in %.0f ms",
                     got // MiB, jid, cls[jid], ms)  # fmt: skip
            freed += got
        self.stats.clean_released_by_class = dict(self.clean.released_by_class)
        return freed

    # -- the clean reserve (its own thread, at idle priority) ---------------------------
    @staticmethod
    def _probe_clean_copies() -> str:
        """Does a page read back keep its swap copy here? Push 4 MiB of our own out, read it
        back, push it out again and count the writes: on kernels whose zswap drops the copy
        when a page is loaded the second push writes it all again, and the reserve would
        only be extra work. Returns why the reserve is off, or ""."""
        if not meminfo.meminfo().get("SwapTotal"):
            return "clean-reserve-off: no swap"
        n = 4 * MiB
        buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            for i in range(0, n, PAGE):
                buf[i : i + 8] = i.to_bytes(8, "little")  # heap-like: compressible, not zero
            first = ctypes.c_char.from_buffer(buf)
            addr = ctypes.addressof(first)
            del first  # the mapping can be closed only once nothing points into it
            me = os.getpid()
            proc.pageout(me, [(addr, n)])
            proc.read_range(me, addr, n)
            w0 = meminfo.swap_written()
            proc.pageout(me, [(addr, n)])
            written = meminfo.swap_written() - w0
        except OSError as e:
            return f"clean-reserve-off: probe failed ({e.strerror})"
        finally:
            with contextlib.suppress(Exception):
                buf.close()
        if written * 2 > n:
            return (f"clean-reserve-off: pushing out 4 MiB read back from swap wrote "
                    f"{written // 1024} KiB: this kernel keeps no copy of a page read back")  # fmt: skip
        return ""

    def _swap_room(self) -> bool:
        """A read fault keeps a page's swap copy only while swap is under half full."""
        mi = meminfo.meminfo()
        total, free = mi.get("SwapTotal", 0), mi.get("SwapFree", 0)
        return total > 0 and (total - free) + self.cfg.clean_chunk < total // 2

    def _above_target(self) -> bool:
        mi = meminfo.meminfo()
        return mi.get("MemAvailable", 0) >= mi.get("MemTotal", 0) * self.cfg.target_free_fraction

    def _room_wanted(self, since: int | None = None) -> bool:
        """Someone needs memory now: PSI saw stalls, a reclaim is under way, MemAvailable is
        under the low watermark — or, during a chunk, it fell by more than the chunk since
        `since` (a job is faulting fast). Then no page is read back. Being under the free
        target alone is no reason to stop: a chunk written and then released is the cheap
        way back to it."""
        if self._psi_pending or self._reclaiming:
            return True
        mi = meminfo.meminfo()
        avail = mi.get("MemAvailable", 0)
        if avail < mi.get("MemTotal", 0) * self.cfg.low_free_fraction:
            return True
        return since is not None and avail < since - self.cfg.clean_chunk

    def preclean_once(self) -> int:
        """Make one job's share of the missing reserve clean; returns bytes made clean."""
        s = self.last
        if s is None or not self.managed or self.cfg.clean_reserve_fraction <= 0:
            return 0
        if self.clean_off:
            self.stats.clean_paused = self.clean_off
            return 0
        want = int(s.total * self.cfg.clean_reserve_fraction) - self.clean.total()
        if want < self.cfg.clean_chunk or self._room_wanted():
            return 0
        if time.monotonic() - self._last_write_need < self.cfg.quiet_s:
            # Reclaim had to write lately: someone is still growing, and a chunk read back
            # now would only be written out again by that reclaim.
            self.stats.clean_paused = "memory is being reclaimed"
            return 0
        if not self._swap_room():
            self.stats.clean_paused = "swap is half full: read-back pages would lose their copy"
            return 0
        self.stats.clean_paused = ""
        # Idle environments are left alone: reclaim takes them first anyway and the pool may
        # kill them outright, and "swapped" in `xxctl fn envs` must keep meaning out of RAM.
        jobs = [j for j in s.jobs if j.cls != IDLE]
        mem = [JobMemory(j.job_id, j.rank, j.running, max(j.anon, 0), j.started_at) for j in jobs]
        by_id = {j.job_id: j for j in jobs}
        for jid, n in choose_precleans(mem, self.clean.by_job(), want, self.top_rank):
            if by_id[jid].leaf is None:
                continue
            start = meminfo.meminfo().get("MemAvailable", 0)
            done = self.clean.make_clean(
                jid, by_id[jid].leaf, n, lambda start=start: self._room_wanted(start)
            )
            self.stats.clean_made, self.stats.clean_aborted = self.clean.made, self.clean.aborted
            if done:
                return done
        return 0

    def _preclean_loop(self) -> None:
        # Idle priority: this work is for a future arrival and must not slow any job now.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        while not self._stop.is_set():
            try:
                done = self.preclean_once()
            except Exception:
                self.stats.tick_errors += 1
                log.exception("memory: making memory clean failed; carrying on")
                done = 0
            if not done:
                self._stop.wait(self.cfg.tick_s)

    def _evict_idle(self, need: int) -> None:
        if self.evict is not None:
            self.stats.idle_evictions += 1
            self.evict(need)

    def thaw(self) -> None:
        for jid, leaf in list(self._frozen.items()):
            if leaf.exists():
                with contextlib.suppress(CgroupError):
                    leaf.freeze(False)
            del self._frozen[jid]

    def prefetch(self, s: Sample) -> int:
        """Swap jobs back in, highest class first, while headroom above target lasts."""
        headroom = s.available - int(s.total * self.cfg.target_free_fraction)
        done = 0
        for j in sorted(s.jobs, key=lambda j: (-j.rank, j.started_at)):
            if headroom <= 0:
                break
            if j.swap <= 0 or j.swap > headroom:
                continue
            for pid in j.leaf.procs():
                with contextlib.suppress(OSError):
                    proc.prefetch(pid)
            self.stats.prefetched_by_class[j.cls] = (
                self.stats.prefetched_by_class.get(j.cls, 0) + j.swap
            )
            headroom -= j.swap
            done += j.swap
        return done

    def step(self, psi_woke: bool, woke_at: float | None, refs: tuple[JobRef, ...] = ()) -> bool:
        """One wake-up: read, decide, act on at most one chunk. Blocking (reclaim waits for
        the kernel). Returns True if it reclaimed, so the caller re-runs it at once. `refs`
        is the loop's immutable snapshot of the running jobs: this runs in a worker thread."""
        s = self._fast_sample() if woke_at is not None else None
        if s is None:
            s = self.sample(refs)
            for ref in refs:
                if ref.cls in self.ranks:  # environments keep the default OOM rank
                    with contextlib.suppress(CgroupError):  # the job ended since the snapshot
                        self.adopt(ref)
        self.last = s
        if not self.managed:
            # no memory.reclaim: idle environments are all we can give back (by killing)
            if need := self.need(s, psi_woke):
                self._evict_idle(need)
            return False
        self._set_ceilings(s)
        if freed := self._release_clean(s, woke_at):
            self._last_pressure = s.at
            s = dataclasses.replace(s, available=s.available + freed)
            self.last = s
        need = self.need(s, psi_woke)
        if need:
            self._last_pressure = self._last_write_need = s.at
            chosen = self.victims(s, min(need, self.cfg.max_chunk))
            if not chosen:
                self.stats.shortfall_events += 1
                self._evict_idle(need)
                return False
            cause = "psi" if psi_woke else "low-watermark"
            asked = sum(n for _, n in chosen)
            got = sum(self.reclaim(job, n, cause, woke_at) for job, n in chosen)
            if got * 4 < asked and s.available < s.total * self.cfg.low_free_fraction:
                # reclaim is not keeping up (swap full, or none) and we are below the low
                # watermark: idle environments die now, least valuable first, before any
                # running job is starved or OOM-killed
                self._evict_idle(asked - got)
            # Carry on at once only while chunks pay: when the victims have nothing left to
            # give, tight retries would only burn CPU; the next PSI event or tick decides.
            return got * 4 >= asked
        if s.at - self._last_pressure >= self.cfg.quiet_s:
            if self.cfg.prefetch:
                self.prefetch(s)  # before thawing: bring pages back before the job wants them
            self.thaw()
        return False

    # -- the loop ----------------------------------------------------------------------
    def _watch_psi(self, loop: asyncio.AbstractEventLoop) -> None:
        """PSI triggers signal POLLPRI, which asyncio's readers do not see: poll them in a
        thread and hand each event to the loop. One trigger on the XX root (the node is
        short) and one per class cgroup (which class stalls)."""
        where = {"root": self.root} | {c: self.root.child(c) for c in self.ranks}
        triggers: dict[int, tuple[str, psi.Trigger]] = {}
        for name, cg in where.items():
            stall, window = self.cfg.psi_stall_us, self.cfg.psi_window_us
            try:
                try:
                    t = psi.Trigger(cg.path / "memory.pressure", "some", stall, window)
                except OSError as e:
                    if e.errno != errno.EINVAL or window % 2_000_000 == 0:
                        raise
                    # Without CAP_SYS_RESOURCE windows must be whole multiples of 2 s:
                    # keep the same stall share over the longer window.
                    w2 = -(-window // 2_000_000) * 2_000_000
                    t = psi.Trigger(cg.path / "memory.pressure", "some", stall * w2 // window, w2)
                    self.trigger_note = f"armed with {w2 // 1_000_000} s windows (unprivileged)"
            except OSError as e:
                self.trigger_error = f"{e.strerror}: PSI trigger on {name} refused; polling"
                log.warning("%s", self.trigger_error)
                continue
            triggers[t.fileno()] = (name, t)
        if not triggers:
            return
        try:
            p = select.poll()
            for fd in triggers:
                p.register(fd, select.POLLPRI)
            while not self._stop.is_set():
                for fd, _ in p.poll(200):
                    loop.call_soon_threadsafe(self._on_psi, time.monotonic(), triggers[fd][0])
        finally:
            for _, t in triggers.values():
                t.close()

    def _on_psi(self, at: float, where: str = "root") -> None:
        self.stats.psi_events += 1
        self.stats.psi_events_by[where] = self.stats.psi_events_by.get(where, 0) + 1
        # Every event makes the next step a PSI wake-up. Reaction time is measured only from
        # events that do not find a reclaim already under way: those are being acted on.
        self._psi_pending = True
        if self._psi_at is None and not self._reclaiming:
            self._psi_at = at
        if self._wake:
            self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        watcher = None
        if self.psi_ok and (self.root.path / "memory.pressure").exists():
            watcher = threading.Thread(target=self._watch_psi, args=(loop,), daemon=True)
            watcher.start()
        precleaner = None
        if self.managed and self.cfg.clean_reserve_fraction > 0:
            precleaner = threading.Thread(target=self._preclean_loop, daemon=True)
            precleaner.start()
        try:
            more = False  # still short after a chunk: carry on as if PSI had woken us again
            last_step = float("-inf")
            while True:
                if not more:
                    # While clean memory is held, look at MemAvailable every WATCH_S: giving
                    # it up costs no write, so the sooner the better, before anyone stalls.
                    watch = self.clean.total() > 0
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._wake.wait(), WATCH_S if watch else self.cfg.tick_s
                        )
                    if (
                        watch
                        and not self._wake.is_set()
                        and time.monotonic() - last_step < self.cfg.tick_s
                        and self._above_target()
                    ):
                        continue
                last_step = time.monotonic()
                self._wake.clear()
                woke_at, self._psi_at = self._psi_at, None
                psi_woke = more or self._psi_pending
                self._psi_pending = False
                refs = tuple(self.jobs())  # read on the loop, which owns the job table
                try:
                    more = await asyncio.to_thread(self.step, psi_woke, woke_at, refs)
                except Exception:
                    # One bad tick (a kernel file that vanished, a bug) must not end memory
                    # management for the node's life: say it, count it, go on.
                    self.stats.tick_errors += 1
                    log.exception("memory: tick failed; carrying on")
                    more = False
        finally:
            self._stop.set()
            for t in (watcher, precleaner):
                if t:
                    await asyncio.to_thread(t.join)
            self.lift_ceilings()

    # -- exposure ----------------------------------------------------------------------
    def snapshot(self) -> dict:
        """What `xxctl memory` shows and what the dispatcher publishes to idle lists."""
        s = self.last or self.sample()
        per_class: dict[str, dict] = {
            c: {"jobs": 0, "memory": 0, "swap": 0, "zswapped": 0} for c in self.ranks
        }
        idle = {"jobs": 0, "memory": 0, "swap": 0, "zswapped": 0}  # idle environments
        for j in s.jobs:
            pc = idle if j.cls == IDLE else per_class[j.cls]
            pc["jobs"] += 1
            pc["memory"] += j.current
            pc["swap"] += j.swap
            pc["zswapped"] += j.zswapped
        clean = self.clean.by_job()
        for j in s.jobs:
            if j.cls != IDLE and j.job_id in clean:
                per_class[j.cls]["clean"] = per_class[j.cls].get("clean", 0) + clean[j.job_id]
        for c, pc in per_class.items():
            pc.setdefault("clean", 0)
            pc["reclaimed_total"] = self.stats.reclaimed_by_class.get(c, 0)
            pc["oom_score_adj"] = self.oom_adj(c)
            pc["ceiling"] = self.ceilings.get(c)  # memory.high we set (None: max, or top)
            with contextlib.suppress(OSError, KeyError):
                pc["psi_some_avg10"] = psi.read_pressure(
                    self.root.child(c).path / "memory.pressure"
                )["some"].avg10
        return {
            "managed": self.managed,
            "total": s.total,
            "free": s.available,
            "running_jobs": sum(1 for j in s.jobs if j.running),
            "jobs_total": len(s.jobs),
            "psi_some_avg10": s.psi_some_avg10,
            "psi_full_avg10": s.psi_full_avg10,
            "classes": per_class,
            "idle_environments": idle
            | {"reclaimed_total": self.stats.reclaimed_by_class.get(IDLE, 0)},
            "jobs": [
                {k: v for k, v in asdict(j).items() if k != "leaf"} | {"cgroup": str(j.leaf.path)}
                if j.leaf
                else asdict(j)
                for j in s.jobs
            ],
            "reclaims": [asdict(e) for e in list(self.events)[-20:]],
            "stats": asdict(self.stats),
            "trigger": self.trigger_error or self.trigger_note,
        }

"""The node daemon: admits jobs, queues them by class, launches them into cgroup v2 with their
class's kernel scheduling, accounts for them, and survives its own crash.

The kernel enforces, the daemon decides: once launched, a job's priority, cgroup and timeout
(enforced by its shim) no longer depend on this process. See docs/node.md.

Cgroup layout under the root it owns:

    <root>/_shims-<ns>       every job's shim (not billed to the job); fresh per daemon run
    <root>/<class>/<job>     one leaf per job; controllers enabled down to it
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import fcntl
import logging
import os
import shutil
import time
from collections import OrderedDict
from pathlib import Path

from xxnode.config import NodeConfig
from xxnode.journal import Journal
from xxnode.kernel import clone3, rt_group, sched
from xxnode.kernel.cgroup import Cgroup, CgroupError, find_cgroup2_mount, own_cgroup
from xxnode.kernel.cgroup_watch import PopulatedWatcher
from xxnode.node import jobs as J
from xxnode.node.memory import JobRef, MemoryManager
from xxnode.policy.node_queue import NodeQueue

log = logging.getLogger("xxnode")

ALL_CONTROLLERS = ("cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma", "misc")
SHIMS = "_shims"
DAEMON = "_daemon"
UNPOPULATE_GRACE_S = 10.0


class StartupError(Exception):
    """The daemon cannot start; one line for the operator."""


class Node:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.classes = cfg.classes
        self.queue = NodeQueue(cfg.classes.ranks())
        self.jobs: dict[str, Job] = {}  # queued + running
        self.finished: OrderedDict[str, dict] = OrderedDict()  # bounded, newest last
        self.finished_total = 0
        self.next_id = 1
        self.started_at = time.time()
        self.degraded: list[str] = []
        self.watcher = PopulatedWatcher()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.journal: Journal | None = None
        self._lock_fd = -1

    # -- startup ------------------------------------------------------------------------
    def setup(self) -> None:
        """Everything that can fail before we accept work: priority, state dir, cgroups."""
        self._setup_sched()
        self._setup_state_dir()
        self._setup_cgroups()
        self._setup_memory()
        if (reason := clone3.unavailable_reason()) is not None:
            raise StartupError(reason)
        self.self_test()

    def _setup_sched(self) -> None:
        prio = self.cfg.daemon_priority
        try:
            # reset-on-fork: nothing we start inherits our priority by accident; shims and
            # jobs set theirs explicitly
            sched.set_process_policy(os.getpid(), os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, prio)
        except OSError as e:
            raise StartupError(
                f"cannot run at SCHED_FIFO {prio}: {e.strerror} (needs root / CAP_SYS_NICE "
                "and RT runtime in the daemon's v1 cpu cgroup)"
            ) from None
        thr = sched.rt_throttling()
        self.rt_throttling = thr
        if thr is None:
            self.degraded.append("RT throttling settings unreadable")
        elif thr[0] < 0:
            self.degraded.append(
                "RT throttling is off (sched_rt_runtime_us=-1): SCHED_OTHER work can be starved "
                "by RT jobs; xxnode never changes it"
            )

    def _setup_state_dir(self) -> None:
        sd = self.cfg.state_dir
        try:
            sd.mkdir(parents=True, exist_ok=True)
            os.chmod(sd, 0o700)
            (sd / "jobs").mkdir(exist_ok=True)
            os.chmod(sd / "jobs", 0o711)  # job user needs no access; its cwd is elsewhere
            self._lock_fd = os.open(sd / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StartupError(f"state dir {sd}: {e.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StartupError(f"another xxnode owns the state dir {sd}") from None

    def _setup_cgroups(self) -> None:
        mount = find_cgroup2_mount()
        if mount is None:
            raise StartupError("no cgroup2 filesystem mounted")
        spec = self.cfg.cgroup_root
        if spec == "@self":
            self.root = Cgroup(mount / own_cgroup().lstrip("/"))
        else:
            rel = Path(spec.lstrip("/"))
            if ".." in rel.parts:
                raise StartupError(f"node.cgroup_root: must stay under {mount}, got {spec!r}")
            self.root = Cgroup(mount / rel)
        try:
            self.root.path.mkdir(parents=True, exist_ok=True)
            if spec == "@self":
                # no internal processes: leave the root to the subtree
                self.root.create(DAEMON).attach(os.getpid())
            available = self.root.controllers()
            self.rt_group = rt_group.detect()
            self.withheld: dict[str, str] = {}
            want = set(available)
            if self.rt_group[0] and "cpu" in want:
                want.discard("cpu")
                self.withheld["cpu"] = (
                    f"RT group scheduling is on ({self.rt_group[1]}): a cgroup with the cpu "
                    "controller gets no RT runtime, so SCHED_FIFO would be refused in it"
                )
            if self.rt_group[0] and "cpu" in available and self.root.has("cpu.weight"):
                self.degraded.append(
                    f"the cpu controller is enabled on {self.root.path} by its parent while RT "
                    "group scheduling is on: SCHED_FIFO jobs will be refused; disable cpu above"
                )
            if self.root.procs():
                raise StartupError(
                    f"{self.root.path} holds processes; a cgroup with controllers for its "
                    "children must not (use a fresh node.cgroup_root, or @self under systemd)"
                )
            self.enabled = self.root.enable(want)
            for c in self.classes:
                cg = self.root.create(c.name)
                cg.enable(self.enabled)
            self._rotate_shims()
        except CgroupError as e:
            raise StartupError(f"cgroup setup under {self.root.path}: {e}") from None
        missing = [c for c in ALL_CONTROLLERS if c not in self.enabled]
        self.missing = missing
        if missing:
            self.degraded.append(
                f"cgroup v2 controllers not available here: {' '.join(missing)} "
                f"(jobs still get their cgroup, SCHED_FIFO, cgroup.kill and cpu.stat"
                + ("; no pids.max" if "pids" in missing else "")
                + ("; no memory.peak" if "memory" in missing else "")
                + ")"
            )

    def _setup_memory(self) -> None:
        """The memory manager (class-ordered reclaim) and the eBPF counters it reports.
        Each missing piece is a named degraded mode, never a refusal to start."""
        from xxnode.kernel import bpf, swap

        managed = "memory" in self.enabled
        self.memory = MemoryManager(
            self.root, self.classes.ranks(), self.cfg.memory, jobs=self._memory_jobs,
            memory_controller=managed, psi_ok=(self.root.path / "memory.pressure").exists(),
        )  # fmt: skip
        if not managed:
            self.degraded.append(
                "memory-unmanaged: no memory controller, so no class-ordered reclaim, swap "
                "limits or OOM groups; memory is watched through PSI and /proc/meminfo"
            )
        self.degraded += [f"memory: {problem}" for problem in self.memory.setup()]
        if managed and not swap.swap_devices():
            self.degraded.append(
                "no-swap: no swap device, so low classes cannot be swapped out; the OOM order "
                "by class is the only protection"
            )
        self.bpf = None
        try:
            self.bpf = bpf.MemWatch.open()
            if self.bpf.missing:
                self.degraded.append(self.bpf.degraded())
        except bpf.BpfUnavailable as e:
            self.degraded.append(f"no-ebpf: {e}; per-job counters from cgroup files only")

    def _memory_jobs(self) -> list[JobRef]:
        return [
            JobRef(j.id, j.cls, self.leaf(j), j.started_at or j.accepted_at)
            for j in self.jobs.values()
            if j.state == "running"
        ]

    def memory_snapshot(self) -> dict:
        snap = self.memory.snapshot()
        if self.bpf is not None:
            counters = self.bpf.read()
            for j in snap["jobs"]:
                leaf = self.root.child(j["cls"]).child(j["job_id"])
                with _suppress_enoent():
                    c = counters.get(leaf.id)
                    j["ebpf"] = dataclasses.asdict(c) if c else {}
        snap["ebpf"] = "off" if self.bpf is None else ", ".join(self.bpf.attached())
        return snap

    def _rotate_shims(self) -> None:
        """Shims live in a cgroup created for this daemon run: a CLONE_INTO_CGROUP child dies
        at birth if its parent's cgroup and the target differ in kill_seq (6.14+, see
        _clone3_build.py), and a fresh cgroup has never been killed. Empty ones of earlier
        runs go; those still holding adopted shims stay until they empty."""
        self.shims = self.root.create(f"{SHIMS}-{time.time_ns()}")
        self._remove_old_shims()

    def _remove_old_shims(self) -> None:
        for cg in self.root.children():
            if cg.path.name.startswith(SHIMS) and cg.path != self.shims.path:
                try:
                    cg.remove()
                except CgroupError:
                    pass  # adopted shims still in it

    def self_test(self) -> None:
        """Launch /bin/true through the whole path once, so a host where jobs cannot start
        (SCHED_FIFO refused in the leaf, children killed at birth, ...) fails at start with
        the reason instead of failing every job."""
        leaf = self.root.child(self.classes[0].name).create(f"selftest-{os.getpid()}")
        jd = self.cfg.state_dir / f"selftest-{os.getpid()}"
        shutil.rmtree(jd, ignore_errors=True)
        jd.mkdir()
        c = self.classes[0]
        req = self._spawn_request(c, leaf, jd, "/bin/true", ["true"], env={})
        try:
            try:
                sp = clone3.spawn(req)
            except clone3.SpawnError as e:
                sp = getattr(e, "spawned", None)
                if sp is not None:
                    os.waitid(os.P_PIDFD, sp.shim_pidfd, os.WEXITED)
                    os.close(sp.shim_pidfd)
                    sp.release()
                raise StartupError(
                    f"self-test launch of /bin/true as {c.name} ({c.sched_text()}) failed: {e}"
                ) from None
            os.waitid(os.P_PIDFD, sp.shim_pidfd, os.WEXITED)
            os.close(sp.shim_pidfd)
            sp.release()
            rec = clone3.read_exit(jd) or {}
            if rec.get("wait_status", -1) != 0:
                raise StartupError(f"self-test launch of /bin/true exited with status {rec}")
        finally:
            shutil.rmtree(jd, ignore_errors=True)
            self.watcher.wait(leaf, UNPOPULATE_GRACE_S)
            leaf.remove()

    # -- recovery ------------------------------------------------------------------------
    def recover(self) -> None:
        """Rebuild from the journal and the state dir; adopt jobs that kept running."""
        jpath = self.cfg.state_dir / "journal.jsonl"
        pending: dict[str, Job] = {}
        for rec in Journal.replay(jpath):
            jid, ev = rec["job"], rec["ev"]
            self._bump_id(jid)
            if ev == "accepted":
                spec = rec["spec"]
                pending[jid] = Job(jid, spec["class"], spec, rec["t"])
            elif jid not in pending:
                continue
            elif ev == "started":
                j = pending[jid]
                j.state, j.started_at, j.pid, j.shim_pid = (
                    "running",
                    rec["t"],
                    rec.get("pid"),
                    rec.get("shim_pid"),
                )
            elif ev == "kill":
                pending[jid].kill_reason = rec.get("reason")
            elif ev == "finished":
                del pending[jid]
                self._remember(rec["result"])
        self.journal = Journal(jpath)
        known = set(pending)
        requeue = []
        for job in pending.values():
            if self.classes.get(job.cls) is None:
                # the class was removed from the config: refuse rather than guess
                log.warning("job %s: class %r no longer configured", job.id, job.cls)
                self._finish_now(job, "lost", f"class {job.cls!r} no longer configured")
                continue
            if self._recover_one(job):
                requeue.append(job)
        for job in requeue:
            job.state = "queued"
            job.started_at = job.pid = job.shim_pid = None
            self.jobs[job.id] = job
            self.queue.push(job.id, job.cls, job.accepted_at)
        self._reap_orphan_leaves(known)
        self._prune_job_dirs()
        n_run = sum(1 for j in self.jobs.values() if j.state == "running")
        if pending:
            log.info("recovered: %d running job(s) adopted, %d re-queued", n_run, len(requeue))

    def _recover_one(self, job: Job) -> bool:
        """Adopt or finalize one unfinished job; True if it never started (re-queue it)."""
        jd = self.job_dir(job.id)
        for _ in range(3):
            if clone3.read_exit(jd) is not None:
                self._adopt(job, None)  # finalize from the exit record
                return False
            state, pid = clone3.shim_state(jd)
            if state == "alive":
                try:
                    pidfd = os.pidfd_open(pid)
                except ProcessLookupError:
                    continue  # it just exited: look again
                self._adopt(job, pidfd, pid)
                return False
            if state == "dead":
                if clone3.read_exit(jd) is not None:
                    continue
                self._adopt(job, None)  # shim died without a record: "lost"
                return False
            if state == "none" and not clone3.claim_void(jd):
                continue  # a shim claimed it just now
            # never started: no shim ever will now
            self._discard_attempt(job)
            return True
        raise RuntimeError(f"job {job.id}: state dir keeps changing under recovery")

    def _adopt(self, job: Job, pidfd: int | None, shim_pid: int | None = None) -> None:
        job.state = "running"
        job.shim_pid = shim_pid or job.shim_pid
        job.is_child = False
        self.jobs[job.id] = job
        if pidfd is None:
            self._after_start.append(job)  # finalize once the loop runs
        else:
            job.shim_pidfd = pidfd
            self._after_start_watch.append(job)

    def _discard_attempt(self, job: Job) -> None:
        jd = self.job_dir(job.id)
        if jd.exists():
            dead = jd.with_name(f"{job.id}.void-{time.time_ns()}")
            jd.rename(dead)
            shutil.rmtree(dead, ignore_errors=True)
        leaf = self.leaf(job)
        if leaf.exists():
            leaf.kill() if leaf.populated() else None
            self.watcher.wait(leaf, UNPOPULATE_GRACE_S)
            leaf.remove()

    def _reap_orphan_leaves(self, known: set[str]) -> None:
        for c in self.classes:
            for leaf in self.root.child(c.name).children():
                if leaf.path.name not in known:
                    log.warning("orphan job cgroup %s (no journal record): killed", leaf.path)
                    try:
                        leaf.kill()
                        self.watcher.wait(leaf, UNPOPULATE_GRACE_S)
                        leaf.remove_tree()
                    except CgroupError as e:
                        log.warning("%s", e)

    def _bump_id(self, jid: str) -> None:
        try:
            self.next_id = max(self.next_id, int(jid.lstrip("j")) + 1)
        except ValueError:
            pass

    # -- paths ---------------------------------------------------------------------------
    def job_dir(self, jid: str) -> Path:
        return self.cfg.state_dir / "jobs" / jid

    def leaf(self, job: Job) -> Cgroup:
        return self.root.child(job.cls).child(job.id)

    # -- running the loop -----------------------------------------------------------------
    async def run(self, server_factory) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.watcher.fileno(), self.watcher.dispatch)
        for job in self._after_start_watch:
            self.loop.add_reader(job.shim_pidfd, self._on_shim_exit, job)
        for job in self._after_start:
            self.loop.create_task(self._finalize(job))
        self._after_start = self._after_start_watch = []
        self.dispatch()
        memory_task = self.loop.create_task(self.memory.run())
        self.dispatcher = None
        if self.cfg.cluster is not None:
            from xxnode.node import executor

            self.dispatcher = await executor.start(self, self.cfg.cluster)
            log.info("dispatcher %s serving shards %s", self.dispatcher.node_id,
                     ", ".join(self.cfg.cluster.shards))  # fmt: skip
        try:
            await server_factory(self)
        finally:
            memory_task.cancel()
            if self.dispatcher is not None:
                self.dispatcher.close()

    _after_start: list = []
    _after_start_watch: list = []

    def prepare(self) -> None:
        self._after_start, self._after_start_watch = [], []
        self.setup()
        self.recover()

    # -- admission -----------------------------------------------------------------------
    def submit(self, req: dict) -> Job:
        spec = J.validate(req, self.cfg)
        jid = f"j{self.next_id:06d}"
        self.next_id += 1
        job = Job(jid, spec["class"], spec, time.time())
        # durable before anyone is told "accepted": a crash from here on loses nothing
        self.journal.append(
            {"ev": "accepted", "job": jid, "t": job.accepted_at, "spec": spec}, sync=True
        )
        self.jobs[jid] = job
        self.queue.push(jid, job.cls, job.accepted_at)
        self.dispatch()
        return job

    def running_at_or_above(self, rank: int) -> int:
        return sum(
            1
            for j in self.jobs.values()
            if j.state == "running" and self.classes.get(j.cls).rank >= rank
        )

    def dispatch(self) -> None:
        """Start queued jobs, highest class first. A job of class C may start while fewer
        than max_running jobs of class >= C run: lower classes never delay a higher one
        (the kernel preempts them), so the queue only ever orders equals and betters."""
        while True:
            head = self.queue.peek_next()
            if head is None:
                return
            jid, cls = head
            if self.running_at_or_above(self.classes.get(cls).rank) >= self.cfg.max_running:
                return
            self.queue.pop_next()
            self._start(self.jobs[jid])

    def _spawn_request(self, c, leaf: Cgroup, jd: Path, path: str, argv: list[str], **kw):
        """What every launch gets from its class — policy and priority for the job and its
        shim, the unprivileged user, the OOM rank — in one place (self-test and jobs)."""
        shim_policy, shim_prio = c.shim_sched
        return clone3.SpawnRequest(
            path=path, argv=argv, job_cgroup=leaf.path, job_dir=jd,
            job_policy=c.sched_policy, job_priority=c.priority,
            shim_policy=shim_policy, shim_priority=shim_prio,
            user=clone3.User(self.cfg.uid, self.cfg.gid, self.cfg.groups),
            shim_cgroup=self.shims.path, oom_score_adj=self.memory.oom_adj(c.name), **kw,
        )  # fmt: skip

    def _start(self, job: Job) -> None:
        c = self.classes.get(job.cls)
        jd = self.job_dir(job.id)
        try:
            jd.mkdir()
            leaf = self.root.child(job.cls).create(job.id, exist_ok=False)
            if "pids" in self.enabled:
                leaf.write("pids.max", self.cfg.pids_max)
            if "memory" in self.enabled and leaf.has("memory.oom.group"):
                leaf.write("memory.oom.group", 1)  # an OOM kill takes the whole job
        except (OSError, CgroupError) as e:
            self._finish_now(job, "start_failed", f"setting up: {e}")
            return
        req = self._spawn_request(
            c, leaf, jd, job.spec["path"], job.spec["argv"],
            env=J.job_env(job.spec, job.id, self.cfg), cwd=job.spec["cwd"],
            stdin=_b64(job.spec["stdin"]), out_limit=self.cfg.output_limit,
            timeout_s=job.spec["timeout"],
        )  # fmt: skip
        job.state = "running"
        job.is_child = True
        try:
            sp = clone3.spawn(req)
        except clone3.SpawnError as e:
            sp = getattr(e, "spawned", None)
            if e.stage in clone3.STAGES_KILLED_AT_BIRTH:
                log.warning("job %s: %s; moving shims to a fresh cgroup", job.id, e)
                self._rotate_shims()
            if sp is None:
                self._finish_now(job, "start_failed", str(e))
                return
            log.info("job %s did not start: %s", job.id, e)
        job.spawned = sp
        job.shim_pid, job.shim_pidfd = sp.shim_pid, sp.shim_pidfd
        job.pid = sp.job_pid or None
        job.started_at = sp.start_ns / 1e9 if sp.start_ns else time.time()
        self.journal.append(
            {
                "ev": "started",
                "job": job.id,
                "t": job.started_at,
                "pid": job.pid,
                "shim_pid": job.shim_pid,
            }
        )
        self.loop.add_reader(job.shim_pidfd, self._on_shim_exit, job)
        log.info("job %s (%s) started: pid %s, %s", job.id, job.cls, job.pid, c.sched_text())

    # -- completion -----------------------------------------------------------------------
    def _on_shim_exit(self, job: Job) -> None:
        self.loop.remove_reader(job.shim_pidfd)
        if job.is_child:
            try:
                os.waitid(os.P_PIDFD, job.shim_pidfd, os.WEXITED)
            except ChildProcessError:
                pass
        os.close(job.shim_pidfd)
        job.shim_pidfd = -1
        if job.spawned is not None:
            job.spawned.release()  # its stack lived in our address space
            job.spawned = None
        self.loop.create_task(self._finalize(job))

    async def _finalize(self, job: Job) -> None:
        jd = self.job_dir(job.id)
        exitrec = clone3.read_exit(jd)
        leaf = self.leaf(job)
        lost = None
        if exitrec is None:
            lost = "the job's shim died before recording its exit; job killed"
            log.warning("job %s: %s", job.id, lost)
        if leaf.exists():
            # the shim killed the leaf when the job's main process exited; wait it out
            for _ in range(3):
                if not leaf.populated():
                    break
                leaf.kill()
                await self._wait_empty(leaf)
        cpu = leaf.cpu_stat() if leaf.exists() else {}
        peak = leaf.read_int("memory.peak") if leaf.has("memory.peak") else None
        oom = leaf.memory_events().get("oom_kill") if leaf.has("memory.events") else None
        if job.pid is None and exitrec and exitrec.get("job_pid", 0) > 0:
            job.pid = exitrec["job_pid"]
        res = J.make_result(
            job, exitrec, cpu, peak, oom, self.classes.get(job.cls).price, time.time(), lost
        )
        self._record_finished(job, res)
        try:
            leaf.remove()
        except CgroupError as e:
            log.warning("job %s: %s", job.id, e)
        for name in (clone3.SHIM_FILE, clone3.EXIT_FILE):
            with _suppress_enoent():
                (jd / name).unlink()
        if not job.is_child:
            self._remove_old_shims()  # an adopted shim gone: its old cgroup may be empty now
        self.dispatch()

    async def _wait_empty(self, leaf: Cgroup) -> None:
        fut = self.loop.create_future()
        self.watcher.watch(leaf, lambda: fut.done() or fut.set_result(None))
        try:
            await asyncio.wait_for(fut, UNPOPULATE_GRACE_S)
        except TimeoutError:
            log.warning(
                "%s still populated %.0f s after cgroup.kill", leaf.path, UNPOPULATE_GRACE_S
            )

    def _finish_now(self, job: Job, state: str, reason: str) -> None:
        res = J.make_result(
            job,
            None,
            {},
            None,
            None,
            self.classes.get(job.cls).price if self.classes.get(job.cls) else 0.0,
            time.time(),
            reason,
        )
        res["state"] = state
        self._record_finished(job, res)
        leaf = self.leaf(job) if self.classes.get(job.cls) else None
        if leaf is not None and leaf.exists() and not leaf.populated():
            with _suppress_enoent():
                leaf.remove()
        if self.loop is not None:
            self.dispatch()

    def _record_finished(self, job: Job, res: dict) -> None:
        # durable before the leaf goes and before anyone hears of it: billing reads this
        self.journal.append(
            {"ev": "finished", "job": job.id, "t": time.time(), "result": res}, sync=True
        )
        job.state, job.result = "finished", res
        self.jobs.pop(job.id, None)
        self._remember(res)
        log.info(
            "job %s (%s) %s%s: wall %.1f ms, cpu %.1f ms",
            job.id,
            job.cls,
            res["state"],
            f" ({res['reason']})" if res["reason"] else "",
            res["wall_ms"],
            res["cpu_ms"],
        )
        for fut in job.waiters:
            if not fut.done():
                fut.set_result(res)
        job.waiters.clear()

    def _remember(self, res: dict) -> None:
        self.finished[res["job"]] = res
        self.finished_total += 1
        while len(self.finished) > self.cfg.keep_finished:
            old, _ = self.finished.popitem(last=False)
            shutil.rmtree(self.job_dir(old), ignore_errors=True)

    def _prune_job_dirs(self) -> None:
        keep = set(self.finished) | set(self.jobs)
        for d in (self.cfg.state_dir / "jobs").iterdir():
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)

    # -- control ---------------------------------------------------------------------------
    def kill(self, jid: str, reason: str = "killed by request") -> dict:
        job = self.jobs.get(jid)
        if job is None:
            if jid in self.finished:
                return {"ok": False, "error": f"job {jid} already finished"}
            return {"ok": False, "error": f"no such job {jid}"}
        if job.state == "queued":
            self.queue.remove(jid)
            res = J.cancelled_result(job, reason, time.time(), self.classes.get(job.cls).price)
            self._record_finished(job, res)
            return {"ok": True, "job": jid, "state": "cancelled"}
        job.kill_reason = reason
        self.journal.append(
            {"ev": "kill", "job": jid, "t": time.time(), "reason": reason}, sync=True
        )
        try:
            self.leaf(job).kill()
        except CgroupError as e:
            return {"ok": False, "error": str(e)}
        return {"ok": True, "job": jid, "state": "killing"}

    async def wait(self, jid: str) -> dict | None:
        if jid in self.finished:
            return self.finished[jid]
        job = self.jobs.get(jid)
        if job is None:
            return None
        fut = self.loop.create_future()
        job.waiters.append(fut)
        return await fut

    def status(self) -> dict:
        running = {c: 0 for c in self.classes.names()}
        for j in self.jobs.values():
            if j.state == "running":
                running[j.cls] += 1
        pol, prio = sched.get_policy(0)
        return {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "config": self.cfg.source,
            "daemon_sched": f"{sched.POLICY_NAMES.get(pol & ~os.SCHED_RESET_ON_FORK, pol)} {prio}",
            "cgroup_root": str(self.root.path),
            "controllers_enabled": sorted(self.enabled),
            "controllers_missing": self.missing,
            "controllers_withheld": self.withheld,
            "rt_group_sched": {"active": self.rt_group[0], "detail": self.rt_group[1]},
            "rt_throttling": self.rt_throttling,
            "state_dir": str(self.cfg.state_dir),
            "user": self.cfg.user,
            "max_running": self.cfg.max_running,
            "running": running,
            "queued": self.queue.by_class(),
            "finished_total": self.finished_total,
            "degraded": self.degraded,
        }

    def classes_info(self) -> list[dict]:
        out = []
        for c in self.classes:
            out.append(
                {
                    "name": c.name,
                    "rank": c.rank,
                    "price": c.price,
                    "policy": c.policy,
                    "priority": c.priority,
                    "sched": c.sched_text(),
                    "description": c.description,
                }
            )
        return out

    def list_jobs(self, cls: str | None = None, limit: int = 100) -> list[dict]:
        live = [j.summary() for j in self.jobs.values()]
        done = [
            {
                "job": r["job"],
                "class": r["class"],
                "state": r["state"],
                "pid": r["pid"],
                "argv": r["argv"],
                "accepted_at": r["accepted_at"],
                "started_at": r["started_at"],
                "wall_ms": r["wall_ms"],
                "cpu_ms": r["cpu_ms"],
                "exit_code": r["exit_code"],
                "reason": r["reason"],
            }
            for r in list(self.finished.values())[-limit:]
        ]
        rows = live + done
        if cls:
            rows = [r for r in rows if r["class"] == cls]
        return rows

    def read_output(self, jid: str, name: str, limit: int) -> str:
        try:
            with open(self.job_dir(jid) / name, "rb") as f:
                return f.read(limit).decode(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        if self.journal:
            self.journal.close()


Job = J.Job


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text) if text else b""


class _suppress_enoent:
    def __enter__(self):
        return self

    def __exit__(self, tp, val, tb):
        return (
            tp is not None
            and issubclass(tp, OSError)
            and getattr(val, "errno", None) == errno.ENOENT
        )

"""Every function environment on one node: the code store, the uids, the zygote, the Runtime
API listener, and which environment serves which invocation.

An invocation goes to an idle environment of the same function version (warm_pool.pick_idle),
else to a new one while the function has fewer than `max_concurrency`, else it waits — in
class order, first come first served within a class — until one of that function's
environments is idle again. Keep-alive and the per-function idle cap are warm_pool's
decisions, timed to the next expiry (no polling).

Cgroups: <root>/_envs/<env> per environment (the class changes per invocation, so the leaf is
not under a class), <root>/_zygote for the zygote (never billed to a tenant).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import os
import shlex
import sys
import time
from collections import OrderedDict
from pathlib import Path

from xxnode import metrics
from xxnode.classes import ClassTable
from xxnode.config.functions import FunctionsConfig
from xxnode.kernel.cgroup import Cgroup, CgroupError
from xxnode.kernel.cgroup_watch import PopulatedWatcher
from xxnode.node.env import sandbox
from xxnode.node.env.code import CodeStore
from xxnode.node.env.environment import Environment
from xxnode.node.env.function import FunctionVersion
from xxnode.node.env.http_bridge import HttpBridge, free_port
from xxnode.node.env.invocation import Invocation
from xxnode.node.env.lambda_proxy import LambdaProxy
from xxnode.node.env.runtime_api import RuntimeApi
from xxnode.node.env.zygote import SpawnFailed, Zygote
from xxnode.node.memory import IDLE, JobRef
from xxnode.policy import warm_pool

log = logging.getLogger("xxnode")

ENVS = "_envs"
ZYGOTE = "_zygote"
KEEP_RESULTS = 1000
STALE_GRACE_S = 10.0  # cgroup.kill is asynchronous; an emptied tree is removable
HTTP_READY_S = 10.0  # an http function must listen on $PORT this soon (Lambda's init limit)
RATE_TAU_S = 60.0  # how far back "invoked often" looks when choosing whom to kill


class FunctionsUnavailable(Exception):
    """This node cannot run functions; the message says why (shown by status and doctor)."""


class UidRange:
    """Each environment its own uid (as systemd's DynamicUser): uid = identity at the Runtime
    API, at kill(2), and on every file. A uid is reused only once its cgroup is empty."""

    def __init__(self, first: int, count: int):
        self.free = list(range(first, first + count))
        heapq.heapify(self.free)

    def take(self) -> int:
        if not self.free:
            raise FunctionsUnavailable("no free environment uid (functions.uid_count)")
        return heapq.heappop(self.free)

    def give(self, uid: int) -> None:
        heapq.heappush(self.free, uid)


class Pool:
    def __init__(
        self,
        cfg: FunctionsConfig,
        classes: ClassTable,
        root: Cgroup,
        enabled: set[str],
        state_dir: Path,
        hide: tuple[str, ...],
        watcher: PopulatedWatcher,
    ):
        self.cfg, self.classes = cfg, classes
        self.enabled = enabled
        self.envs_cg = root.child(ENVS)
        self.root = root
        # fresh per run, as the shims' cgroup: a CLONE_INTO_CGROUP child dies at birth when
        # its parent's cgroup and the target differ in kill_seq (kernel/clone3.c)
        self.zygote_cg = root.child(f"{ZYGOTE}-{time.time_ns()}")
        self.code = CodeStore(state_dir / "code", cfg.max_code_zipped, cfg.max_code_unpacked)
        self.hide = hide
        self.watcher = watcher
        self.uids = UidRange(cfg.uid_first, cfg.uid_count)
        self.by_uid: dict[int, Environment] = {}
        self.envs: dict[str, Environment] = {}
        self.by_key: dict[str, list[Environment]] = {}  # function key -> its environments
        self.waiting: dict[str, list] = {}  # function key -> heap of (-rank, seq, Invocation)
        self.seq = itertools.count()
        self.front = itertools.count(-(1 << 62))  # requeued ones sort before every arrival
        self.env_ids = itertools.count(1)
        self.results: OrderedDict[str, dict] = OrderedDict()  # request id -> result (bounded)
        self.api = RuntimeApi(self.by_uid.get)
        self.proxy = LambdaProxy(self.api.owner_of, b"")  # the cluster sets its key
        self.zygote: Zygote | None = None  # started once the listener's address is known
        self.keepalive: asyncio.TimerHandle | None = None
        self.rates: dict[str, tuple[float, float]] = {}  # key -> (rate, when), decayed
        self.stats = {
            "invocations": 0, "cold": 0, "errors": 0, "timeouts": 0, "spawn_failed": 0,
            "evicted_for_memory": 0,
        }  # fmt: skip

    async def start(self) -> None:
        for d in (sandbox.TASK_ROOT,):
            try:
                os.makedirs(d, mode=0o755, exist_ok=True)
            except OSError as e:
                raise FunctionsUnavailable(
                    f"cannot create the mount point {d}: {e.strerror}"
                ) from None
        try:
            self.envs_cg.path.mkdir(exist_ok=True)
            self.envs_cg.enable(self.enabled)
            self.zygote_cg.path.mkdir(exist_ok=True)
            self._clear_earlier_run()
        except (OSError, CgroupError) as e:
            raise FunctionsUnavailable(f"environment cgroups: {e}") from None
        await self.api.start()
        await self.proxy.start()
        self.zygote = Zygote(self._exited, self.api.address, self.zygote_cg)
        await self.zygote.start()

    def _clear_earlier_run(self) -> None:
        """Environments are warm caches, not state: those of an earlier run (and its zygote,
        which exits when its daemon's socket closes) are killed and removed before any of
        their uids is handed out again."""
        stale = [cg for cg in self.envs_cg.children()]
        stale += [
            cg for cg in self.root.children()
            if cg.path.name.startswith(ZYGOTE) and cg.path != self.zygote_cg.path
        ]  # fmt: skip
        for cg in stale:
            cg.kill()
        for cg in stale:
            if not self.watcher.wait(cg, STALE_GRACE_S):
                raise FunctionsUnavailable(f"{cg.path} did not empty after cgroup.kill")
            cg.remove()
        if stale:
            log.info("functions: removed %d environments of an earlier run", len(stale))

    # -- invocations ------------------------------------------------------------------------
    def register_code(self, path_or_bytes) -> str:
        if isinstance(path_or_bytes, bytes | bytearray):
            return self.code.put_zip(bytes(path_or_bytes))
        return self.code.put_path(Path(path_or_bytes))

    async def invoke(
        self, fn: FunctionVersion, payload: bytes, cls: str, caller: dict | None = None
    ) -> dict:
        """``caller``: the chain this invocation is part of (gateway/caller.py), which its
        own calls through the Lambda proxy inherit."""
        c = self.classes.get(cls)
        if c is None:
            raise ValueError(
                f"class: no such class {cls!r} (have {', '.join(self.classes.names())})"
            )
        loop = asyncio.get_running_loop()
        inv = Invocation(
            fn, payload, cls, fn.timeout, c.price, self.cfg.memory_price, self.cfg.log_limit
        )
        inv.future = loop.create_future()
        inv.caller = caller
        self.stats["invocations"] += 1
        self._note_rate(fn.key)
        env = self._idle_env(fn.key)
        if env is not None:
            env.assign(inv, c)
        elif self._count(fn.key) < self.cfg.max_concurrency:
            asyncio.ensure_future(self._cold(fn, inv))
        else:
            heapq.heappush(self.waiting.setdefault(fn.key, []), (-c.rank, next(self.seq), inv))
        result = await inv.future
        self._remember(result)
        return result

    async def _cold(self, fn: FunctionVersion, inv: Invocation) -> None:
        self.stats["cold"] += 1
        try:
            env = await self._spawn(fn)
        except (SpawnFailed, FunctionsUnavailable, CgroupError, OSError) as e:
            self.stats["spawn_failed"] += 1
            inv.cold = True
            inv.finish(None, "", {"errorType": "Runtime.SandboxError", "errorMessage": str(e)})
            return
        env.reserved = False
        env.assign(inv, self.classes.get(inv.cls))

    async def _spawn(self, fn: FunctionVersion) -> Environment:
        code = self.code.path(fn.digest)
        env_id = f"e{next(self.env_ids)}-{os.getpid()}"
        uid = self.uids.take()
        cg = self.envs_cg.child(env_id)
        try:
            cg.path.mkdir()
            if "pids" in self.enabled:
                cg.write("pids.max", self.cfg.max_processes)
        except (OSError, CgroupError):
            self.uids.give(uid)
            raise
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        env = Environment(
            env_id, fn, uid, cg, out_r, self.cfg.response_limit, self._idle, self._dead
        )
        env.reserved = True  # for the invocation _cold hands it once the spawn returns
        self.envs[env_id] = env
        self.by_key.setdefault(fn.key, []).append(env)
        self.by_uid[uid] = env
        first = self.classes[0]
        plan = sandbox.Plan(
            cgroup=str(cg.path), uid=uid, gid=uid, code=str(code), tmp_size=self.cfg.tmp_size,
            hide=self.hide, policy=first.sched_policy, priority=first.priority if first.is_rt else 0,
            max_processes=self.cfg.max_processes,
        )  # fmt: skip
        req = {
            "spawn": env_id,
            "plan": plan.__dict__ | {"hide": list(plan.hide)},
            "env": fn.environ(self.api.address, env_id, None, self.proxy.url),
            "handler": fn.handler,
        }
        port = None
        if fn.runtime == "http":
            port = free_port()
            req["env"] = fn.environ(self.api.address, env_id, port, self.proxy.url)
            argv = shlex.split(fn.handler) if fn.handler else ["/var/task/bootstrap"]
            req |= {"mode": "exec", "argv": argv}
        elif fn.python and self.cfg.zygote:
            req["mode"] = "python"
        elif fn.python:
            req |= {"mode": "exec", "argv": [sys.executable, "-m", "awslambdaric", fn.handler]}
        else:
            req |= {"mode": "exec", "argv": ["/var/task/bootstrap"]}
        try:
            env.pid = await self.zygote.spawn(req, out_w)
        except SpawnFailed:
            env.kill("spawn failed")
            raise
        finally:
            os.close(out_w)
        if port is not None:
            env.bridge = HttpBridge(env, port, self.cfg.response_limit, HTTP_READY_S)
        return env

    def _idle_env(self, key: str) -> Environment | None:
        """An idle one, else one that has just answered and is about to ask /next again (a
        new environment would cost a cold start to save a fraction of a millisecond)."""
        mine = self.by_key.get(key, ())
        idle = [
            warm_pool.IdleEnv(e.env_id, key, e.idle_since, 0, e.init_ms, False)
            for e in mine
            if e.available
        ]
        pick = warm_pool.pick_idle(idle, key)
        if pick is not None:
            return self.envs[pick.env_id]
        # an answered one keeps that state until its next /next, holding what it was given
        free = (e for e in mine if e.state == "answered" and e.current is None and not e.reserved)
        return next(free, None)

    def _count(self, key: str) -> int:
        return len(self.by_key.get(key, ()))

    # -- environment events -------------------------------------------------------------------
    def _idle(self, env: Environment) -> None:
        """An environment asks for work: the best waiting invocation of its function, if any."""
        if env.reserved:  # its own cold invocation is on its way
            return
        q = self.waiting.get(env.fn.key)
        if q:
            _, _, inv = heapq.heappop(q)
            if not q:
                del self.waiting[env.fn.key]
            env.assign(inv, self.classes.get(inv.cls))
            return
        self._arm_keepalive()

    def _dead(self, env: Environment) -> None:
        self.envs.pop(env.env_id, None)
        mine = self.by_key.get(env.fn.key, [])
        if env in mine:
            mine.remove(env)
            if not mine:
                del self.by_key[env.fn.key]
        cg, uid = env.cgroup, env.uid

        def gone():
            if self.by_uid.get(uid) is env:
                del self.by_uid[uid]
            self.uids.give(uid)
            try:
                cg.remove()
            except CgroupError as e:
                log.debug("env %s cgroup: %s", env.env_id, e)

        self.watcher.watch(cg, gone)
        if env.orphan is not None:  # first in its class: it was already on its way
            inv, env.orphan = env.orphan, None
            rank = self.classes.get(inv.cls).rank
            heapq.heappush(self.waiting.setdefault(env.fn.key, []), (-rank, next(self.front), inv))
        # an invocation waiting for this function may need a new environment now
        q = self.waiting.get(env.fn.key)
        if q and self._count(env.fn.key) < self.cfg.max_concurrency:
            _, _, inv = heapq.heappop(q)
            if not q:
                del self.waiting[env.fn.key]
            asyncio.ensure_future(self._cold(env.fn, inv))

    def _exited(self, env_id: str, status: int) -> None:
        env = self.envs.get(env_id)
        if env is not None:
            env.exited(status)

    # -- keep-alive ---------------------------------------------------------------------------
    def _idle_views(self) -> list[warm_pool.IdleEnv]:
        return [
            warm_pool.IdleEnv(e.env_id, e.fn.key, e.idle_since, 0, e.init_ms, False)
            for e in self.envs.values()
            if e.available
        ]

    def _policy(self) -> warm_pool.PoolPolicy:
        return warm_pool.PoolPolicy(self.cfg.keep_alive, self.cfg.max_idle_per_function)

    def _arm_keepalive(self) -> None:
        now = time.monotonic()
        for eid in warm_pool.expired(self._idle_views(), now, self._policy()):
            self.envs[eid].kill("keep-alive expired or over the idle cap")
        if self.keepalive is not None:
            self.keepalive.cancel()
            self.keepalive = None
        when = warm_pool.next_deadline(self._idle_views(), now, self._policy())
        if when is not None:
            loop = asyncio.get_running_loop()
            self.keepalive = loop.call_at(loop.time() + (when - now), self._arm_keepalive)

    def _note_rate(self, key: str) -> None:
        """Invocations per second, decayed over RATE_TAU_S: how much a warm environment of
        this function is worth keeping (warm_pool.victims)."""
        now = time.monotonic()
        rate, at = self.rates.get(key, (0.0, now))
        self.rates[key] = (rate * math.exp(-(now - at) / RATE_TAU_S) + 1 / RATE_TAU_S, now)

    def _rate(self, key: str, now: float) -> float:
        rate, at = self.rates.get(key, (0.0, now))
        return rate * math.exp(-(now - at) / RATE_TAU_S)

    # -- memory -------------------------------------------------------------------------------
    def memory_refs(self) -> list[JobRef]:
        """What the memory manager ranks: idle environments at the idle rank (below every
        class, first to be reclaimed), busy ones at their invocation's class."""
        wall = time.time() - time.monotonic()
        refs = []
        for e in self.envs.values():
            if e.state == "idle":
                refs.append(JobRef(e.env_id, IDLE, e.cgroup, wall + e.idle_since))
            elif e.current is not None:
                refs.append(JobRef(e.env_id, e.current.cls, e.cgroup, wall + e.spawned))
        return refs

    def evict_idle(self, need: int) -> int:
        """Kill idle environments, least valuable first, until `need` bytes are freed (the
        memory manager's last resort before a running job suffers). Returns bytes freed."""
        now = time.monotonic()
        views, by_id = [], {}
        for e in self.envs.values():
            if e.available:
                mem = e.resident()
                views.append(warm_pool.IdleEnv(e.env_id, e.fn.key, e.idle_since, mem, e.init_ms))
                by_id[e.env_id] = mem
        rates = {v.function: self._rate(v.function, now) for v in views}
        freed = 0
        for eid in warm_pool.victims(views, need, rates):
            freed += by_id[eid]
            self.stats["evicted_for_memory"] += 1
            self.envs[eid].kill("memory: reclaim was not enough")
        if freed:
            log.info("memory: killed idle environments holding %d MiB", freed >> 20)
        return freed

    # -- what it shows ------------------------------------------------------------------------
    def _remember(self, result: dict) -> None:
        """Every invocation on this node passes here, cluster-placed or local (`xxctl fn
        run`): its metrics are counted here, once."""
        r = result["report"]
        err = result["error"]
        outcome = "succeeded" if err is None else "failed"
        if err:
            self.stats["errors"] += 1
            if err.get("errorType") == "Sandbox.Timedout":
                self.stats["timeouts"] += 1
                outcome = "timeout"
        metrics.finished("node", r.get("class") or "", "function", outcome,
                         r["duration_ms"] / 1e3, r["queued_ms"] / 1e3)  # fmt: skip
        self.results[r["request_id"]] = result
        while len(self.results) > KEEP_RESULTS:
            self.results.popitem(last=False)

    def list_envs(self) -> list[dict]:
        return [e.describe() for e in self.envs.values()]

    def logs(self, ref: str) -> list[dict]:
        """One invocation's log by request id, else the latest invocations of a function."""
        if ref in self.results:
            return [self.results[ref]]
        return [r for r in self.results.values() if r["report"]["function"] == ref][-20:]

    def status(self) -> dict:
        by_state: dict[str, int] = {}
        for e in self.envs.values():
            s = e.describe()["state"]
            by_state[s] = by_state.get(s, 0) + 1
        return {
            **self.stats,
            "environments": by_state,
            "waiting": sum(len(q) for q in self.waiting.values()),
            "runtime_api": self.api.address,
            "refused_connections": self.api.strangers,
            "lambda_proxy": dict(self.proxy.stats),  # handlers' calls, and those refused
            "zygote": self.cfg.zygote,
        }

    def close(self) -> None:
        for env in list(self.envs.values()):
            env.kill("node stopping")
        self.api.close()
        with contextlib.suppress(RuntimeError):  # no loop: nothing is listening
            asyncio.get_running_loop().create_task(self.proxy.close())
        if self.zygote is not None:
            self.zygote.close()

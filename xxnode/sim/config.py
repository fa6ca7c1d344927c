"""Simulation config: one dict (JSON or TOML file) -> validated dataclasses.

Every error names the offending key (``ConfigError("runtime.alpha: must be > 1")``)
so the CLI can print one line and exit 2.  Unknown keys are errors too: a typo
must not silently fall back to a default.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from xxnode.schema import ConfigError

GB = 1 << 30
MB = 1 << 20


@dataclass(frozen=True)
class Cluster:
    machines: int = 100
    cores: int = 8
    shards: int = 4
    k: int = 3
    memory_gb: float | None = None  # None: unlimited ("absurdly high", §4.2)


@dataclass(frozen=True)
class Arrivals:
    process: str = "poisson"  # or "constant"
    load: float | None = 0.8  # offered load: rate * E[runtime] / (machines * cores)
    rate: float | None = None  # jobs per second; overrides load
    jobs: int = 100_000
    # Optional piecewise-constant load: [[duration_s, load], ...]; replaces jobs/load.
    schedule: tuple[tuple[float, float], ...] | None = None
    # Latency is measured for jobs arriving after the first ``warmup`` and before the
    # last ``cooldown`` share of jobs (or of time with a schedule); the run stops
    # ``drain`` x the arrival span after the last arrival.  A measured job that has
    # not finished by then counts as unfinished (overload starves low classes).
    warmup: float = 0.1
    cooldown: float = 0.1
    drain: float = 0.0


@dataclass(frozen=True)
class Runtime:
    dist: str = "pareto"  # "pareto" | "exponential"
    alpha: float = 2.5  # pareto: fixed tail index for every function
    xm_mean: float = 0.1  # pareto: per-function x_m ~ Normal(xm_mean, xm_sd), seconds
    xm_sd: float = 0.03
    mean: float = 0.1  # exponential: mean runtime (s)
    mean_sd: float = 0.0  # exponential: per-function mean ~ Normal(mean, mean_sd)
    functions: int = 1000
    # Which function a job invokes: "uniform" (the paper) or "zipf" (the k-th most popular
    # function has weight 1/k**zipf_s; function 0 is the most popular).
    popularity: str = "uniform"
    zipf_s: float = 1.0


@dataclass(frozen=True)
class Classes:
    # A vaguely bimodal weighting (§4.1): most jobs are cheap batch or premium interactive.
    names: tuple[str, ...] = ("c0", "c1", "c2", "c3", "c4")
    prices: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5)
    weights: tuple[float, ...] = (0.30, 0.15, 0.10, 0.15, 0.30)
    per: str = "function"  # class drawn per function (paper) or per "job"


@dataclass(frozen=True)
class Memory:
    min_mb: float = 100.0
    max_mb: float = 10240.0
    initial_mb: float = 100.0  # every job starts here and grows linearly with progress


@dataclass(frozen=True)
class Scheduler:
    name: str = "xx"  # "xx" | "hermod" | "edf"
    idle_list: bool = True
    head_policy: str = "strict"  # shard head selection: "strict" | "aging"
    place_time: float = 0.0  # shard time per placement (0: placement is instant)
    swap_high: float = 0.95  # swap when resident memory exceeds this share ...
    swap_target: float = 0.90  # ... down to this share
    mem_tick: float = 0.05  # memory manager period (s), also the dispatcher's re-check
    sample_every: float = 1.0  # memory-utilisation sample period (s) for fig5


@dataclass(frozen=True)
class Warm:
    """Warm execution environments per machine (XX only), decided by
    ``xxnode.policy.warm_pool`` as on the node.  Off by default: then no job pays a
    cold start and every other figure is as before."""

    enabled: bool = False
    keep_alive_s: float | None = 600.0  # null: never expire (PoolPolicy keep_alive_s=inf)
    max_idle_per_function: int = 4
    cold_start_ms: float = 8.0  # XX's zygote p50; "Lambda-like" is 100-250
    # If set, each function's cold start is drawn once, uniform in [cold_start_ms, this].
    cold_start_max_ms: float | None = None
    env_mb: float = 128.0  # memory an idle environment holds (Lambda's smallest size)
    idle_memory_mb: float | None = None  # per-machine budget for idle envs; null: unlimited
    rate_tau_s: float = 60.0  # time constant of the per-function rate EWMA (victim value)


@dataclass(frozen=True)
class Config:
    cluster: Cluster = field(default_factory=Cluster)
    arrivals: Arrivals = field(default_factory=Arrivals)
    runtime: Runtime = field(default_factory=Runtime)
    classes: Classes = field(default_factory=Classes)
    memory: Memory = field(default_factory=Memory)
    scheduler: Scheduler = field(default_factory=Scheduler)
    warm: Warm = field(default_factory=Warm)
    seed: int = 1


_SECTIONS = {
    "cluster": Cluster,
    "arrivals": Arrivals,
    "runtime": Runtime,
    "classes": Classes,
    "memory": Memory,
    "scheduler": Scheduler,
    "warm": Warm,
}


def _num(key: str, v: Any, *, integer: bool = False) -> float | int:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConfigError(f"{key}: expected a number, got {v!r}")
    if integer:
        if isinstance(v, float) and not v.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {v!r}")
        return int(v)
    if not math.isfinite(v):
        raise ConfigError(f"{key}: must be finite")
    return float(v)


def _coerce(key: str, default: Any, v: Any) -> Any:
    """Coerce ``v`` to the type of the field's default (None-able fields take either)."""
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise ConfigError(f"{key}: expected true/false, got {v!r}")
        return v
    if isinstance(default, int):
        return _num(key, v, integer=True)
    if isinstance(default, float) or (
        default is None and key.endswith(("load", "rate", "_gb", "_ms", "_mb"))
    ):
        return None if v is None else _num(key, v)
    if isinstance(default, str):
        if not isinstance(v, str):
            raise ConfigError(f"{key}: expected a string, got {v!r}")
        return v
    if isinstance(default, tuple) or key.endswith("schedule"):
        if v is None:
            return None
        if not isinstance(v, list | tuple) or not v:
            raise ConfigError(f"{key}: expected a non-empty list")
        if key.endswith("schedule"):
            out = []
            for i, step in enumerate(v):
                if not isinstance(step, list | tuple) or len(step) != 2:
                    raise ConfigError(f"{key}[{i}]: expected [duration_s, load]")
                out.append((_num(f"{key}[{i}]", step[0]), _num(f"{key}[{i}]", step[1])))
            return tuple(out)
        if key.endswith("names"):
            if not all(isinstance(x, str) and x for x in v):
                raise ConfigError(f"{key}: expected a list of non-empty strings")
            return tuple(v)
        return tuple(_num(f"{key}[{i}]", x) for i, x in enumerate(v))
    raise ConfigError(f"{key}: unsupported value {v!r}")  # pragma: no cover


def _section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a table/object")
    obj = cls()
    known = {f.name for f in fields(cls)}
    kw = {}
    for k, v in raw.items():
        if k not in known:
            raise ConfigError(f"{name}.{k}: unknown key (known: {', '.join(sorted(known))})")
        kw[k] = _coerce(f"{name}.{k}", getattr(obj, k), v)
    return replace(obj, **kw)


def from_dict(raw: Any) -> Config:
    """Build and validate a Config; raises ConfigError naming the key."""
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a table/object at top level")
    kw: dict[str, Any] = {}
    for k, v in raw.items():
        if k == "seed":
            kw["seed"] = _num("seed", v, integer=True)
        elif k in _SECTIONS:
            kw[k] = _section(k, _SECTIONS[k], v)
        else:
            raise ConfigError(f"{k}: unknown key (known: seed, {', '.join(_SECTIONS)})")
    cfg = Config(**kw)
    validate(cfg)
    return cfg


def load(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"config: cannot read {p}: {e.strerror}") from None
    try:
        raw = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(
            f"config: {p} is not valid {p.suffix.lstrip('.') or 'JSON'}: {e}"
        ) from None
    return from_dict(raw)


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate(c: Config) -> None:
    cl, ar, rt, cs, me, sc = c.cluster, c.arrivals, c.runtime, c.classes, c.memory, c.scheduler
    _check(cl.machines >= 1, "cluster.machines", "must be >= 1")
    _check(cl.cores >= 1, "cluster.cores", "must be >= 1")
    _check(cl.shards >= 1, "cluster.shards", "must be >= 1")
    _check(cl.k >= 1, "cluster.k", "must be >= 1")
    _check(cl.memory_gb is None or cl.memory_gb > 0, "cluster.memory_gb", "must be > 0 or null")
    _check(ar.process in ("poisson", "constant"), "arrivals.process", "must be poisson|constant")
    _check(ar.load is None or ar.load > 0, "arrivals.load", "must be > 0")
    _check(ar.rate is None or ar.rate > 0, "arrivals.rate", "must be > 0")
    _check(
        ar.schedule is not None or ar.load is not None or ar.rate is not None,
        "arrivals.load",
        "give load, rate or schedule",
    )
    _check(ar.jobs >= 1, "arrivals.jobs", "must be >= 1")
    if ar.schedule is not None:
        for i, (d, ld) in enumerate(ar.schedule):
            _check(d > 0 and ld > 0, f"arrivals.schedule[{i}]", "duration and load must be > 0")
    _check(0 <= ar.warmup < 1, "arrivals.warmup", "must be in [0, 1)")
    _check(0 <= ar.cooldown < 1 - ar.warmup, "arrivals.cooldown", "need 0 <= cooldown < 1 - warmup")
    _check(ar.drain >= 0, "arrivals.drain", "must be >= 0")
    _check(rt.dist in ("pareto", "exponential"), "runtime.dist", "must be pareto|exponential")
    _check(rt.alpha > 1, "runtime.alpha", "must be > 1 (finite mean)")
    _check(rt.xm_mean > 0 and rt.xm_sd >= 0, "runtime.xm_mean", "need xm_mean > 0, xm_sd >= 0")
    _check(rt.mean > 0 and rt.mean_sd >= 0, "runtime.mean", "need mean > 0, mean_sd >= 0")
    _check(rt.functions >= 1, "runtime.functions", "must be >= 1")
    n = len(cs.names)
    _check(len(set(cs.names)) == n, "classes.names", "must be distinct")
    _check(len(cs.prices) == n, "classes.prices", f"need {n} prices (one per name)")
    _check(len(cs.weights) == n, "classes.weights", f"need {n} weights (one per name)")
    _check(all(p > 0 for p in cs.prices), "classes.prices", "must be > 0")
    _check(
        list(cs.prices) == sorted(cs.prices) and len(set(cs.prices)) == n,
        "classes.prices",
        "must be strictly increasing (names go from lowest to highest class)",
    )
    _check(
        all(w >= 0 for w in cs.weights) and sum(cs.weights) > 0,
        "classes.weights",
        "must be >= 0, not all 0",
    )
    _check(cs.per in ("function", "job"), "classes.per", "must be function|job")
    _check(0 < me.min_mb <= me.max_mb, "memory.min_mb", "need 0 < min_mb <= max_mb")
    _check(0 < me.initial_mb <= me.min_mb, "memory.initial_mb", "need 0 < initial_mb <= min_mb")
    _check(sc.name in ("xx", "hermod", "edf"), "scheduler.name", "must be xx|hermod|edf")
    _check(sc.head_policy in ("strict", "aging"), "scheduler.head_policy", "must be strict|aging")
    _check(sc.place_time >= 0, "scheduler.place_time", "must be >= 0")
    _check(
        0 < sc.swap_target < sc.swap_high <= 1,
        "scheduler.swap_high",
        "need 0 < swap_target < swap_high <= 1",
    )
    _check(sc.mem_tick > 0, "scheduler.mem_tick", "must be > 0")
    _check(sc.sample_every > 0, "scheduler.sample_every", "must be > 0")
    _check(rt.popularity in ("uniform", "zipf"), "runtime.popularity", "must be uniform|zipf")
    _check(rt.zipf_s >= 0, "runtime.zipf_s", "must be >= 0")
    w = c.warm
    if w.enabled:
        _check(sc.name == "xx", "warm.enabled", "warm environments are simulated for xx only")
    _check(w.keep_alive_s is None or w.keep_alive_s >= 0, "warm.keep_alive_s", "must be >= 0")
    _check(w.max_idle_per_function >= 0, "warm.max_idle_per_function", "must be >= 0")
    _check(w.cold_start_ms >= 0, "warm.cold_start_ms", "must be >= 0")
    _check(
        w.cold_start_max_ms is None or w.cold_start_max_ms >= w.cold_start_ms,
        "warm.cold_start_max_ms",
        "must be >= cold_start_ms or null",
    )
    _check(w.env_mb >= 0, "warm.env_mb", "must be >= 0")
    _check(w.idle_memory_mb is None or w.idle_memory_mb >= 0, "warm.idle_memory_mb", "must be >= 0")
    _check(w.rate_tau_s > 0, "warm.rate_tau_s", "must be > 0")

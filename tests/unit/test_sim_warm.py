"""Warm execution environments in the simulator (``xxnode/sim/warm.py``).

The simulator must decide warm or cold, evict and reclaim with ``xxnode.policy.warm_pool``
-- the module the node daemon uses -- so several tests replace one of its functions and
check that the simulation follows.
"""

import json
import math
import random
from collections import Counter
from dataclasses import replace

import pytest

from xxnode.policy import warm_pool
from xxnode.sim import simulate
from xxnode.sim import warm as sim_warm
from xxnode.sim.config import (
    Arrivals,
    Classes,
    Cluster,
    Config,
    ConfigError,
    Runtime,
    Scheduler,
    Warm,
    from_dict,
)
from xxnode.sim.main import main
from xxnode.sim.workload import jobs, plan

MB = 1 << 20
BASE = Config(
    cluster=Cluster(machines=4, cores=4, shards=2, k=2),
    arrivals=Arrivals(load=0.6, jobs=6000),
    runtime=Runtime(functions=20, popularity="zipf"),
    scheduler=Scheduler(name="xx", idle_list=False),
)


def warm(cfg=BASE, **kw):
    return replace(cfg, warm=Warm(enabled=True, **kw))


def summary(cfg):
    return simulate(cfg).summary()["warm"]


# --- off by default ---------------------------------------------------------------


def test_off_by_default_and_a_free_cold_start_changes_nothing():
    assert Config().warm.enabled is False
    assert "warm" not in simulate(BASE).extra
    # With a 0 ms cold start the warm path must not perturb scheduling at all.
    off = simulate(BASE)
    on = simulate(warm(keep_alive_s=0.0, cold_start_ms=0.0))
    assert on.extra["warm"]["cold_fraction"] == 1.0
    assert [list(a) for a in on.response] == [list(a) for a in off.response]


# --- warm or cold -----------------------------------------------------------------


def test_keep_alive_zero_every_invocation_is_cold():
    w = summary(warm(keep_alive_s=0.0, cold_start_ms=8.0))
    assert w["cold_fraction"] == 1.0
    assert w["all_invocations"]["warm"] == 0
    assert w["added_latency_mean_ms"] == pytest.approx(8.0)
    assert w["idle_max_per_function"] == 0  # expired the moment it went idle
    assert w["evicted"]["cap"] == 0 and w["evicted"]["keep_alive"] > 0


def test_long_keep_alive_steady_load_is_almost_all_warm():
    cfg = replace(warm(keep_alive_s=600.0), runtime=Runtime(functions=5))
    w = summary(cfg)
    assert w["cold_fraction"] < 0.005
    assert w["evicted"]["keep_alive"] == 0
    never = summary(replace(cfg, warm=replace(cfg.warm, keep_alive_s=None)))
    assert never["keep_alive_s"] == math.inf
    assert {**never, "keep_alive_s": 600.0} == w  # no env ever idled for 600 s


def test_cold_fraction_falls_with_keep_alive():
    fr = [summary(warm(keep_alive_s=ka))["cold_fraction"] for ka in (0.0, 0.3, 3.0, 30.0)]
    assert fr[0] == 1.0 and fr == sorted(fr, reverse=True) and fr[-1] < 0.2


def test_zero_idle_cap_keeps_nothing():
    w = summary(warm(keep_alive_s=None, max_idle_per_function=0))
    assert w["cold_fraction"] == 1.0 and w["idle_envs_at_end"] == 0


def test_cap_per_function_respected_at_all_times(monkeypatch):
    cap = 2
    seen = []
    release = sim_warm.MachineEnvs.release

    def checked(self, fn, env_id, now):  # the only place idle environments appear
        release(self, fn, env_id, now)
        per_fn = Counter(e.function for g in self.idle.values() for e in g)
        seen.append(max(per_fn.values(), default=0))
        assert all(len(g) <= cap for g in self.idle.values())

    monkeypatch.setattr(sim_warm.MachineEnvs, "release", checked)
    # Few functions, many cores: bursts leave more idle environments than the cap.
    cfg = replace(warm(keep_alive_s=None, max_idle_per_function=cap), runtime=Runtime(functions=3))
    w = summary(replace(cfg, cluster=Cluster(machines=2, cores=16, shards=1, k=1)))
    assert max(seen) == cap == w["idle_max_per_function"]
    assert w["evicted"]["cap"] > 0


def test_a_cold_start_holds_the_core_mg1():
    """One core, one function, keep_alive 0: every job's service is S + C (S ~ Exp(1),
    C = 0.5 s), an M/G/1 queue; Pollaczek-Khinchine gives the mean response."""
    lam, c = 0.4, 0.5  # load 0.6 with the cold starts, 0.4 without (E[T] would be 1.67)
    n = 200_000
    cfg = Config(
        cluster=Cluster(machines=1, cores=1, shards=1, k=1),
        arrivals=Arrivals(load=None, rate=lam, jobs=n, warmup=0.05, cooldown=0.0, drain=10.0),
        runtime=Runtime(dist="exponential", mean=1.0, functions=1),
        classes=Classes(names=("c0",), prices=(1.0,), weights=(1.0,), per="job"),
        scheduler=Scheduler(name="xx", idle_list=False),
        warm=Warm(enabled=True, keep_alive_s=0.0, cold_start_ms=1000 * c),
    )
    s = simulate(cfg).summary()["classes"]["c0"]
    assert s["finished"] == s["measured"]
    es, es2 = 1.0 + c, 2.0 + 2.0 * c + c * c
    want = lam * es2 / (2 * (1 - lam * es)) + es
    assert s["response_mean"] == pytest.approx(want, rel=0.03)


# --- the sim follows warm_pool ------------------------------------------------------


def test_reuse_comes_from_pick_idle(monkeypatch):
    assert summary(warm(keep_alive_s=None))["cold_fraction"] < 0.1
    monkeypatch.setattr(warm_pool, "pick_idle", lambda envs, fn: None)
    assert summary(warm(keep_alive_s=None))["cold_fraction"] == 1.0


def test_eviction_comes_from_expired(monkeypatch):
    monkeypatch.setattr(warm_pool, "expired", lambda envs, now, policy: [e.env_id for e in envs])
    w = summary(warm(keep_alive_s=None))  # never expires, but expired() says otherwise
    assert w["cold_fraction"] == 1.0 and w["idle_envs_at_end"] == 0


def test_memory_budget_comes_from_victims(monkeypatch):
    budget_mb = 4 * 128.0
    cfg = warm(keep_alive_s=None, env_mb=128.0, idle_memory_mb=budget_mb)
    w = summary(cfg)
    assert w["idle_mb_max_per_machine"] <= budget_mb
    assert w["evicted"]["memory"] > 0
    assert w["cold_fraction"] > summary(warm(keep_alive_s=None))["cold_fraction"]
    monkeypatch.setattr(warm_pool, "victims", lambda envs, need, rates: [])
    assert summary(cfg)["idle_mb_max_per_machine"] > budget_mb


# --- one machine's pool, step by step -----------------------------------------------


def pool(**kw):
    pushed = []
    cfg = replace(Config(runtime=Runtime(functions=3)), warm=Warm(enabled=True, **kw))
    envs = sim_warm.MachineEnvs(
        "m0",
        sim_warm.params(cfg),
        sim_warm.Stats(),
        lambda e, t, fn, tok: pushed.append((t, fn, tok)),
    )
    return envs, pushed


def test_keep_alive_is_one_event_per_deadline_not_polling():
    envs, pushed = pool(keep_alive_s=5.0, cold_start_ms=8.0)
    a, is_cold, cold = envs.acquire(0, 0.0)
    b, _, _ = envs.acquire(0, 0.0)
    assert is_cold and cold == pytest.approx(0.008)
    envs.release(0, a, 0.0)
    assert pushed == [(5.0, 0, 1)]  # expires_at of the only idle env
    envs.release(0, b, 1.0)
    assert len(pushed) == 1  # the older one still expires first
    got, is_cold, cold = envs.acquire(0, 2.0)
    assert (got, is_cold, cold) == (b, False, 0.0)  # pick_idle: the most recently used
    assert len(pushed) == 1
    envs.release(0, got, 3.0)
    envs.deadline(0, 1, 5.0)  # exactly at expires_at: due (inclusive boundary)
    assert [e.env_id for e in envs.idle[0]] == [b]
    assert pushed[-1] == (8.0, 0, 2)  # re-armed for the survivor
    envs.deadline(0, 1, 6.0)  # a stale token is ignored
    assert len(envs.idle[0]) == 1
    envs.deadline(0, 2, 8.0)
    assert envs.idle == {} and envs.due == {}
    assert envs.stats.evicted == {"keep_alive": 2, "cap": 0, "memory": 0}


def test_memory_victim_is_the_rarely_invoked_function_not_the_oldest():
    envs, _ = pool(keep_alive_s=None, env_mb=128.0, idle_memory_mb=128.0)
    for t in range(10):  # function 0 is invoked often, function 1 once
        e, _, _ = envs.acquire(0, float(t))
        envs.release(0, e, t + 0.5)
    rare, _, _ = envs.acquire(1, 10.0)
    envs.release(1, rare, 11.0)  # newer than function 0's env, but worth less
    assert list(envs.idle) == [0] and envs.idle_bytes == 128 * MB
    assert envs.stats.evicted["memory"] == 1


def test_per_function_expiry_equals_whole_machine_expiry():
    """The sim arms one event per function; warm_pool's answers decompose exactly."""
    rng = random.Random(7)
    for _ in range(300):
        pol = warm_pool.PoolPolicy(rng.choice([0.0, 1.0, 3.0, math.inf]), rng.randint(0, 3))
        envs = [
            warm_pool.IdleEnv(f"e{i}", f"f{rng.randint(0, 3)}", float(rng.randint(0, 9)), MB, 1.0)
            for i in range(rng.randint(0, 12))
        ]
        now = float(rng.randint(0, 12))
        groups: dict[str, list] = {}
        for e in envs:
            groups.setdefault(e.function, []).append(e)
        per_fn = {i for g in groups.values() for i in warm_pool.expired(g, now, pol)}
        assert per_fn == set(warm_pool.expired(envs, now, pol))
        left = [e for e in envs if e.env_id not in per_fn]
        rest: dict[str, list] = {}
        for e in left:
            rest.setdefault(e.function, []).append(e)
        ds = [d for g in rest.values() if (d := warm_pool.next_deadline(g, now, pol)) is not None]
        assert min(ds, default=None) == warm_pool.next_deadline(left, now, pol)


# --- workload and config ----------------------------------------------------------------


def test_zipf_popularity():
    cfg = replace(BASE, arrivals=Arrivals(load=0.6, jobs=40_000))
    p = plan(cfg)
    js = list(jobs(cfg, p))
    fns = Counter(j[4] for j in js)
    # Load is computed from E[S] over invocations, so the popular functions weigh more.
    assert sum(j[1] for j in js) / len(js) == pytest.approx(p.mean_runtime, rel=0.015)
    h = sum(1 / k for k in range(1, 21))
    assert fns[0] / 40_000 == pytest.approx(1 / h, rel=0.05)
    assert fns[0] > fns[1] > fns[4] > fns[19] > 0
    uni = replace(cfg, runtime=Runtime(functions=20))
    assert max(Counter(j[4] for j in jobs(uni, plan(uni))).values()) < 1.2 * 40_000 / 20


def test_lambda_like_cold_start_drawn_per_function():
    p = sim_warm.params(warm(cold_start_ms=100.0, cold_start_max_ms=250.0))
    assert all(100.0 <= x <= 250.0 for x in p.init_ms) and len(set(p.init_ms)) == 20
    assert sim_warm.params(warm(cold_start_ms=8.0)).init_ms == (8.0,) * 20


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"warm": {"enabled": True}, "scheduler": {"name": "hermod"}}, "warm.enabled"),
        ({"warm": {"keep_alive_s": -1}}, "warm.keep_alive_s"),
        ({"warm": {"max_idle_per_function": -1}}, "warm.max_idle_per_function"),
        ({"warm": {"cold_start_ms": 10, "cold_start_max_ms": 5}}, "warm.cold_start_max_ms"),
        ({"warm": {"idle_memory_mb": -1}}, "warm.idle_memory_mb"),
        ({"warm": {"keepalive": 1}}, "warm.keepalive"),
        ({"runtime": {"popularity": "pareto"}}, "runtime.popularity"),
    ],
)
def test_bad_warm_config_names_the_key(raw, key):
    with pytest.raises(ConfigError) as e:
        from_dict(raw)
    assert str(e.value).startswith(key + ":")


def test_cli_run_and_figure(tmp_path, capsys):
    f = tmp_path / "c.toml"
    f.write_text(
        "[cluster]\nmachines = 2\n[arrivals]\njobs = 2000\n"
        '[runtime]\nfunctions = 30\npopularity = "zipf"\n'
        "[warm]\nenabled = true\nkeep_alive_s = 2.0\nidle_memory_mb = 512.0\n"
    )
    assert main(["run", "--config", str(f), "--json"]) == 0
    w = json.loads(capsys.readouterr().out)["warm"]
    assert 0 < w["cold_fraction"] < 1 and w["keep_alive_s"] == 2.0
    assert main(["warm", "--out", str(tmp_path / "w"), "--quick", "--jobs", "3000", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (tmp_path / "w" / "warm.png").stat().st_size > 10_000
    rows = (tmp_path / "w" / "warm.csv").read_text().splitlines()
    assert len(rows) == 1 + 1 + 2 * len(s["keep_alive_s"])
    for model in ("xx-zygote", "lambda-like"):
        assert s["cold_fraction"][model]["0"] == 1.0
        assert s["cold_fraction"][model]["inf"] < s["cold_fraction"][model]["1"]

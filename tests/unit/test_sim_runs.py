import json
from dataclasses import replace

import pytest

from xxnode.sim import simulate
from xxnode.sim.config import Arrivals, Cluster, Config, ConfigError, from_dict
from xxnode.sim.main import main
from xxnode.sim.workload import jobs, plan

SMALL = Config(
    cluster=Cluster(machines=10, cores=4, shards=2, k=2), arrivals=Arrivals(load=0.9, jobs=5000)
)


def with_sched(cfg, **kw):
    return replace(cfg, scheduler=replace(cfg.scheduler, **kw))


def test_workload_is_seeded_and_identical_across_schedulers():
    a = list(jobs(SMALL, plan(SMALL)))
    assert a == list(jobs(SMALL, plan(SMALL)))
    assert a != list(jobs(replace(SMALL, seed=2), plan(replace(SMALL, seed=2))))
    meas = {n: simulate(with_sched(SMALL, name=n)).measured for n in ("xx", "hermod", "edf")}
    assert meas["xx"] == meas["hermod"] == meas["edf"]
    r1 = simulate(with_sched(SMALL, name="xx")).summary()
    r2 = simulate(with_sched(SMALL, name="xx")).summary()
    assert r1["classes"] == r2["classes"]


def test_workload_mean_and_classes_follow_config():
    cfg = replace(SMALL, arrivals=Arrivals(load=0.9, jobs=40000))
    p = plan(cfg)
    js = list(jobs(cfg, p))
    mean = sum(j[1] for j in js) / len(js)
    assert mean == pytest.approx(p.mean_runtime, rel=0.05)
    span = js[-1][0] - js[0][0]
    load = len(js) / span * p.mean_runtime / (10 * 4)
    assert load == pytest.approx(0.9, rel=0.05)
    mems = [j[3] for j in js]
    assert 100 * 2**20 <= min(mems) and max(mems) <= 10240 * 2**20
    assert min(j[1] for j in js) > 0


def test_overload_xx_protects_top_class_hermod_does_not():
    cfg = replace(SMALL, arrivals=Arrivals(load=1.2, jobs=20000))
    top = cfg.classes.names[-1]
    xx = simulate(with_sched(cfg, name="xx", idle_list=False)).summary()["classes"]
    he = simulate(with_sched(cfg, name="hermod")).summary()["classes"]
    assert xx[top]["slowdown_p50"] < 1.2 < he[top]["slowdown_p50"]
    assert xx[cfg.classes.names[0]]["slowdown_p50"] > he[cfg.classes.names[0]]["slowdown_p50"]


def test_limited_memory_swaps_only_lower_classes():
    cfg = replace(
        SMALL,
        cluster=Cluster(machines=10, cores=8, shards=2, k=2, memory_gb=32.0),
        arrivals=Arrivals(schedule=((2.0, 0.8), (2.0, 1.2))),
    )
    r = simulate(cfg)
    mem = r.extra["memory"]
    per_class = mem["swap_out_gb_per_class"]
    assert per_class[cfg.classes.names[-1]] == 0.0
    assert sum(per_class.values()) > 0
    assert sum(mem["swap_out_gb_per_machine"]) == pytest.approx(sum(per_class.values()))
    assert mem["samples"] and all(0 <= u for _, us, _ in mem["samples"] for u in us)
    again = simulate(cfg).extra["memory"]
    assert again["swap_out_gb_per_machine"] == mem["swap_out_gb_per_machine"]


def test_shard_queue_with_place_time_uses_head_policy():
    cfg = replace(SMALL, arrivals=Arrivals(load=0.5, jobs=8000))
    # 120 jobs/s over 2 shards, 15 ms per placement: each shard is ~90% busy, so jobs queue there
    cfg = with_sched(cfg, place_time=0.015, idle_list=False)
    names = cfg.classes.names
    strict = simulate(cfg).summary()["classes"]
    aging = simulate(with_sched(cfg, head_policy="aging")).summary()["classes"]
    assert strict[names[-1]]["response_mean"] < aging[names[-1]]["response_mean"]
    assert strict[names[0]]["response_mean"] > aging[names[0]]["response_mean"]


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"cluster": {"machnes": 3}}, "cluster.machnes"),
        ({"cluster": {"cores": 0}}, "cluster.cores"),
        ({"arrivals": {"load": "high"}}, "arrivals.load"),
        ({"runtime": {"alpha": 0.9}}, "runtime.alpha"),
        ({"classes": {"names": ["a", "b"], "prices": [1.0], "weights": [1, 1]}}, "classes.prices"),
        ({"scheduler": {"name": "fifo"}}, "scheduler.name"),
        ({"arrivals": {"schedule": [[1.0]]}}, "arrivals.schedule[0]"),
        ({"bogus": 1}, "bogus"),
        ([], "config"),
    ],
)
def test_bad_config_names_the_key(raw, key):
    with pytest.raises(ConfigError) as e:
        from_dict(raw)
    assert str(e.value).startswith(key + ":")


def test_cli_bad_config_is_one_line_exit_2(tmp_path, capsys):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"runtime": {"dist": "weibull"}}))
    assert main(["run", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runtime.dist" in err and "Traceback" not in err
    f.write_text("{not json")
    assert main(["run", "--config", str(f)]) == 2
    assert main(["run", "--config", str(tmp_path / "missing.toml")]) == 2


def test_cli_run_json_from_toml(tmp_path, capsys):
    f = tmp_path / "c.toml"
    f.write_text(
        'seed = 3\n[cluster]\nmachines = 4\ncores = 2\n[arrivals]\nprocess = "constant"\n'
        'rate = 50.0\njobs = 2000\n[runtime]\ndist = "exponential"\nmean = 0.05\n'
        '[scheduler]\nname = "edf"\n'
    )
    assert main(["run", "--config", str(f), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["scheduler"] == "edf" and s["jobs"] == 2000
    assert s["load"] == pytest.approx(50.0 * 0.05 / 8, rel=0.1)


def test_fig4_and_fig5_write_files(tmp_path):
    from xxnode.sim import figures

    s4 = figures.fig4(tmp_path / "f4", quick=True, jobs=1500, log=lambda m: None)
    assert (tmp_path / "f4" / "fig4.png").stat().st_size > 10_000
    rows = (tmp_path / "f4" / "fig4.csv").read_text().splitlines()
    assert len(rows) == 1 + len(figures.FIG4_QUICK_LOADS) * 3 * 5
    assert set(s4["top_class_slowdown_p99"]) == {"xx", "hermod", "edf"}

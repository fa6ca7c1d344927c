"""The metrics: what one invocation records, what each daemon's collector reads, and that
docs/metrics.md and the Grafana dashboard name exactly the metrics that exist."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace as NS

from prometheus_client.exposition import generate_latest

from xxnode import metrics, wire
from xxnode.node.memory import JobSample, Sample, Stats
from xxnode.policy.budget import Decision

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "metrics.md"
DASHBOARD = ROOT / "ops" / "grafana" / "xx-dashboard.json"
PRESSURE = "some avg10=1.50 avg60=0.00 avg300=0.00 total=2500000\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=1000000\n"


def value(name: str, **labels) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_one_finished_invocation_counts_once_and_lands_in_its_buckets():
    lab = {"stage": "node", "class": "utest", "kind": "function"}
    before = value("xx_latency_seconds_count", **lab)
    metrics.finished("node", "utest", "function", "succeeded", 0.003, 0.0004)
    metrics.finished("node", "utest", "function", "failed", 0.2)
    assert value("xx_invocations_total", **lab, outcome="succeeded") == 1
    assert value("xx_invocations_total", **lab, outcome="failed") == 1
    assert value("xx_latency_seconds_count", **lab) == before + 2
    assert value("xx_latency_seconds_bucket", **lab, le="0.0025") == 0
    assert value("xx_latency_seconds_bucket", **lab, le="0.005") == 1
    assert value("xx_latency_seconds_bucket", **lab, le="0.25") == 2
    assert value("xx_queue_seconds_count", **lab) == 1  # only the one that said its queue time
    assert value("xx_queue_seconds_bucket", **lab, le="0.0005") == 1


def test_a_stage_that_never_queues_has_no_queue_series():
    metrics.finished("gateway", "utest2", "function", "succeeded", 0.01)
    text = generate_latest(metrics.REGISTRY).decode()
    assert 'xx_latency_seconds_count{class="utest2",kind="function",stage="gateway"} 1.0' in text
    assert 'xx_queue_seconds_count{class="utest2"' not in text


def test_done_statuses_in_outcome_words():
    words = {s: metrics.outcome_of_status(s) for s in (0, 1, 137, wire.NODE_LOST,
             wire.FAILED_START, wire.CANCELLED)}  # fmt: skip
    assert words == {0: "succeeded", 1: "failed", 137: "failed", wire.NODE_LOST: "lost",
                     wire.FAILED_START: "not_started", wire.CANCELLED: "cancelled"}  # fmt: skip
    assert metrics.kind_of({"function": {}}) == "function" and metrics.kind_of({}) == "job"


# -- the collectors, over small stand-ins of each daemon's tables ----------------------------
def endpoint() -> NS:
    return NS(codec=NS(dropped=Counter(bad_mac=3, stale=1)),
              stats=Counter(retransmits=5, dropped_out=2, send_full=1))  # fmt: skip


def fake_node(tmp_path: Path) -> NS:
    classes = NS(names=lambda: ["high", "low"])
    for c in ("high", "low"):
        (tmp_path / "root" / c).mkdir(parents=True)
        (tmp_path / "root" / c / "memory.pressure").write_text(PRESSURE)
    env = lambda state, cls=None: NS(current=NS(cls=cls) if cls else None,  # noqa: E731
                                     describe=lambda: {"state": state})  # fmt: skip
    st = Stats(reclaimed_by_class={"low": 64 << 20, "idle": 1 << 20},
               prefetched_by_class={"high": 8 << 20})  # fmt: skip
    js = [JobSample("j1", "low", 0, 100, 40, 0, 0, 0, True, 0.0),
          JobSample("e1", "idle", -1, 7, 0, 0, 0, 0, False, 0.0)]  # fmt: skip
    return NS(
        classes=classes,
        jobs={"j1": NS(state="running", cls="low"), "j2": NS(state="queued", cls="high")},
        queue=NS(by_class=lambda: {"high": 1, "low": 0}),
        functions=NS(envs={"e1": env("idle"), "e2": env("running", "high"), "e3": env("frozen")},
                     waiting={"k": [(-2, 1, NS(cls="high"))]}, stats={"invocations": 9, "cold": 2}),
        memory=NS(stats=st, last=Sample(0.0, 1000, 600, 0.0, 0.0, js)),
        host=NS(root=NS(path=tmp_path / "root")),
        dispatcher=NS(ep=endpoint()),
    )  # fmt: skip


def as_dict(families) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for f in families:
        out.setdefault(f.name, {})
        for s in f.samples:
            out[f.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def test_the_node_collector_reads_jobs_environments_memory_and_the_wire(tmp_path):
    got = as_dict(metrics.node_families(fake_node(tmp_path)))
    assert got["xx_running"] == {(("class", "high"), ("stage", "node")): 1,
                                 (("class", "low"), ("stage", "node")): 1}  # fmt: skip
    assert got["xx_queued"][(("class", "high"), ("stage", "node"))] == 2  # a job + an invocation
    assert got["xx_environments"][(("state", "idle"),)] == 1
    assert got["xx_environments"][(("state", "frozen"),)] == 1
    assert got["xx_environments"][(("state", "swapped"),)] == 0  # every state, zeros too
    assert got["xx_reclaimed_bytes"][(("class", "low"),)] == 64 << 20
    assert got["xx_reclaimed_bytes"][(("class", "idle"),)] == 1 << 20
    assert got["xx_swapin_bytes"][(("class", "high"),)] == 8 << 20
    assert got["xx_class_memory_bytes"][(("class", "low"),)] == 100
    assert got["xx_memory_available_bytes"][()] == 600
    cls_psi = got["xx_class_memory_psi_stall_seconds"]
    assert cls_psi[(("class", "high"), ("kind", "some"))] == 2.5
    assert got["xx_wire_drops"] == {(("reason", "bad_mac"),): 3, (("reason", "stale"),): 1,
                                    (("reason", "injected_loss"),): 2, (("reason", "send_full"),): 1}  # fmt: skip
    assert got["xx_wire_events"] == {(("event", "retransmits"),): 5}
    assert got["xx_function_events"] == {(("event", "cold"),): 2}


def test_machine_psi_from_its_files(tmp_path):
    (tmp_path / "memory").write_text(PRESSURE)
    (tmp_path / "cpu").write_text(PRESSURE.splitlines()[0] + "\n")
    got = as_dict(metrics.psi_families(tmp_path, {}))  # io missing: skipped, not an error
    assert got["xx_psi_stall_seconds"] == {
        (("kind", "some"), ("resource", "memory")): 2.5, (("kind", "full"), ("resource", "memory")): 1.0,
        (("kind", "some"), ("resource", "cpu")): 2.5,
    }  # fmt: skip
    assert got["xx_psi_avg10_ratio"][(("kind", "some"), ("resource", "memory"))] == 0.015


def fake_shard() -> NS:
    jobs = {1: NS(state="queued", cls="high"), 2: NS(state="placed", cls="low"),
            3: NS(state="placing", cls="high")}  # fmt: skip
    return NS(classes=NS(names=lambda: ["high", "low"]), jobs=jobs, nodes={"n1": 0, "n2": 0},
              idle=[1], counts={"submitted": 3, "placed": 2}, ep=endpoint())  # fmt: skip


def test_the_shard_collector_splits_queued_from_placed():
    got = as_dict(metrics.shard_families(fake_shard()))
    assert got["xx_queued"] == {(("class", "high"), ("stage", "shard")): 1,
                                (("class", "low"), ("stage", "shard")): 0}  # fmt: skip
    assert got["xx_running"] == {(("class", "high"), ("stage", "shard")): 1,
                                 (("class", "low"), ("stage", "shard")): 1}  # fmt: skip
    assert got["xx_shard_nodes"] == {(("list", "known"),): 2, (("list", "idle"),): 1}
    assert got["xx_shard_events"][(("event", "submitted"),)] == 3


def fake_gateway() -> NS:
    cache = {"alice": (0.0, Decision("normal", (), 0.0, 0.0)),
             "bob": (0.0, Decision("throttle", (0.8,), 0.0, 30.0))}  # fmt: skip
    return NS(budgets=NS(_cache=cache), body_bytes=10,
              invocations=NS(invoker=NS(client=NS(ep=endpoint()))))  # fmt: skip


def test_the_gateway_collector_gives_each_tenant_one_budget_state():
    got = as_dict(metrics.gateway_families(fake_gateway()))["xx_budget_state"]
    assert got[(("state", "normal"), ("tenant", "alice"))] == 1
    assert got[(("state", "throttle"), ("tenant", "alice"))] == 0
    assert got[(("state", "throttle"), ("tenant", "bob"))] == 1
    assert sum(got.values()) == 2


def test_a_collector_that_fails_costs_its_families_not_the_scrape():
    def broken():
        yield from metrics.wire_families([endpoint()])
        raise KeyError("gone")

    assert list(metrics.StateCollector("t", broken).collect()) == []


# -- docs and dashboard against the code ----------------------------------------------------
def exposed(tmp_path: Path) -> set[str]:
    """Every xx_ name a scrape can show, as Prometheus stores it (counters end in _total)."""
    fams = [*metrics.node_families(fake_node(tmp_path)), *metrics.shard_families(fake_shard()),
            *metrics.gateway_families(fake_gateway()),
            *[f for f in metrics.REGISTRY.collect() if f.name.startswith("xx_")]]  # fmt: skip
    return {f.name + ("_total" if f.type == "counter" else "") for f in fams}


def documented() -> set[str]:
    return set(re.findall(r"^\| `(xx_[a-z0-9_]+)` \|", DOCS.read_text(), re.M))


def test_docs_metrics_lists_exactly_what_the_daemons_expose(tmp_path):
    assert documented() == exposed(tmp_path)


def test_the_dashboard_is_json_and_names_only_documented_metrics():
    dash = json.loads(DASHBOARD.read_text())
    names = documented()
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(dash["panels"]) >= 10 and all(exprs)
    used = set()
    for e in exprs:
        assert e.count("(") == e.count(")"), e
        for m in re.findall(r"\bxx_[a-z0-9_]+", e):
            base = re.sub(r"_(bucket|sum|count)$", "", m)
            assert m in names or base in names, f"{m} in {e!r} is not in docs/metrics.md"
            used.add(base if base in names else m)
    # the panels the issue asks for, each backed by its metric
    for want in ("xx_latency_seconds", "xx_queue_seconds", "xx_running", "xx_queued",
                 "xx_environments", "xx_reclaimed_bytes_total", "xx_swapin_bytes_total",
                 "xx_psi_stall_seconds_total", "xx_wire_drops_total", "xx_budget_state"):  # fmt: skip
        assert want in used, want


# -- the config key and its flag -------------------------------------------------------------
def test_metrics_listen_is_off_by_default_and_checked_as_an_address():
    import pytest

    from xxnode.config import gateway, node, shard
    from xxnode.schema import ConfigError

    assert shard.parse({}).metrics_listen == "" and gateway.parse({}).metrics_listen == ""
    assert node.loads("").metrics_listen == ""
    assert shard.parse({"shard": {"metrics_listen": "127.0.0.1:9461"}}).metrics_listen == (
        "127.0.0.1:9461"
    )
    for bad, why in (("9461", "not HOST:PORT"), (9461, "must be a string")):
        with pytest.raises(ConfigError, match=f"^gateway.metrics_listen: {why}"):
            gateway.parse({"gateway": {"metrics_listen": bad}})
    with pytest.raises(ConfigError, match="^node.metrics_listen: not HOST:PORT"):
        node.loads('[node]\nmetrics_listen = "localhost"\n')


def test_a_bad_metrics_flag_is_one_line_and_exit_2(capsys):
    from xxnode.gateway import main as gateway_main

    assert gateway_main.main(["--metrics-listen", "nowhere", "--key-file", "/nonexistent"]) == 2
    assert capsys.readouterr().err == "xxgate: --metrics-listen: not HOST:PORT: 'nowhere'\n"

"""Recovery over a fake cgroupfs: tests/fixtures/recovery is a state dir and a cgroup tree as a
kill -9 left them (its README says what each job was doing). No root, no kernel: the
decisions of `xxnode.node.recovery` -- adopt, finalize, bill, requeue in class order, reap
orphans, settle cluster placements -- checked file by file. The real-kernel restart tests
(tests/host/test_node_restart.py, tests/vm) keep proving the same on live processes."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from xxnode.config.node import parse
from xxnode.kernel.cgroup import Cgroup
from xxnode.node import recovery
from xxnode.node.daemon import Node
from xxnode.node.host import Host

FIXTURE = Path(__file__).parent.parent / "fixtures" / "recovery"
A, B = "aa" * 16, "bb" * 16


@pytest.fixture
def restarted(tmp_path):
    """A Node over a copy of the fixture, recovered as a restarted daemon would be."""
    shutil.copytree(FIXTURE / "state", tmp_path / "state")
    shutil.copytree(FIXTURE / "cgroup", tmp_path / "cgroup")
    cfg = parse({"node": {"state_dir": str(tmp_path / "state")}})
    node = Node(cfg)
    node.host = Host(cfg)
    node.host.root = Cgroup(tmp_path / "cgroup")
    node.host.shims = node.host.root.child("_shims-1")
    out = recovery.recover(node)
    yield node, out, tmp_path
    node.journal.close()
    node.host.watcher.close()


def journal(tmp_path: Path) -> list[dict]:
    lines = (tmp_path / "state" / "journal.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{") and line.endswith("}")]


def test_a_job_whose_shim_exited_is_finalized_from_its_exit_record_and_billed(restarted):
    node, out, _ = restarted
    assert sorted(j.id for j in out.finalize) == ["j000001", "j000004"]
    assert out.watch == []  # no shim is alive in the fixture
    while node.queue.pop_next():  # finalizing starts queued jobs: no launcher here
        pass
    for job in out.finalize:
        asyncio.run(node._finalize(job))
    one, four = node.finished["j000001"], node.finished["j000004"]
    assert one["state"] == "succeeded" and one["exit_code"] == 0
    assert one["cpu_ms"] == 250.0  # the leaf's cpu.stat, not the journal
    assert one["charge_uc"] == pytest.approx(0.25 * node.classes.get("high").price)
    assert one["wall_ms"] == pytest.approx(500.0)  # start_ns .. end_ns of the exit record
    assert four["state"] == "lost" and "shim died" in four["reason"]
    assert four["cpu_ms"] == 40.0  # what it used is still billed


def test_jobs_that_never_started_are_queued_again_by_class_then_arrival(restarted):
    node, _, _ = restarted
    order = []
    while (head := node.queue.pop_next()) is not None:
        order.append(head[0])
    assert order == ["j000003", "j000007", "j000002"]  # high, medium, low
    assert all(node.jobs[j].state == "queued" for j in order)


def test_a_job_of_a_removed_class_is_finished_lost_and_journaled(restarted):
    node, _, tmp = restarted
    res = node.finished["j000005"]
    assert res["state"] == "lost" and "premium" in res["reason"]
    assert any(r["ev"] == "finished" and r["job"] == "j000005" for r in journal(tmp))


def test_finished_jobs_are_remembered_and_ids_continue_after_the_highest(restarted):
    node, _, _ = restarted
    assert node.finished["j000006"]["state"] == "succeeded"
    assert node.next_id == 8  # after the highest journaled id: none is ever reused


def test_an_orphan_cgroup_is_killed_and_known_leaves_are_left_alone(restarted):
    _, _, tmp = restarted
    assert (tmp / "cgroup/low/j000099/cgroup.kill").read_text() == "1"
    assert (tmp / "cgroup/high/j000001/cgroup.kill").read_text() == ""
    assert (tmp / "cgroup/medium/j000004/cgroup.kill").read_text() == ""


def test_cluster_placements_unsettled_are_resumed_settled_ones_forgotten(restarted):
    _, out, _ = restarted
    assert set(out.placements) == {A}
    p = out.placements[A]
    assert p.local == "j000007" and p.shard == "10.0.0.1:7000" and p.result is None


def test_job_dirs_nobody_remembers_are_pruned_the_rest_kept(restarted):
    _, _, tmp = restarted
    jobs = {d.name for d in (tmp / "state" / "jobs").iterdir()}
    assert "j000050" not in jobs
    assert {"j000001", "j000004", "j000006"} <= jobs


def test_a_torn_last_record_is_sealed_and_the_next_append_starts_a_line(restarted):
    node, _, tmp = restarted
    node.journal.append({"ev": "kill", "job": "j000003", "t": 1.0, "reason": "test"})
    last = (tmp / "state" / "journal.jsonl").read_text().splitlines()[-1]
    assert json.loads(last)["job"] == "j000003"

"""xxnode + xxctl with real processes on this host's kernel (cgroup v2 core, no controllers).

Every priority is read back from the kernel (sched_getscheduler on the job's pids), every
"nothing left behind" from cgroupfs and /proc. Each test has its own daemon, state dir,
socket and cgroup subtree, removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.harness import Daemon, shared_dir
from xxnode.kernel import clone3
from xxnode.kernel.cgroup import Cgroup

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups, SCHED_FIFO)")

XXCTL = [str(Path(sys.executable).with_name("xxctl"))]


@pytest.fixture
def gate_dir():
    d = shared_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_gate(d: Path, name: str = "gate") -> Path:
    """A FIFO a job blocks on (`read x < gate`) until the test opens it: an event, not a sleep."""
    p = d / name
    os.mkfifo(p, 0o666)
    os.chmod(p, 0o666)
    return p


def open_gate(p: Path) -> None:
    fd = os.open(p, os.O_WRONLY)  # blocks until the job has it open for reading
    os.write(fd, b"go\n")
    os.close(fd)


def xxctl(d: Daemon, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*XXCTL, *args], env=d.env(), capture_output=True, text=True, timeout=60, input=stdin
    )


def leaf_pids(d: Daemon, cls: str, jid: str) -> list[int]:
    return Cgroup(d.cgroup.path / cls / jid).procs()


def wait_for_pids(d: Daemon, cls: str, jid: str, n: int) -> list[int]:
    """The job announces itself through a FIFO; we need its pids only once it is running."""
    pids = leaf_pids(d, cls, jid)
    assert len(pids) >= n, pids
    return pids


def test_run_json_reports_accounting_and_runs_as_nobody(daemon):
    r = xxctl(daemon, "run", "--json", "--class", "high", "--", "sh", "-c", "id -un; exit 7")
    assert r.returncode == 7, r.stderr
    out = json.loads(r.stdout)
    for key in ("job", "class", "pid", "exit_code", "queued_ms", "wall_ms", "cpu_ms"):
        assert key in out, key
    assert out["class"] == "high" and out["exit_code"] == 7 and out["state"] == "failed"
    assert out["stdout"] == "nobody\n"
    assert out["cpu_ms"] > 0 and out["wall_ms"] > 0 and out["queued_ms"] >= 0
    assert out["charge_uc"] == pytest.approx(out["cpu_ms"] / 1e3 * 2.0, rel=1e-6)


def test_class_priorities_from_the_kernel(daemon, gate_dir):
    """Each job and its children carry their class's policy, set before their code ran; they
    run in their own leaf, as nobody, with RLIMIT_RTPRIO 0 and no_new_privs."""
    gates = {c: make_gate(gate_dir, c) for c in ("high", "medium", "low")}
    jobs = {}
    for cls, gate in gates.items():
        # a child process and the shell itself; both must carry the class policy
        jobs[cls] = daemon.submit(cls, ["sh", "-c", f"sleep 60 & read x < {gate}; kill $!"])
    want = {"high": (os.SCHED_FIFO, 30), "medium": (os.SCHED_FIFO, 20), "low": (os.SCHED_BATCH, 0)}
    for cls, jid in jobs.items():
        leaf = Cgroup(daemon.cgroup.path / cls / jid)
        fd = os.open(gates[cls], os.O_WRONLY)  # blocks until the job is reading: it runs
        pids = leaf.procs()
        assert len(pids) == 2, pids
        for pid in pids:
            assert (os.sched_getscheduler(pid), os.sched_getparam(pid).sched_priority) == want[cls]
            # (prlimit() on another uid needs CAP_SYS_RESOURCE, which this host lacks)
            limits = Path(f"/proc/{pid}/limits").read_text()
            assert [ln.split()[-2:] for ln in limits.splitlines() if "realtime priority" in ln] == [
                ["0", "0"]
            ]
            status = Path(f"/proc/{pid}/status").read_text()
            assert "NoNewPrivs:\t1" in status
            assert f"Uid:\t{65534}" in status
            assert Path(f"/proc/{pid}/cgroup").read_text().strip().endswith(f"/{cls}/{jid}")
        os.write(fd, b"go\n")
        os.close(fd)
    for jid in jobs.values():
        res = daemon.wait(jid)["result"]
        assert res["state"] == "succeeded", res


def test_job_cannot_raise_its_priority(daemon):
    fin = daemon.run("medium", ["sh", "-c", "chrt -f -p 90 $$ && echo raised; chrt -p $$"])
    assert "raised" not in fin["stdout"]
    assert "priority: 20" in fin["stdout"]
    assert "Operation not permitted" in fin["stderr"] or "failed" in fin["stderr"]


def test_fifo_within_class_and_higher_class_first(tmp_path, gate_dir):
    """One slot: while a blocker holds it, jobs queue; they then start highest class first,
    in arrival order within a class (journal order of `started`)."""
    with Daemon(tmp_path / "node", max_running=1) as d:
        gate = make_gate(gate_dir)
        blocker = d.submit("high", ["sh", "-c", f"read x < {gate}"])
        order = [
            ("low", "l1"),
            ("medium", "m1"),
            ("low", "l2"),
            ("high", "h1"),
            ("medium", "m2"),
            ("high", "h2"),
        ]
        ids = {d.submit(cls, ["true"]): tag for cls, tag in order}
        st = d.call({"op": "status"})["status"]
        assert st["queued"] == {"high": 2, "medium": 2, "low": 2}
        open_gate(gate)
        for jid in [blocker, *ids]:
            assert d.wait(jid)["result"]["state"] == "succeeded"
        started = [
            json.loads(line)["job"]
            for line in (d.state_dir / "journal.jsonl").read_text().splitlines()
            if json.loads(line)["ev"] == "started"
        ]
        assert [ids[j] for j in started if j in ids] == ["h1", "h2", "m1", "m2", "l1", "l2"]


def test_lower_classes_do_not_hold_back_a_higher_one(tmp_path, gate_dir):
    """With the slots full of low jobs a high job still starts at once: the kernel preempts
    the low ones, the queue only orders equals and betters."""
    with Daemon(tmp_path / "node", max_running=1) as d:
        gate = make_gate(gate_dir)
        low = d.submit("low", ["sh", "-c", f"read x < {gate}"])
        low2 = d.submit("low", ["true"])
        fin = d.run("high", ["true"])
        assert fin["result"]["state"] == "succeeded"
        assert d.call({"op": "status"})["status"]["queued"]["low"] == 1  # low2 still waits
        open_gate(gate)
        assert d.wait(low)["result"]["state"] == "succeeded"
        assert d.wait(low2)["result"]["state"] == "succeeded"


def test_timeout_kills_the_whole_cgroup(daemon):
    """A job that forks children and outlives its timeout: all of it dies (cgroup.kill)."""
    script = "sleep 300 & echo $!; (sleep 300 & echo $!; wait) & sleep 300"
    r = xxctl(
        daemon, "run", "--json", "--class", "medium", "--timeout", "0.5", "--", "sh", "-c", script
    )
    assert r.returncode == 124, r.stderr
    out = json.loads(r.stdout)
    assert out["state"] == "timeout" and out["signal"] == 9
    pids = [int(x) for x in out["stdout"].split()]
    assert len(pids) == 2
    for pid in [*pids, out["pid"]]:
        assert not Path(f"/proc/{pid}").exists(), f"pid {pid} survived the timeout"
    assert not (daemon.cgroup.path / "medium" / out["job"]).exists()


def test_main_process_exit_takes_stragglers(daemon):
    fin = daemon.run("high", ["sh", "-c", "sleep 300 & echo $!"])
    assert fin["result"]["state"] == "succeeded"
    assert not Path(f"/proc/{int(fin['stdout'])}").exists()


def test_kill_running_and_cancel_queued(tmp_path, gate_dir):
    with Daemon(tmp_path / "node", max_running=1) as d:
        gate = make_gate(gate_dir)
        running = d.submit("high", ["sh", "-c", f"sleep 300 & read x < {gate}"])
        queued = d.submit("high", ["true"])
        fd = os.open(gate, os.O_WRONLY)  # the job is running and blocked
        try:
            r = xxctl(d, "kill", queued)
            assert r.returncode == 0 and "cancelled" in r.stdout
            r = xxctl(d, "kill", running)
            assert r.returncode == 0 and "killing" in r.stdout
            res = d.wait(running)["result"]
        finally:
            os.close(fd)
        assert res["state"] == "killed" and res["signal"] == 9
        assert d.wait(queued)["result"]["state"] == "cancelled"
        assert xxctl(d, "kill", "j999999").returncode == 2


def test_output_is_captured_with_a_limit(tmp_path):
    with Daemon(tmp_path / "node", extra="output_limit = 1000") as d:
        fin = d.run("high", ["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x; echo err >&2"])
        res = fin["result"]
        assert res["stdout_bytes"] == 1000 and res["stdout_dropped"] == 99000
        assert fin["stdout"] == "x" * 1000 and fin["stderr"] == "err\n"
        r = xxctl(d, "run", "--class", "high", "--", "sh", "-c", "head -c 100000 /dev/zero")
        assert r.returncode == 0 and len(r.stdout) == 1000
        assert "stdout: 99 000 bytes dropped" in r.stderr, r.stderr  # said, not silent


def test_stdin_env_and_cwd_reach_the_job(daemon, gate_dir):
    r = xxctl(
        daemon,
        "run",
        "--class",
        "low",
        "--env",
        "GREETING=hi",
        "--cwd",
        str(gate_dir),
        "--stdin",
        "-",
        "--",
        "sh",
        "-c",
        'echo "$GREETING $(pwd) $XX_CLASS"; cat',
        stdin="payload",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"hi {gate_dir} low\npayload"


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--class", "gold", "--", "true"], "unknown class 'gold'"),
        (["--class", "high", "--", "no-such-command-xx"], "command not found"),
        (["--class", "high", "--timeout", "-1", "--", "true"], "timeout: must be a positive"),
        (["--class", "high", "--timeout", "99999", "--", "true"], "exceeds this node's limit"),
        (["--class", "high", "--cwd", "relative", "--", "true"], "cwd: must be an absolute"),
        (["--class", "high", "--env", "NOEQUALS", "--", "true"], "expected K=V"),
    ],
)
def test_bad_specs_are_refused_with_a_reason(daemon, args, reason):
    r = xxctl(daemon, "run", *args)
    assert r.returncode == 2
    assert reason in r.stderr
    assert "Traceback" not in r.stderr


def test_exec_failure_is_reported_not_hidden(daemon, tmp_path):
    script = tmp_path / "rootonly.sh"  # tmp_path is 0700 root: nobody cannot exec it
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    r = xxctl(daemon, "run", "--json", "--class", "high", "--", str(script))
    assert r.returncode == 127
    out = json.loads(r.stdout)
    assert out["state"] == "start_failed" and "execve: Permission denied" in out["reason"]


def test_status_names_missing_controllers_and_rt_groups(daemon):
    st = json.loads(xxctl(daemon, "status", "--json").stdout)
    assert st["daemon_sched"] == "SCHED_FIFO 40"
    assert os.sched_getscheduler(st["pid"]) & ~os.SCHED_RESET_ON_FORK == os.SCHED_FIFO
    assert "cpu" not in st["controllers_enabled"]
    for c in st["controllers_missing"]:
        assert c not in daemon.cgroup.subtree_control()
    if "memory" not in Cgroup(daemon.cgroup.path).controllers():
        assert "memory" in st["controllers_missing"]
        assert any("no memory.peak" in d for d in st["degraded"])
    human = xxctl(daemon, "status").stdout
    assert "● xxnode" in human and "Controllers:" in human and "RT groups:" in human
    assert oct(os.stat(daemon.socket).st_mode & 0o777) == "0o600"


def test_kill9_and_restart_loses_nothing_and_runs_nothing_twice(tmp_path, gate_dir):
    """Jobs outlive a kill -9 of the daemon with their priorities; the restarted daemon
    re-adopts them, starts the queued ones once, and a waiting `xxctl run` gets its result."""
    ran = gate_dir / "ran"
    ran.touch()
    ran.chmod(0o666)
    d = Daemon(tmp_path / "node", max_running=1)
    try:
        d.start()
        gate = make_gate(gate_dir)
        running = d.submit("high", ["sh", "-c", f"echo r >> {ran}; read x < {gate}; exit 3"])
        queued = [d.submit("medium", ["sh", "-c", f"echo q{i} >> {ran}"]) for i in range(3)]
        waiter = subprocess.Popen(
            [*XXCTL, "run", "--json", "--class", "low", "--", "sh", "-c", f"echo w >> {ran}"],
            env=d.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert "accepted" in waiter.stderr.readline()  # journaled before the crash
        fd = os.open(gate, os.O_WRONLY)  # `running` is up and blocked on its gate
        pid = leaf_pids(d, "high", running)[0]
        d.crash()
        assert os.sched_getscheduler(pid) == os.SCHED_FIFO  # the kernel still enforces it
        assert os.sched_getparam(pid).sched_priority == 30
        d.start()  # restart: adopt `running`, queue the rest again
        os.write(fd, b"go\n")
        os.close(fd)
        res = d.wait(running)["result"]
        assert res["state"] == "failed" and res["exit_code"] == 3  # status survived the crash
        for jid in queued:
            assert d.wait(jid)["result"]["state"] == "succeeded"
        out, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 0, err
        assert "reconnecting" in err
        assert json.loads(out)["state"] == "succeeded"
        lines = ran.read_text().split()
        assert sorted(lines) == ["q0", "q1", "q2", "r", "w"], lines  # each exactly once
        finished = [
            json.loads(x)["job"]
            for x in (d.state_dir / "journal.jsonl").read_text().splitlines()
            if json.loads(x)["ev"] == "finished"
        ]
        assert len(finished) == len(set(finished)) == 5
    finally:
        d.cleanup()


def test_a_late_shim_cannot_start_a_job_the_daemon_voided(tmp_path):
    """The recovery claim: once a restarted daemon voids a never-started job, a shim from
    the old daemon that arrives late refuses to run it."""
    from xxnode.kernel.cgroup import root

    base = root().create(f"xxtest-void-{os.getpid()}")
    try:
        leaf = base.create("job")
        jd = tmp_path / "job"
        jd.mkdir()
        assert clone3.claim_void(jd)
        assert clone3.shim_state(jd) == ("void", None)
        req = clone3.SpawnRequest(
            path="/bin/true",
            argv=["true"],
            env={},
            job_cgroup=leaf.path,
            job_dir=jd,
            job_policy=os.SCHED_OTHER,
            job_priority=0,
            shim_policy=os.SCHED_OTHER,
            shim_priority=0,
        )
        with pytest.raises(clone3.SpawnError) as ei:
            clone3.spawn(req)
        e = ei.value
        assert e.stage == clone3.STAGE_CLAIM
        os.waitid(os.P_PIDFD, e.shim_pidfd, os.WEXITED)
        os.close(e.shim_pidfd)
        e.spawned.release()
        assert leaf.cpu_stat().get("usage_usec", 0) == 0  # nothing ever ran in the leaf
    finally:
        base.remove_tree()


def test_bad_config_names_the_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[class]]\nname = "a"\nprice = 1\npolicy = "fifo"\npriority = 200\n')
    r = subprocess.run(
        [sys.executable, "-m", "xxnode.node.main", "--config", str(cfg), "--check"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "class[0](a).priority: must be an integer 1..98, got 200" in r.stderr


def test_clone_into_a_killed_cgroup_is_detected(tmp_path):
    """On 6.14+ kernels a CLONE_INTO_CGROUP child whose target cgroup was cgroup.kill'ed
    (kill_seq differs from the parent's cgroup) is SIGKILLed at birth. The shim tells this
    apart from any failure of the job itself, and never lets it pass as a job's result."""
    from xxnode.kernel.cgroup import root

    base = root().create(f"xxtest-killseq-{os.getpid()}")
    try:
        leaf = base.create("job")
        leaf.kill()  # empty, but its kill_seq moves on
        jd = tmp_path / "job"
        jd.mkdir()
        req = clone3.SpawnRequest(
            path="/bin/true",
            argv=["true"],
            env={},
            job_cgroup=leaf.path,
            job_dir=jd,
            job_policy=os.SCHED_OTHER,
            job_priority=0,
            shim_policy=os.SCHED_OTHER,
            shim_priority=0,
        )
        try:
            sp = clone3.spawn(req)
        except clone3.SpawnError as e:
            assert e.stage in clone3.STAGES_KILLED_AT_BIRTH
            sp = e.spawned
        else:  # a kernel without the kill_seq check: the job simply ran
            pass
        os.waitid(os.P_PIDFD, sp.shim_pidfd, os.WEXITED)
        os.close(sp.shim_pidfd)
        sp.release()
        rec = clone3.read_exit(jd)
        assert rec["fail_stage"] in (0, 15)
        assert (rec["fail_stage"] == 0) == (rec["wait_status"] == 0)
    finally:
        base.remove_tree()


def test_daemon_recovers_from_a_killed_shim_cgroup(daemon):
    """Someone cgroup.kill's the (empty) shims cgroup: the next job fails at birth with the
    reason, the daemon moves its shims to a fresh cgroup, and later jobs run."""
    shims = [c for c in Cgroup(daemon.cgroup.path).children() if c.path.name.startswith("_shims")]
    assert len(shims) == 1
    shims[0].kill()
    first = daemon.run("high", ["true"])["result"]
    if first["state"] == "start_failed":
        assert "killed at birth" in first["reason"] or "SIGKILLed" in first["reason"]
    else:
        assert first["state"] == "succeeded"  # kernel without the kill_seq check
    assert daemon.run("high", ["true"])["result"]["state"] == "succeeded"

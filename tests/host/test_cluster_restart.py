"""The node<->cluster seam across a crash (real processes: xxshard, xxnode, `xxctl submit
--wait`): a node killed with -9 at any point of a placed job's life, or the job's shard
killed with -9, and restarted — the waiting submitter still gets the job's real result,
and the job ran exactly once (each run appends a line to a file the test counts).

The crash points between two journal writes come from XXNODE_TEST_CRASH, which makes the
node SIGKILL itself right after the named write (xxnode/node/crash.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.host.test_node import make_gate, open_gate
from tests.support.harness import Daemon, shared_dir

XXCTL = str(Path(sys.executable).with_name("xxctl"))
DEAD_AFTER = 20.0  # longer than a node's restart on a loaded machine: it keeps its jobs


class Seam:
    """One shard, one node ("n1"), and a shared dir for the job's record and gates."""

    def __init__(self, tmp: Path, shard_state: bool = False) -> None:
        self.tmp = tmp
        self.jobdir = shared_dir()
        self.record = self.jobdir / "record"
        self.key = tmp / "cluster.key"
        self.key.write_text(os.urandom(32).hex())
        self.shard_cfg = tmp / "shard.toml"
        self.shard_cfg.write_text(f"[shard]\ndead_after = {DEAD_AFTER}\n")
        self.shard_state = tmp / "shard-state" if shard_state else None
        self.shard: subprocess.Popen | None = None
        self.addr = "127.0.0.1:0"
        self.start_shard()
        self.node = Daemon(
            tmp / "node",
            extra=f'[cluster]\nshards = ["{self.addr}"]\nkey_file = "{self.key}"\n'
            f'listen = "127.0.0.1:0"\nnode_id = "n1"\n',
        )
        self.submitter: subprocess.Popen | None = None

    def start_shard(self) -> None:
        argv = [sys.executable, "-m", "xxnode.shard.main", "--config", str(self.shard_cfg),
                "--listen", self.addr, "--key-file", str(self.key)]  # fmt: skip
        if self.shard_state:
            argv += ["--state-dir", str(self.shard_state)]
        self.shard = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        line = self.shard.stdout.readline()
        assert "listening on" in line, line
        self.addr = line.split()[-1]  # a restart binds the same port

    def kill_shard(self) -> None:
        self.shard.kill()
        self.shard.wait()
        self.shard.stdout.close()

    def submit(self, script: str) -> None:
        """`xxctl submit --wait` of a job that appends to the record, then runs `script`."""
        sh = f"echo ran >> {self.record}; {script}"
        self.submitter = subprocess.Popen(
            [XXCTL, "submit", "--wait", "--json", "--shard", self.addr, "--key-file",
             str(self.key), "--class", "high", "--", "/bin/sh", "-c", sh],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def result(self) -> dict:
        out, err = self.submitter.communicate(timeout=120)
        assert self.submitter.returncode == 0, (out, err, self.node.log())
        return json.loads(out)

    def runs(self) -> int:
        return len(self.record.read_text().splitlines())

    def close(self) -> None:
        if self.submitter and self.submitter.poll() is None:
            self.submitter.kill()
            self.submitter.communicate()
        self.node.cleanup()
        if self.shard and self.shard.poll() is None:
            self.kill_shard()
        shutil.rmtree(self.jobdir, ignore_errors=True)


@pytest.fixture
def seam(tmp_path):
    made = []

    def make(**kw) -> Seam:
        made.append(Seam(tmp_path, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _within(seconds: float, cond) -> bool:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _gated(s: Seam) -> tuple[Path, Path]:
    """The job says it runs through `up` and then waits on `gate`: events, not sleeps."""
    up, gate = make_gate(s.jobdir, "up"), make_gate(s.jobdir, "gate")
    s.submit(f"echo up > {up}; read x < {gate}; echo real-result")
    with open(up) as f:  # returns once the job is running
        assert f.read() == "up\n"
    return up, gate


def test_node_killed_while_the_job_runs(seam):
    s = seam()
    s.node.start()
    _, gate = _gated(s)
    s.node.crash()
    s.node.start()  # re-adopts the running job
    open_gate(gate)
    res = s.result()
    assert res["status"] == 0 and res["stdout"] == "real-result\n", res
    assert s.runs() == 1


@pytest.mark.parametrize(
    "point",
    [
        "after-place",  # the node journaled the PLACE; the shard never heard ACCEPT
        "after-accept",  # claimed, granted and admitted; never started
        "after-finish",  # the job exited and its result is journaled; no DONE sent
    ],
)
def test_node_killed_between_journal_writes(seam, point):
    s = seam()
    s.node.start(env={"XXNODE_TEST_CRASH": point})
    s.submit("echo real-result")
    assert s.node.proc.wait(timeout=120) == -9  # it died at the crash point
    s.node.start()
    res = s.result()
    assert res["status"] == 0 and res["stdout"] == "real-result\n", res
    assert s.runs() == 1
    # and nothing more is owed: the shard's ack of DONE may trail the submitter's (no event
    # for it leaves the node but this journal record, so its file is what we watch)
    journal = s.node.state_dir / "journal.jsonl"
    assert _within(10.0, lambda: '"ev":"done_acked"' in journal.read_text()), journal.read_text()


def test_shard_killed_mid_job_with_a_state_dir(seam):
    s = seam(shard_state=True)
    s.node.start()
    _, gate = _gated(s)
    s.kill_shard()
    s.start_shard()  # same port, same state dir
    open_gate(gate)
    res = s.result()
    assert res["status"] == 0 and res["stdout"] == "real-result\n", res
    assert s.runs() == 1
    log = s.node.log()
    assert "Traceback" not in log, log

"""Putting a job on the CPU: its leaf cgroup made and limited, then clone3 starts the shim
and the job straight into their cgroups at their class's policy and priority, as the
unprivileged job user, with the class's OOM rank. The self-test runs /bin/true down the
same path once at start, so a host where jobs cannot start says why at start."""

from __future__ import annotations

import base64
import logging
import os
import shutil
from pathlib import Path

from xxnode.classes import PriceClass
from xxnode.kernel import clone3
from xxnode.kernel.cgroup import Cgroup, CgroupError
from xxnode.node import jobs as J
from xxnode.node.host import Host, StartupError

log = logging.getLogger("xxnode")

UNPOPULATE_GRACE_S = 10.0


class LaunchFailed(Exception):
    """Nothing of the job runs; the message is the job's start_failed reason."""


class Launcher:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.cfg = host.cfg

    def request(self, c: PriceClass, leaf: Cgroup, jd: Path, path: str, argv: list[str], **kw):
        """What every launch gets from its class — policy and priority for the job and its
        shim, the unprivileged user, the OOM rank — in one place (self-test and jobs)."""
        shim_policy, shim_prio = c.shim_sched
        return clone3.SpawnRequest(
            path=path, argv=argv, job_cgroup=leaf.path, job_dir=jd,
            job_policy=c.sched_policy, job_priority=c.priority,
            shim_policy=shim_policy, shim_priority=shim_prio,
            user=clone3.User(self.cfg.uid, self.cfg.gid, self.cfg.groups),
            shim_cgroup=self.host.shims.path, oom_score_adj=self.host.memory.oom_adj(c.name),
            **kw,
        )  # fmt: skip

    def launch(self, job: J.Job, leaf: Cgroup) -> clone3.Spawned:
        """Start one job; LaunchFailed if nothing of it runs. A Spawned whose job failed
        after the shim started is returned: the shim's exit record says what happened."""
        c = self.cfg.classes.get(job.cls)
        jd = self.host.job_dir(job.id)
        try:
            jd.mkdir()
            leaf.make(self.host.enabled, self.cfg.pids_max)
        except (OSError, CgroupError) as e:
            raise LaunchFailed(f"setting up: {e}") from None
        spec = job.spec
        req = self.request(
            c, leaf, jd, spec["path"], spec["argv"],
            env=J.job_env(spec, job.id, self.cfg), cwd=spec["cwd"],
            stdin=base64.b64decode(spec["stdin"]) if spec["stdin"] else b"",
            out_limit=self.cfg.output_limit, timeout_s=spec["timeout"],
        )  # fmt: skip
        try:
            return clone3.spawn(req)
        except clone3.SpawnError as e:
            sp = getattr(e, "spawned", None)
            if e.stage in clone3.STAGES_KILLED_AT_BIRTH:
                log.warning("job %s: %s; moving shims to a fresh cgroup", job.id, e)
                self.host.rotate_shims()
            if sp is None:
                raise LaunchFailed(str(e)) from None
            log.info("job %s did not start: %s", job.id, e)
            return sp

    def self_test(self) -> None:
        """Launch /bin/true through the whole path once, so a host where jobs cannot start
        (SCHED_FIFO refused in the leaf, children killed at birth, ...) fails at start with
        the reason instead of failing every job."""
        c = self.cfg.classes[0]
        leaf = self.host.root.child(c.name).create(f"selftest-{os.getpid()}")
        jd = self.cfg.state_dir / f"selftest-{os.getpid()}"
        shutil.rmtree(jd, ignore_errors=True)
        jd.mkdir()
        req = self.request(c, leaf, jd, "/bin/true", ["true"], env={})
        try:
            try:
                rec = clone3.run_to_exit(req)
            except clone3.SpawnError as e:
                raise StartupError(
                    f"self-test launch of /bin/true as {c.name} ({c.sched_text()}) failed: {e}"
                ) from None
            if rec.get("wait_status", -1) != 0:
                raise StartupError(f"self-test launch of /bin/true exited with status {rec}")
        finally:
            shutil.rmtree(jd, ignore_errors=True)
            self.host.watcher.wait(leaf, UNPOPULATE_GRACE_S)
            leaf.remove()

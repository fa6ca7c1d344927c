"""Job specs (validated, refused with a reason) and job results (the accounting record)."""

from __future__ import annotations

import base64
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from xxnode.config import NodeConfig
from xxnode.kernel.clone3 import STAGES, decode_wait_status

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
MAX_ARGS = 4096
MAX_ARG_BYTES = 128 * 1024


class SpecError(ValueError):
    """The job spec is refused; the message says why, naming the field."""


def _str(v: object, what: str) -> str:
    if not isinstance(v, str):
        raise SpecError(f"{what}: must be a string")
    if "\0" in v:
        raise SpecError(f"{what}: contains a NUL byte")
    return v


def resolve(cmd: str, env_path: str, cwd: str) -> str:
    """execve needs a path: look cmd up in the job's PATH as the shell would."""
    if "/" in cmd:
        path = cmd if cmd.startswith("/") else os.path.join(cwd, cmd)
        if not os.path.isfile(path):
            raise SpecError(f"argv[0]: {cmd}: no such file")
        if not os.access(path, os.X_OK):
            raise SpecError(f"argv[0]: {cmd}: not executable")
        return path
    for d in env_path.split(":"):
        path = os.path.join(d or ".", cmd)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise SpecError(f"argv[0]: {cmd}: command not found in PATH={env_path}")


def validate(req: dict, cfg: NodeConfig) -> dict:
    """A client's run request -> the spec we journal and launch from."""
    cls = req.get("class")
    if not isinstance(cls, str) or cfg.classes.get(cls) is None:
        raise SpecError(f"class: unknown class {cls!r} (known: {', '.join(cfg.classes.names())})")
    argv = req.get("argv")
    if not isinstance(argv, list) or not argv:
        raise SpecError("argv: must be a non-empty list of strings")
    if len(argv) > MAX_ARGS:
        raise SpecError(f"argv: more than {MAX_ARGS} arguments")
    argv = [_str(a, f"argv[{i}]") for i, a in enumerate(argv)]
    if not argv[0]:
        raise SpecError("argv[0]: empty command")
    env = req.get("env") or {}
    if not isinstance(env, dict):
        raise SpecError("env: must be a table of strings")
    for k, v in env.items():
        _str(v, f"env[{k!r}]")
        if not k or "=" in k or "\0" in k:
            raise SpecError(f"env: bad variable name {k!r}")
    if sum(len(a) + 1 for a in argv) + sum(len(k) + len(v) + 2 for k, v in env.items()) > (
        MAX_ARG_BYTES
    ):
        raise SpecError(f"argv+env: larger than {MAX_ARG_BYTES} bytes")
    cwd = _str(req.get("cwd") or "/", "cwd")
    if not cwd.startswith("/"):
        raise SpecError(f"cwd: must be an absolute path, got {cwd!r}")
    if not os.path.isdir(cwd):
        raise SpecError(f"cwd: {cwd}: no such directory")
    stdin = req.get("stdin") or ""
    try:
        payload = base64.b64decode(_str(stdin, "stdin"), validate=True)
    except ValueError:
        raise SpecError("stdin: must be base64") from None
    if len(payload) > cfg.stdin_limit:
        raise SpecError(f"stdin: {len(payload)} bytes, limit is {cfg.stdin_limit}")
    timeout = req.get("timeout")
    if timeout is None:
        timeout = cfg.default_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise SpecError(f"timeout: must be a positive number of seconds, got {timeout!r}")
    if timeout > cfg.max_timeout:
        raise SpecError(f"timeout: {timeout} s exceeds this node's limit of {cfg.max_timeout} s")
    path = resolve(argv[0], env.get("PATH", DEFAULT_PATH), cwd)
    return {
        "class": cls,
        "argv": argv,
        "env": env,
        "cwd": cwd,
        "stdin": stdin,
        "timeout": float(timeout),
        "path": path,
    }


def job_env(spec: dict, job_id: str, cfg: NodeConfig) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOME": "/", "USER": cfg.user, "LANG": "C.UTF-8"}
    env.update(spec["env"])
    env["XX_JOB"] = job_id
    env["XX_CLASS"] = spec["class"]
    return env


@dataclass
class Job:
    id: str
    cls: str
    spec: dict
    accepted_at: float
    state: str = "queued"  # queued | running | finished
    started_at: float | None = None
    pid: int | None = None
    shim_pid: int | None = None
    shim_pidfd: int = -1
    is_child: bool = False  # we launched the shim (reap it) or adopted it after a restart
    spawned: Any = None
    kill_reason: str | None = None
    result: dict | None = None
    waiters: list = field(default_factory=list)
    cluster: dict | None = None  # {job, arbiter, shard} when a shard placed it (journaled)

    def summary(self) -> dict:
        return {
            "job": self.id,
            "class": self.cls,
            "state": self.state,
            "pid": self.pid,
            "argv": self.spec["argv"],
            "accepted_at": self.accepted_at,
            "started_at": self.started_at,
            "timeout": self.spec["timeout"],
        }


def signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def make_result(
    job: Job,
    exitrec: dict[str, int] | None,
    cpu: dict[str, int],
    memory_peak: int | None,
    oom_kills: int | None,
    price: float,
    finished_at: float,
    lost_reason: str | None = None,
) -> dict:
    """The accounting record of one job (journaled; billing reads cpu_ms x price)."""
    exit_code = sig = None
    start = job.started_at
    end = finished_at
    reason = ""
    if exitrec is not None:
        start = exitrec.get("start_ns", 0) / 1e9 or start
        end = exitrec.get("end_ns", 0) / 1e9 or end
        stage = exitrec.get("fail_stage", 0)
        if stage:
            state = "start_failed"
            err = exitrec.get("fail_errno", 0)
            reason = f"{STAGES.get(stage, stage)}: {os.strerror(err) if err else 'failed'}"
        else:
            exit_code, sig = decode_wait_status(exitrec.get("wait_status", 0))
            if exitrec.get("timed_out"):
                state, reason = "timeout", f"timed out after {job.spec['timeout']:g} s"
            elif sig is not None and job.kill_reason:
                state, reason = "killed", job.kill_reason
            elif sig is not None and oom_kills:
                state, reason = "oom_killed", f"killed by the kernel's OOM killer ({signame(sig)})"
            elif sig is not None:
                state, reason = "failed", f"killed by {signame(sig)}"
            elif exit_code == 0:
                state = "succeeded"
            else:
                state, reason = "failed", f"exit code {exit_code}"
    else:
        state, reason = "lost", lost_reason or "exit status unknown"
    cpu_us = cpu.get("usage_usec", 0)
    res = {
        "job": job.id,
        "class": job.cls,
        "state": state,
        "reason": reason,
        "exit_code": exit_code,
        "signal": sig,
        "pid": job.pid,
        "argv": job.spec["argv"],
        "accepted_at": job.accepted_at,
        "started_at": start,
        "finished_at": end,
        "queued_ms": round(((start or job.accepted_at) - job.accepted_at) * 1e3, 3),
        "wall_ms": round(((end or 0) - (start or 0)) * 1e3, 3) if start else 0.0,
        "cpu_ms": round(cpu_us / 1e3, 3),
        "cpu_user_ms": round(cpu.get("user_usec", 0) / 1e3, 3),
        "cpu_system_ms": round(cpu.get("system_usec", 0) / 1e3, 3),
        "memory_peak": memory_peak,
        "oom_kills": oom_kills,
        "price": price,
        "charge_uc": round(cpu_us / 1e6 * price, 9),
    }
    if exitrec is not None:
        for k in ("stdout_bytes", "stdout_dropped", "stderr_bytes", "stderr_dropped"):
            res[k] = exitrec.get(k, 0)
    return res


def cancelled_result(job: Job, reason: str, now: float, price: float) -> dict:
    res = make_result(job, None, {}, None, None, price, now, reason)
    res.update(
        state="cancelled", started_at=None, queued_ms=round((now - job.accepted_at) * 1e3, 3)
    )
    return res

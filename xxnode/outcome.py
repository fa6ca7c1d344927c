"""How a job ended, in words and as an exit status: one mapping for every path (`xxctl run`
on the node, `xxctl submit --wait` through the cluster), so the same end reads the same.

A result is the node's accounting record (`state`, `reason`, `exit_code`, `signal`) or,
through the cluster, that record with the cluster's `status` beside it; the cluster's own
ends (node lost, not started) carry only `status` and `error`. Exit statuses follow the
shell's and timeout(1)'s conventions: 124 timed out, 127 could not start, 128+N killed by
signal N, 1 for an end with no status of its own.
"""

from __future__ import annotations

import signal

from xxnode.wire import CANCELLED, DENIED, FAILED_START, NODE_LOST

_CLUSTER_WORDS = {
    NODE_LOST: "the node running it was lost",
    DENIED: "not started: another node was given it",
    FAILED_START: "could not start",
    CANCELLED: "cancelled while queued: nothing ran",
}


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def exit_status(res: dict) -> int:
    """The status a CLI exits with for this end."""
    state = res.get("state")
    if state == "succeeded":
        return 0
    if state == "timeout":
        return 124
    if state == "start_failed":
        return 127
    code, sig = res.get("exit_code"), res.get("signal")
    if state is not None:
        if code is not None:
            return code if 0 <= code < 256 else 1
        if sig:
            return 128 + sig
        return 1
    st = res.get("status")  # a cluster end with no node record
    if st == FAILED_START:
        return 127
    if isinstance(st, int) and 0 <= st < 256:
        return st
    return 1


def words(res: dict) -> str:
    """One line: 'succeeded', 'timed out after 1 s', 'killed by SIGKILL', ..."""
    state = res.get("state")
    if state is not None:
        reason = res.get("reason") or ""
        if state == "succeeded":
            return "succeeded"
        if state == "timeout":
            return reason or "timed out"
        return f"{state}: {reason}" if reason and not reason.startswith(state) else reason or state
    st = res.get("status")
    err = res.get("error") or ""
    if st in _CLUSTER_WORDS:
        base = _CLUSTER_WORDS[st]
        return f"{base} ({err})" if err else base
    if st == 0:
        return "succeeded"
    if isinstance(st, int) and st > 128:
        return f"killed by {_signame(st - 128)}"
    return f"exit code {st}" + (f" ({err})" if err else "")


def dropped(res: dict) -> str:
    """Every truncation of the job's output, said: 'stdout: 98 951 424 bytes dropped'
    ('' when nothing was)."""
    parts = []
    for stream in ("stdout", "stderr"):
        n = res.get(f"{stream}_dropped") or 0
        if n:
            parts.append(f"{stream}: {n:,} bytes dropped".replace(",", " "))
    return ", ".join(parts)

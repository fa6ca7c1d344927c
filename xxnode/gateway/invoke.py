"""An invocation's way out of the gateway and back: a cluster job (a function reference and
the event) submitted to the shards with this gateway as its arbiter, and its result shaped
as Lambda's Invoke answers.

The gateway waits at most the function's timeout plus a margin (config `margin`) beyond
what the cluster needs to place it: a shard or node that dies mid-invocation ends in a
clear error, never a hang."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass

from xxnode import wire
from xxnode.cluster.client import ClusterClient, SubmitError

LOG_TAIL = 4096  # X-Amz-Log-Result: the last 4 KB of the log, as Lambda's Tail


@dataclass(frozen=True)
class Call:
    """What one invocation needs from the function's record."""

    tenant: str
    name: str
    version: str
    digest: str
    runtime: str
    handler: str
    timeout: float
    memory_mb: int
    env: dict[str, str]
    cls: str  # the effective class it runs at
    chain: dict | None = None  # {payer, depth, own_class}: the node bills by it, callees inherit


@dataclass
class Outcome:
    """A finished invocation: a response (or a function error) and its usage report; or,
    when it never reached an environment, ``failure`` says why (the gateway's 5xx)."""

    payload: bytes = b""
    function_error: str | None = None  # X-Amz-Function-Error: Unhandled
    log: str = ""
    report: dict | None = None
    node: str = ""
    failure: str | None = None

    def log_tail(self) -> str:
        return base64.b64encode(self.log.encode()[-LOG_TAIL:]).decode()


class Invoker:
    def __init__(self, shards: list[wire.Addr], key: bytes, code_url: str, margin: float):
        self.client = ClusterClient(shards, key)
        self.code_url = code_url
        self.margin = margin

    async def start(self) -> None:
        await self.client.start()

    async def close(self) -> None:
        await self.client.close()

    def spec(self, c: Call) -> dict:
        fn = {
            "digest": c.digest, "code_url": self.code_url, "runtime": c.runtime,
            "handler": c.handler, "name": c.name, "version": c.version, "tenant": c.tenant,
            "memory_mb": c.memory_mb,
        }  # fmt: skip
        spec = {"function": fn, "timeout": c.timeout, "env": dict(c.env)}
        if c.chain:
            spec["caller"] = dict(c.chain)
        return spec

    async def invoke(self, c: Call, payload: bytes, job_id: bytes | None = None) -> Outcome:
        try:
            jid = await self.client.submit(c.cls, self.spec(c), payload, job_id=job_id)
        except SubmitError as e:
            return Outcome(failure=f"the cluster did not take the invocation: {e}")
        # the cold start and a code pull are the cluster's share of the margin
        try:
            res = await self.client.result(jid, c.timeout + self.margin)
        except TimeoutError:
            self.client.pending.pop(jid, None)
            return Outcome(
                failure=f"no result within the function's timeout ({c.timeout:g} s) plus "
                f"{self.margin:g} s: the node or shard running it may have died"
            )
        return outcome_of(res)

    async def run_event(self, c: Call, payload: bytes, jid: bytes, again: bool) -> Outcome:
        """An Event, run exactly once: submitted detached under its invocation's id, so the
        shard (journaled) arbitrates it and grants it once, and its fate outlives this
        gateway; then asked after by id. ``again``: an earlier claim of it may have
        submitted it already, so ask before submitting (the same id is never run twice)."""
        if again:
            info = await self._ask(jid)
            if info.get("state") == "unknown" and info.get("reason") != NO_SHARD:
                again = False  # no shard holds or remembers it: it never got in
        if not again:
            try:
                await self.client.submit(c.cls, self.spec(c), payload, job_id=jid, wait=False)
            except SubmitError as e:
                return Outcome(failure=f"the cluster did not take the invocation: {e}")
        pause = 0.02
        while True:
            info = await self._ask(jid)
            if info.get("state") == "done":
                return _outcome_of_done(info)
            await asyncio.sleep(pause)  # nothing announces a detached job's end to us
            pause = min(pause * 2, 0.5)

    async def _ask(self, jid: bytes) -> dict:
        try:
            return await self.client.job(jid, timeout=2.0)
        except (TimeoutError, OSError) as e:
            return {"state": "unknown", "reason": NO_SHARD, "error": str(e)}


NO_SHARD = "no shard answered"  # cluster/client.py's word for "cannot tell"


def _outcome_of_done(info: dict) -> Outcome:
    """What a shard knows of a finished job, with what its node remembers of it."""
    res = (info.get("on_node") or {}).get("result") or {}
    status = info.get("status", res.get("status"))
    if "report" in res:
        err = res.get("error")
        return Outcome(
            b"", "Unhandled" if err else None, "", res["report"], str(info.get("node", ""))
        )
    if status == 0:
        return Outcome(b"", None, "", None, str(info.get("node", "")))
    why = res.get("error") or f"status {status}"
    if status == wire.NODE_LOST:
        why = f"the node running it ({info.get('node')}) was lost"
    return Outcome(failure=str(why), node=str(info.get("node", "")))


def outcome_of(res: dict) -> Outcome:
    node = str(res.get("node", ""))
    if "report" not in res:  # refused, or its node lost: it never answered
        status = res.get("status")
        why = res.get("error") or f"status {status}"
        if status == wire.NODE_LOST:
            why = f"the node running it ({node}) was lost"
        return Outcome(failure=str(why), node=node)
    err = res.get("error")
    if err is not None:
        body = json.dumps(
            {k: err[k] for k in ("errorMessage", "errorType", "stackTrace") if k in err}
        )
        return Outcome(body.encode(), "Unhandled", res.get("log", ""), res["report"], node)
    return Outcome(str(res.get("response", "null")).encode(), None, res.get("log", ""),
                   res["report"], node)  # fmt: skip

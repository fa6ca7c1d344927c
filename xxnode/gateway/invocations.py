"""Invoke: RequestResponse (the gateway waits for the result), Event (durably accepted in the
store before the 202, then run by a worker that claims it with a lease) and DryRun.

An accepted event survives a kill -9 of the gateway that took it: it is in the store, and
its lease runs out, so a restarted gateway (or another one sharing the store) claims it and
runs it. One caveat is stated, not hidden: a gateway killed after the node ran the event but
before it marked the event finished leaves it to run again (at least once). The ledger's
exactly-once work (the next issue) keys usage by invocation id."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid

from aiohttp import web

from xxnode import logs, metrics
from xxnode.gateway import arn, errors
from xxnode.gateway.budgets import Budgets
from xxnode.gateway.invoke import Call, Invoker
from xxnode.ledger.store import LATEST, Function, Store
from xxnode.ledger.usage import MAX_DEPTH
from xxnode.policy.budget import DEGRADE, NORMAL, THROTTLE
from xxnode.wire import MAX_PAYLOAD

log = logging.getLogger("xxgate")
POLL_S = 1.0  # events recorded by other gateways (or before a restart) are found this often
LEASE_S = 15.0  # a claimed event's lease, renewed every third of it while it runs


class Invocations:
    def __init__(self, store: Store, cfg, invoker: Invoker, functions, budgets: Budgets):
        self.store, self.cfg, self.invoker, self.functions = store, cfg, invoker, functions
        self.budgets = budgets
        self.classes = cfg.classes
        self.cheapest = min(cfg.classes, key=lambda c: c.price).name
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._default_class: dict[str, str] = {}

    # -- the API ------------------------------------------------------------------------
    async def invoke(self, request: web.Request) -> web.Response:
        owner = await self.functions.owner_of(request)
        name, qualifier = self.functions.function_name_of(request, owner)
        itype = request.headers.get("X-Amz-Invocation-Type", "RequestResponse")
        if itype not in ("RequestResponse", "Event", "DryRun"):
            raise errors.invalid_parameter(
                f"X-Amz-Invocation-Type: {itype[:32]!r} is not RequestResponse, Event or DryRun"
            )
        payload = await _payload(request)
        fn = await self.function_for(request, owner, name, qualifier)
        cls, chain, headers = await self.plan(fn, request.get("caller"))
        if itype == "DryRun":
            return web.Response(status=204, headers=headers)
        if itype == "Event":
            inv = await self.functions.db(
                self.store.record_event, fn.tenant, fn.name, qualifier, cls, payload,
                invocation_id=request["request_id"], context=chain,
            )  # fmt: skip
            self._wake.set()
            return web.Response(status=202, headers=headers | {"x-amzn-RequestId": inv.id})
        # the cluster job's id is the RequestId the caller sees: one id in every daemon's log
        jid = uuid.UUID(request["request_id"]).bytes
        out = await self.run(fn, cls, payload, chain, jid)
        if out.failure is not None:
            raise errors.service_error(out.failure)
        headers["X-Amz-Executed-Version"] = fn.version
        if out.function_error:
            headers["X-Amz-Function-Error"] = out.function_error
        if request.headers.get("X-Amz-Log-Type") == "Tail":
            headers["X-Amz-Log-Result"] = out.log_tail()
        return web.Response(body=out.payload, headers=headers, content_type="application/json")

    async def invoke_async(self, request: web.Request) -> web.Response:
        """The deprecated InvokeAsync: an Event invocation, answered 202 {"Status": 202}."""
        owner = await self.functions.owner_of(request)
        name, qualifier = self.functions.function_name_of(request, owner)
        payload = await _payload(request)
        fn = await self.function_for(request, owner, name, qualifier)
        cls, chain, headers = await self.plan(fn, request.get("caller"))
        await self.functions.db(
            self.store.record_event, fn.tenant, fn.name, qualifier, cls, payload,
            invocation_id=request["request_id"], context=chain,
        )  # fmt: skip
        self._wake.set()
        return web.json_response({"Status": 202}, status=202, headers=headers)

    # -- shared with function URLs ----------------------------------------------------------
    async def class_of(self, fn: Function) -> str:
        """Its `xx:class` tag, else its tenant's default class."""
        if fn.price_class:
            return fn.price_class
        cls = self._default_class.get(fn.tenant)
        if cls is None:
            t = await self.functions.db(self.store.get_tenant, fn.tenant)
            cls = self._default_class[fn.tenant] = t.default_class
        return cls

    def call(self, fn: Function, cls: str, chain: dict | None = None) -> Call:
        return Call(
            tenant=fn.tenant, name=fn.name, version=fn.version, digest=fn.code_digest,
            runtime=fn.runtime, handler=fn.handler, timeout=fn.timeout,
            memory_mb=fn.memory_mb, env=dict(fn.environment), cls=cls, chain=chain,
        )  # fmt: skip

    async def run(
        self, fn: Function, cls: str, payload: bytes, chain: dict | None = None,
        job_id: bytes | None = None,
    ):  # fmt: skip
        """One RequestResponse invocation through the cluster, timed and counted."""
        t0 = time.monotonic()
        out = await self.invoker.invoke(self.call(fn, cls, chain), payload, job_id)
        took = time.monotonic() - t0
        outcome = "failed" if out.failure else "error" if out.function_error else "succeeded"
        metrics.finished("gateway", cls, "function", outcome, took)
        level = logging.DEBUG if outcome == "succeeded" else logging.INFO
        if log.isEnabledFor(level):  # a line per invocation only when asked for
            inv = logs.invocation_id(job_id) if job_id else None
            log.log(level, "invoke %s:%s (%s) for %s: %s in %.1f ms%s", fn.name, fn.version,
                    cls, fn.tenant, outcome, took * 1e3, f": {out.failure}" if out.failure else "",
                    extra=logs.about(invocation=inv, cls=cls, tenant=fn.tenant,
                                     function=fn.name, node=out.node))  # fmt: skip
        return out

    async def function_for(
        self, request: web.Request, owner: str | None, name: str, qualifier: str
    ) -> Function:
        """The caller's own function, or another tenant's that granted the caller's account
        lambda:InvokeFunction (AddPermission). Not granted and not there look the same."""
        tenant = request["tenant"]
        if owner == tenant:
            return await self.functions.current(tenant, name, qualifier)
        denied = errors.access_denied(
            f"User: {arn.account_of(tenant)} is not authorized to perform: "
            f"lambda:InvokeFunction on resource: {request.match_info['name'][:170]}"
        )
        if owner is None:
            raise denied
        try:
            fn = await self.functions.current(owner, name, qualifier)
        except errors.AwsError:
            raise denied from None
        if not self.functions.allows(fn, arn.account_of(tenant)):
            raise denied
        return fn

    async def plan(self, fn: Function, ctx: dict | None) -> tuple[str, dict, dict]:
        """(effective class, the chain the node bills by, response headers): the function's
        class, or the cheapest while its tenant is over its budget's pace (or 429 when far
        over); then, inside a call chain, max(the caller's effective class, that) — paid
        for, above the callee's own price, by whoever's class it inherits."""
        d = await self.budgets.decide(fn.tenant)
        headers = budget_headers(d)
        if d.state == THROTTLE:
            raise errors.too_many_requests(
                d.retry_after, reason="CallerRateLimitExceeded",
                message=f"Rate exceeded: this month's spend is past its budget's pace; "
                f"retry after {d.retry_after:.0f} s",
            )  # fmt: skip
        own = self.cheapest if d.state == DEGRADE else await self.class_of(fn)
        if ctx is None:
            return own, {"payer": fn.tenant, "depth": 0, "own_class": own}, headers
        depth = ctx["depth"] + 1
        if depth > MAX_DEPTH:
            raise errors.recursive(
                f"the call chain is {depth} calls deep: more than {MAX_DEPTH} nested calls "
                "(a recursive loop?) are refused"
            )
        mine, theirs = self.classes.get(own), self.classes.get(ctx["class"])
        payer = ctx.get("payer") or ctx["tenant"]
        if theirs is None or mine is None or theirs.rank <= mine.rank:
            return own, {"payer": fn.tenant, "depth": depth, "own_class": own}, headers
        if payer != fn.tenant and (await self.budgets.decide(payer)).state != NORMAL:
            # the premium would be the payer's, and its budget says no more spend
            return own, {"payer": fn.tenant, "depth": depth, "own_class": own}, headers
        return theirs.name, {"payer": payer, "depth": depth, "own_class": own}, headers

    # -- the event workers ------------------------------------------------------------------
    def start(self) -> None:
        for _ in range(self.cfg.event_workers):
            t = asyncio.ensure_future(self._worker())
            self._tasks.add(t)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _worker(self) -> None:
        while True:
            try:
                claimed = await asyncio.to_thread(
                    self.store.claim_pending_events, 1, self.owner, LEASE_S
                )
            except Exception:
                log.exception("claiming events failed")
                claimed = []
            if not claimed:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), POLL_S)
                except TimeoutError:
                    pass
                continue
            for inv in claimed:
                await self._run_event(inv)

    async def _run_event(self, inv) -> None:
        try:
            fn = await asyncio.to_thread(
                self.store.get_function, inv.tenant, inv.function, inv.qualifier or LATEST
            )
        except Exception as e:  # deleted since: the event fails, named
            await self._finish(inv, "failed", {"error": f"function not found: {e}"})
            return
        try:
            jid = uuid.UUID(inv.id).bytes  # the cluster job's id: one grant, ever
        except ValueError:
            jid = uuid.uuid5(uuid.NAMESPACE_URL, inv.id).bytes
        run = asyncio.ensure_future(
            self.invoker.run_event(self.call(fn, inv.price_class, inv.context),
                                   inv.payload or b"{}", jid, again=inv.attempts > 1)
        )  # fmt: skip
        while not run.done():  # keep the claim while it runs; let go if it passed on
            await asyncio.wait({run}, timeout=LEASE_S / 3)
            if run.done():
                break
            if not await asyncio.to_thread(self.store.renew_lease, inv.id, self.owner, LEASE_S):
                run.cancel()  # another gateway has it now: it asks the cluster, not us
                return
        out = run.result()
        if out.failure is not None:
            await self._finish(inv, "failed", {"error": out.failure})
            return
        status = "failed" if out.function_error else "succeeded"
        result = {"report": out.report, "node": out.node}
        await self._finish(inv, status, result)

    async def _finish(self, inv, status: str, result: dict) -> None:
        try:
            await asyncio.to_thread(
                self.store.finish_invocation, inv.id, status, result, owner=self.owner
            )
        except Exception:
            log.exception("event %s: finishing failed", inv.id)


def budget_headers(d) -> dict[str, str]:
    """What a tenant's invocations are told of its budget (XX's own headers)."""
    out = {}
    if d.state != NORMAL:
        out["X-XX-Budget"] = d.state
    if d.warnings:
        out["X-XX-Budget-Warning"] = f"{max(d.warnings):.0%} of this month's budget spent"
    return out


async def _payload(request: web.Request) -> bytes:
    if (request.content_length or 0) > MAX_PAYLOAD:
        raise errors.too_large()
    payload = await request.read()
    if len(payload) > MAX_PAYLOAD:
        raise errors.too_large()
    if not payload:
        return b"{}"
    try:
        json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.invalid_request_content(
            f"Could not parse request body into json: {e}"
        ) from None
    return payload

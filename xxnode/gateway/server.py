"""xxgate's HTTP server: the routes of Lambda's REST API, each request's SigV4 signature
verified against its tenant's key, every failure shaped as AWS shapes it, and two routes of
XX's own: code by digest for nodes (/xx/code/DIGEST, a cluster-key token) and function URLs
(/xx-url/URL_ID/..., or a Host of URL_ID.lambda-url.REGION.on.aws).

Stateless itself: everything lives in the store, so several gateways can share one."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from datetime import UTC, datetime

from aiohttp import web

from xxnode.cluster import caller, usage_link
from xxnode.cluster import code as code_fetch
from xxnode.gateway import errors, sigv4
from xxnode.gateway.budgets import Budgets
from xxnode.gateway.errors import AwsError, to_response_parts
from xxnode.gateway.functions import Functions
from xxnode.gateway.invocations import Invocations
from xxnode.gateway.urls import FunctionUrls
from xxnode.ledger import usage
from xxnode.ledger.bill import bill_doc
from xxnode.ledger.store import Store
from xxnode.policy.budget import month_of

log = logging.getLogger("xxgate")
MAX_BODY = 72 * 1024 * 1024  # a 50 MiB zip, base64 in JSON
# Request bodies held at once, across all connections (a body is read whole, to check its
# signature): what bounds the gateway's memory under many large uploads. Past it, 429 with
# Retry-After, as Lambda throttles.
BODY_BUDGET = 4 * MAX_BODY
KEY_TTL = 5.0  # seconds a looked-up access key is trusted before it is read again
_AKID = re.compile(r"Credential=([A-Za-z0-9]{1,128})/")


class Keys:
    """Access key id -> (secret, tenant), cached briefly: one store read per key per
    KEY_TTL instead of one per request. A deleted key works at most KEY_TTL longer."""

    def __init__(self, store: Store):
        self.store = store
        self._cache: dict[str, tuple[float, tuple[str, str] | None]] = {}

    async def get(self, akid: str) -> tuple[str, str] | None:
        now = time.monotonic()
        hit = self._cache.get(akid)
        if hit is not None and now - hit[0] < KEY_TTL:
            return hit[1]
        key = await asyncio.to_thread(self.store.get_key, akid)
        value = None if key is None else (key.secret, key.tenant)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[akid] = (now, value)
        return value


class Gateway:
    def __init__(self, store: Store, cfg, invoker, cluster_key: bytes):
        self.store, self.cfg, self.cluster_key = store, cfg, cluster_key
        self.keys = Keys(store)
        self.body_bytes = 0  # request bodies being read or held now (BODY_BUDGET)
        self.functions = Functions(
            store, cfg.classes, cfg.region, cfg.code_url,
            lambda d: f"{cfg.code_url}{code_fetch.PATH}{d}?{code_fetch.link_query(cluster_key, d, time.time())}",
        )  # fmt: skip
        self.budgets = Budgets(store)
        self.invocations = Invocations(store, cfg, invoker, self.functions, self.budgets)
        self.urls = FunctionUrls(store, cfg, self.functions, self.invocations, self.authenticate)

    async def authenticate(self, request: web.Request, body: bytes) -> str:
        """The tenant whose key signed this request, or the AWS error saying why not."""
        m = _AKID.search(request.headers.get("Authorization", ""))
        found = await self.keys.get(m[1]) if m else None  # (secret, tenant): looked up first
        raw_path, _, query = request.raw_path.partition("?")
        sigv4.verify(
            request.method, raw_path, query, request.headers, body,
            lambda k: found[0] if found and k == m[1] else None,
            datetime.now(UTC), region=self.cfg.region,
        )  # fmt: skip
        return found[1]  # verify accepts no key but the one found above

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors, self._auth])
        f, i, u = self.functions, self.invocations, self.urls
        r = app.router
        base = "/2015-03-31/functions"
        r.add_post(base, f.create)
        r.add_get(base, f.list)
        r.add_get(base + "/", f.list)
        r.add_get(base + "/{name}", f.get)
        r.add_delete(base + "/{name}", f.delete)
        r.add_get(base + "/{name}/configuration", f.get_configuration)
        r.add_put(base + "/{name}/configuration", f.update_configuration)
        r.add_put(base + "/{name}/code", f.update_code)
        r.add_post(base + "/{name}/versions", f.publish)
        r.add_get(base + "/{name}/versions", f.list_versions)
        r.add_post(base + "/{name}/policy", f.add_permission)
        r.add_get(base + "/{name}/policy", f.get_policy)
        r.add_delete(base + "/{name}/policy/{sid}", f.remove_permission)
        r.add_post(base + "/{name}/invocations", i.invoke)
        r.add_get("/2020-06-30/functions/{name}/code-signing-config", f.code_signing)
        r.add_post("/2014-11-13/functions/{name}/invoke-async/", i.invoke_async)
        r.add_post("/2017-03-31/tags/{arn}", f.tag)
        r.add_delete("/2017-03-31/tags/{arn}", f.untag)
        r.add_get("/2017-03-31/tags/{arn}", f.list_tags)
        urls = "/2021-10-31/functions/{name}/url"
        r.add_post(urls, u.create)
        r.add_get(urls, u.get)
        r.add_put(urls, u.update)
        r.add_delete(urls, u.delete)
        r.add_get(code_fetch.PATH + "{digest}", self.code)
        r.add_post(usage_link.PATH, self.usage)
        r.add_get("/xx/bill", self.bill)
        r.add_route("*", "/xx-url/{url_id}{tail:(/.*)?}", u.serve)
        return app

    # -- XX's own routes ------------------------------------------------------------------
    async def code(self, request: web.Request) -> web.Response:
        """A zip by digest, for a node of this cluster (its token proves it) or for the
        holder of a link GetFunction gave its tenant (good for 10 minutes)."""
        digest, q, key = request.match_info["digest"], request.query, self.cluster_key
        node = code_fetch.token_ok(key, digest, request.headers.get(code_fetch.HEADER))
        link = code_fetch.link_ok(key, digest, q.get("expires"), q.get("signature"), time.time())
        if not (node or link):
            raise errors.access_denied(
                "code by digest is for the cluster's nodes, or a link from GetFunction"
            )
        data = await asyncio.to_thread(self.store.get_code, digest)
        if data is None:
            raise errors.not_found(f"no code {digest[:80]}")
        return web.Response(body=data, content_type="application/zip")

    async def usage(self, request: web.Request) -> web.Response:
        """Usage records from a node (its cluster-key token over the body proves it): into
        the ledger, once per id; the answer is what the node may forget."""
        if request.content_length is None or request.content_length > usage_link.MAX_BODY:
            raise errors.too_large(f"a usage batch: at most {usage_link.MAX_BODY} bytes, sized")
        body = await request.read()
        if not usage_link.token_ok(self.cluster_key, body, request.headers.get(usage_link.HEADER)):
            raise errors.access_denied("usage records are for the cluster's nodes")
        try:
            records = json.loads(body)["records"]
        except (ValueError, KeyError, TypeError):
            raise errors.invalid_request_content("a JSON object with records") from None
        if not isinstance(records, list) or len(records) > usage_link.MAX_BATCH:
            raise errors.invalid_request_content(
                f"records: a list of at most {usage_link.MAX_BATCH}"
            )
        good, rejected = usage.parse_all(records)  # here, not in the worker: see record_usage
        acked, refused = await asyncio.to_thread(self.store.record_usage, good)
        rejected |= refused
        return web.json_response({"acked": acked, "rejected": rejected})

    async def bill(self, request: web.Request) -> web.Response:
        """GET /xx/bill?month=YYYY-MM: the signing tenant's own bill (XX's extension)."""
        month = request.query.get("month") or month_of(time.time())
        try:
            doc = await asyncio.to_thread(bill_doc, self.store, request["tenant"], month)
        except ValueError as e:
            raise errors.invalid_parameter(str(e)) from None
        return web.json_response(doc)

    # -- middlewares ----------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler):
        """Every failure as AWS shapes it; never a traceback to the client."""
        rid = str(uuid.uuid4())
        request["request_id"] = rid
        try:
            resp = await handler(request)
        except AwsError as e:
            return _aws(e, rid)
        except web.HTTPRequestEntityTooLarge:
            return _aws(
                AwsError("RequestEntityTooLargeException", "Request must be smaller than "
                         f"{MAX_BODY} bytes for the operation"), rid)  # fmt: skip
        except web.HTTPNotFound:
            return _aws(AwsError("UnknownOperationException", "Unknown operation", status=404), rid)
        except web.HTTPMethodNotAllowed:
            return _aws(AwsError("UnknownOperationException", "Unknown operation", status=405), rid)
        except web.HTTPException:
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("request %s %s failed", request.method, request.path)
            return _aws(errors.service_error("the gateway failed to handle the request"), rid)
        resp.headers.setdefault("x-amzn-RequestId", rid)
        return resp

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if (url_id := _url_host(request)) is not None:  # URL_ID.lambda-url.REGION.on.aws
            return await self.urls.serve(request, url_id, request.path)
        if request.path.startswith((code_fetch.PATH, "/xx-url/", usage_link.PATH)):
            return await handler(request)
        size = min(request.content_length or 0, MAX_BODY)
        if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            size = MAX_BODY  # no length given: assume the most it may be
        if self.body_bytes + size > BODY_BUDGET:
            raise errors.too_many_requests(
                1, message="Rate exceeded: too many large requests at once; retry shortly"
            )
        self.body_bytes += size
        try:
            body = await request.read()
            vouched = request.headers.get(caller.HEADER)
            if vouched is not None:  # a handler's call, through its node's Lambda proxy
                try:
                    ctx = caller.verify(self.cluster_key, vouched, time.time())
                except caller.BadCaller as e:
                    raise errors.access_denied(str(e)) from None
                request["tenant"], request["caller"] = ctx["tenant"], ctx
            else:
                request["tenant"] = await self.authenticate(request, body)
            return await handler(request)
        finally:
            self.body_bytes -= size


def _url_host(request: web.Request) -> str | None:
    host = request.headers.get("Host", "")
    url_id, sep, _ = host.partition(".lambda-url.")
    return url_id if sep and url_id else None


def _aws(e: AwsError, rid: str) -> web.Response:
    status, headers, body = to_response_parts(e, rid)
    return web.Response(status=status, headers=headers, body=body)

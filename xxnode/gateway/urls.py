"""Function URLs: CreateFunctionUrlConfig and its kin, and the HTTP requests to a URL. A
request becomes a payload-format-2.0 event (what Lambda's function URLs send); the handler's
answer becomes the HTTP response: {statusCode, headers, body, isBase64Encoded, cookies}, or
any other JSON value as a 200 application/json body, as Lambda infers it. `http`-runtime
functions get the request itself (the node's bridge turns the event back into a request).

A URL is reached at /xx-url/URL_ID/PATH on the gateway, or with a Host header of
URL_ID.lambda-url.REGION.on.aws (Lambda's own form, for a DNS name pointed at a gateway).
AuthType AWS_IAM requires a SigV4 signature of a key of the function's own tenant."""

from __future__ import annotations

import base64
import json
import time
import uuid
from datetime import UTC, datetime

from aiohttp import web

from xxnode.gateway import errors
from xxnode.ledger.store import AUTH_TYPES, FunctionUrl
from xxnode.wire import MAX_PAYLOAD

HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "te",
                        "proxy-connection", "trailer", "content-length"})  # fmt: skip


class FunctionUrls:
    def __init__(self, store, cfg, functions, invocations, authenticate):
        self.store, self.cfg, self.functions = store, cfg, functions
        self.invocations, self.authenticate = invocations, authenticate

    def shape(self, u: FunctionUrl) -> dict:
        return {
            "FunctionUrl": f"{self.cfg.code_url}/xx-url/{u.url_id}/",
            "FunctionArn": self.functions.configuration_arn(u.tenant, u.function, u.qualifier),
            "AuthType": u.auth_type,
            "Cors": u.cors or {},
            "CreationTime": _iso(u.created_at),
            "LastModifiedTime": _iso(u.modified_at),
            "InvokeMode": "BUFFERED",
        }

    # -- the config API ---------------------------------------------------------------------
    async def create(self, request: web.Request) -> web.Response:
        name, q = self.functions.function_name_of(request)
        body = await _body(request)
        auth = _auth_type(body, required=True)
        if body.get("InvokeMode", "BUFFERED") != "BUFFERED":
            raise errors.invalid_parameter("InvokeMode: only BUFFERED (no response streaming)")
        await self.functions.db(self.store.get_function, request["tenant"], name, q)
        u = await self.functions.db(
            self.store.create_url, request["tenant"], name, q, auth_type=auth,
            cors=_cors(body),
        )  # fmt: skip
        return web.json_response(self.shape(u), status=201)

    async def get(self, request: web.Request) -> web.Response:
        name, q = self.functions.function_name_of(request)
        u = await self.functions.db(self.store.get_url, request["tenant"], name, q)
        return web.json_response(self.shape(u))

    async def update(self, request: web.Request) -> web.Response:
        name, q = self.functions.function_name_of(request)
        body = await _body(request)
        auth = _auth_type(body) if "AuthType" in body else None
        u = await self.functions.db(
            self.store.update_url, request["tenant"], name, q, auth_type=auth,
            cors=_cors(body) if "Cors" in body else None,
        )  # fmt: skip
        return web.json_response(self.shape(u))

    async def delete(self, request: web.Request) -> web.Response:
        name, q = self.functions.function_name_of(request)
        await self.functions.db(self.store.delete_url, request["tenant"], name, q)
        return web.Response(status=204)

    # -- requests to a URL ------------------------------------------------------------------
    async def serve(self, request: web.Request, url_id: str | None = None, tail: str | None = None):
        if url_id is None:
            url_id, tail = request.match_info["url_id"], request.match_info.get("tail") or "/"
        u = await self.functions.db(self.store.get_url_by_id, url_id) if len(url_id) <= 64 else None
        if u is None:
            raise errors.not_found("no function URL here")
        body = await request.read()
        if len(body) > MAX_PAYLOAD:
            raise errors.too_large()
        if u.auth_type == "AWS_IAM":
            tenant = await self.authenticate(request, body)
            if tenant != u.tenant:
                raise errors.access_denied("Forbidden")
        fn = await self.functions.current(u.tenant, u.function, u.qualifier)
        cls, chain, _ = await self.invocations.plan(fn, None)  # its budget: degrade or 429
        event = event_of(request, url_id, tail or "/", body, self.cfg.region)
        out = await self.invocations.run(fn, cls, json.dumps(event).encode(), chain)
        if out.failure is not None or out.function_error:
            # Lambda answers a failed function URL invocation with a bare 502
            return web.json_response({"Message": "Internal Server Error"}, status=502)
        return response_of(out.payload)


def event_of(request: web.Request, url_id: str, path: str, body: bytes, region: str) -> dict:
    """Payload format 2.0, as Lambda's function URLs send it."""
    now = time.time()
    headers: dict[str, str] = {}
    for k, v in request.headers.items():
        k = k.lower()
        if k == "cookie":
            continue
        headers[k] = f"{headers[k]},{v}" if k in headers else v
    cookies = [
        c.strip() for h in request.headers.getall("Cookie", []) for c in h.split(";") if c.strip()
    ]
    query: dict[str, str] = {}
    for k, v in request.query.items():
        query[k] = f"{query[k]},{v}" if k in query else v
    try:
        text = body.decode("utf-8")
        is_b64 = False
    except UnicodeDecodeError:
        text, is_b64 = base64.b64encode(body).decode(), True
    peer = request.transport.get_extra_info("peername") if request.transport else None
    event = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": request.query_string,
        "headers": headers,
        "requestContext": {
            "accountId": "anonymous",
            "apiId": url_id,
            "domainName": request.host,
            "domainPrefix": url_id,
            "http": {
                "method": request.method,
                "path": path,
                "protocol": f"HTTP/{request.version.major}.{request.version.minor}",
                "sourceIp": peer[0] if peer else "",
                "userAgent": request.headers.get("User-Agent", ""),
            },
            "requestId": str(uuid.uuid4()),
            "routeKey": "$default",
            "stage": "$default",
            "time": datetime.fromtimestamp(now, UTC).strftime("%d/%b/%Y:%H:%M:%S +0000"),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": is_b64,
    }
    if cookies:
        event["cookies"] = cookies
    if query:
        event["queryStringParameters"] = query
    if body:
        event["body"] = text
    return event


def response_of(payload: bytes) -> web.Response:
    """The handler's answer as HTTP, inferred as Lambda infers it."""
    try:
        r = json.loads(payload)
    except ValueError:
        return web.Response(status=502, text="the function's answer is not JSON")
    if not isinstance(r, dict) or "statusCode" not in r:
        return web.Response(body=payload, content_type="application/json")
    status = r.get("statusCode")
    if not isinstance(status, int) or not 100 <= status <= 599:
        return web.json_response({"Message": "Internal Server Error"}, status=502)
    body = r.get("body") or ""
    if not isinstance(body, str):
        body = json.dumps(body)
    raw = base64.b64decode(body) if r.get("isBase64Encoded") else body.encode()
    resp = web.Response(status=status, body=raw)
    headers = r.get("headers") or {}
    if isinstance(headers, dict):
        for k, v in headers.items():
            if isinstance(k, str) and k.lower() not in HOP_BY_HOP:
                resp.headers[k] = str(v)
    if "Content-Type" not in resp.headers:
        resp.headers["Content-Type"] = "application/json"
    for c in r.get("cookies") or []:
        if isinstance(c, str):
            resp.headers.add("Set-Cookie", c)
    return resp


async def _body(request: web.Request) -> dict:
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        raise errors.invalid_parameter("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise errors.invalid_parameter("the request body is not a JSON object")
    return body


def _auth_type(body: dict, required: bool = False) -> str:
    a = body.get("AuthType")
    if a is None and not required:
        return "NONE"
    if a not in AUTH_TYPES:
        raise errors.invalid_parameter(f"AuthType: one of {', '.join(AUTH_TYPES)}")
    return a


def _cors(body: dict) -> dict:
    c = body.get("Cors") or {}
    if not isinstance(c, dict):
        raise errors.invalid_parameter("Cors: an object")
    return c


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

"""The `http` runtime (Knative's container contract, OpenFaaS of-watchdog's http mode): the
function is an HTTP/1.1 server on $PORT, and an invocation is forwarded to it as a request.

The bridge is the environment's runtime, living in the node: it parks in "next" like a
Lambda runtime would, forwards each event it is handed as an HTTP request over one
keep-alive connection, and posts the HTTP response back as the invocation's answer — so the
environment's life (environment.py) is the same state machine for every runtime.

Event → request: a function-URL event (payload format 2.0: `requestContext.http`) becomes
that request (method, rawPath?rawQueryString, headers, body); any other event is POSTed to
`/` as JSON. Response → answer: `{statusCode, headers, body, isBase64Encoded}`, as a function
URL's handler returns it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import time

import httptools

log = logging.getLogger("xxnode")

READY_POLL_S = 0.002  # a TCP connect probe, as Knative's queue-proxy does: no event exists


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_of(event: bytes) -> tuple[str, str, list[tuple[str, str]], bytes]:
    try:
        doc = json.loads(event)
    except ValueError:
        doc = None
    http = doc.get("requestContext", {}).get("http") if isinstance(doc, dict) else None
    if not isinstance(http, dict):
        return "POST", "/", [("Content-Type", "application/json")], event
    path = str(doc.get("rawPath") or http.get("path") or "/")
    if doc.get("rawQueryString"):
        path += "?" + str(doc["rawQueryString"])
    headers = [(str(k), str(v)) for k, v in (doc.get("headers") or {}).items()]
    if doc.get("cookies"):
        headers.append(("Cookie", "; ".join(map(str, doc["cookies"]))))
    body = doc.get("body") or ""
    raw = base64.b64decode(body) if doc.get("isBase64Encoded") else str(body).encode()
    return str(http.get("method") or "GET").upper(), path, headers, raw


class _Response:
    """httptools callbacks for one response."""

    def __init__(self, limit: int):
        self.limit = limit
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.done = False
        self.too_large = False

    def on_header(self, name: bytes, value: bytes):
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes):
        if len(self.body) + len(body) > self.limit:
            self.too_large = True
        else:
            self.body += body

    def on_message_complete(self):
        self.done = True


class HttpBridge:
    def __init__(self, env, port: int, limit: int, ready_timeout: float):
        self.env, self.port, self.limit = env, port, limit
        self.ready_timeout = ready_timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task = asyncio.ensure_future(self._wait_ready())

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while self.env.state != "dead":
            try:
                await self._connect()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.env.init_error(
                        json.dumps(
                            {"errorMessage": f"nothing listens on $PORT ({self.port})"}
                        ).encode(),
                        "Runtime.HttpNotReady",
                    )
                    self.env.kill("http runtime never listened")
                    return
                await asyncio.sleep(READY_POLL_S)
        else:
            return
        self.env.next(self._forward)

    def _forward(self, headers: dict[str, str], event: bytes) -> None:
        self.task = asyncio.ensure_future(
            self._exchange(headers["Lambda-Runtime-Aws-Request-Id"], event)
        )

    async def _exchange(self, rid: str, event: bytes) -> None:
        method, path, headers, body = request_of(event)
        head = [f"{method} {path} HTTP/1.1", "Host: localhost", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers if k.lower() not in ("host", "content-length")]
        try:
            if self.writer is None or self.writer.is_closing():
                await self._connect()
            self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            resp = _Response(self.limit)
            parser = httptools.HttpResponseParser(resp)
            while not resp.done:
                data = await self.reader.read(1 << 16)
                if not data:
                    raise ConnectionResetError("the function closed the connection")
                parser.feed_data(data)
            resp.status = parser.get_status_code()
            if not parser.should_keep_alive():
                self.writer.close()
        except (OSError, httptools.HttpParserError) as e:
            if self.env.state != "dead":
                self.env.error(
                    rid,
                    json.dumps({"errorMessage": f"http runtime: {e}"}).encode(),
                    "Runtime.HttpError",
                )
            return
        if resp.too_large:
            self.env.error(
                rid,
                json.dumps({"errorMessage": f"response over {self.limit} bytes"}).encode(),
                "Function.ResponseSizeTooLarge",
            )
        else:
            self.env.response(rid, json.dumps(_answer(resp)).encode(), "application/json")
        if self.env.state != "dead":
            self.env.next(self._forward)

    def close(self) -> None:
        self.task.cancel()
        if self.writer is not None:
            self.writer.close()


def _answer(resp: _Response) -> dict:
    body = bytes(resp.body)
    try:
        text, b64 = body.decode(), False
    except UnicodeDecodeError:
        text, b64 = base64.b64encode(body).decode(), True
    cookies = [v for k, v in resp.headers if k.lower() == "set-cookie"]
    headers = {
        k.lower(): v
        for k, v in resp.headers
        if k.lower()
        not in ("set-cookie", "content-length", "connection", "keep-alive", "transfer-encoding")
    }
    out = {"statusCode": resp.status, "headers": headers, "body": text, "isBase64Encoded": b64}
    if cookies:
        out["cookies"] = cookies
    return out

"""The Lambda Runtime API (FAAS-REFERENCE.md §1), served to every environment on one loopback
listener.

Who is asking: awslambdaric speaks TCP host:port, so SO_PEERCRED is no option. Each
environment runs under a uid of its own, and at accept() the kernel tells us which uid owns
the peer socket (sock_diag); a connection belongs to that uid's environment for its life,
and one from any other process gets 403 to everything. Within an environment, a response for
a request id that is not its current invocation's is refused (403), as Lambda does.

The HTTP layer is httptools (uvicorn's parser) over a bare asyncio.Protocol: the warm round
trip is the product, and a framework's per-request machinery would be most of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from collections.abc import Callable
from typing import Protocol

import httptools

from xxnode.kernel.sock_diag import PeerLookup

log = logging.getLogger("xxnode")

PREFIX = b"/2018-06-01/runtime/"
INVOCATION_RE = re.compile(rb"invocation/([A-Za-z0-9._:-]{1,128})/(response|error)")
MAX_HEADERS_BYTES = 64 << 10


class Runtime(Protocol):
    """What an environment offers its HTTP surface (environment.Environment)."""

    response_limit: int

    def next(self, reply: Callable[[dict[str, str], bytes], None]) -> None: ...
    def response(self, request_id: str, body: bytes, content_type: str) -> tuple[int, dict]: ...
    def error(self, request_id: str, body: bytes, error_type: str) -> tuple[int, dict]: ...
    def init_error(self, body: bytes, error_type: str) -> tuple[int, dict]: ...
    def disconnected(self) -> None: ...


def _status_line(code: int) -> bytes:
    return {
        200: b"HTTP/1.1 200 OK\r\n",
        202: b"HTTP/1.1 202 Accepted\r\n",
        400: b"HTTP/1.1 400 Bad Request\r\n",
        403: b"HTTP/1.1 403 Forbidden\r\n",
        404: b"HTTP/1.1 404 Not Found\r\n",
        405: b"HTTP/1.1 405 Method Not Allowed\r\n",
        413: b"HTTP/1.1 413 Payload Too Large\r\n",
        500: b"HTTP/1.1 500 Internal Server Error\r\n",
    }[code]


def _error(code: int, etype: str, msg: str) -> tuple[int, dict]:
    return code, {"errorType": etype, "errorMessage": msg}


class _Conn(asyncio.Protocol):
    """One connection from one environment's process; requests are served in order."""

    def __init__(self, api: RuntimeApi):
        self.api = api
        self.env: Runtime | None = None
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.too_large = False
        self.waiting = False  # a GET /next is parked: nothing else is read meanwhile

    # -- asyncio -----------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.env = self.api.owner_of(sock.getsockname(), sock.getpeername())
        if self.env is None:
            self.api.strangers += 1

    def data_received(self, data: bytes):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._send(*_error(400, "InvalidRequest", "upgrade not supported"), close=True)
        except httptools.HttpParserError:
            self.api.malformed += 1
            self._send(*_error(400, "InvalidRequest", "malformed HTTP"), close=True)

    def connection_lost(self, exc):
        self.transport = None
        if self.waiting and self.env is not None:
            self.env.disconnected()

    # -- httptools callbacks -------------------------------------------------------------
    def on_message_begin(self):
        self.url, self.headers, self.body, self.size, self.too_large = b"", {}, [], 0, False

    def on_url(self, url: bytes):
        self.url += url

    def on_header(self, name: bytes, value: bytes):
        self.headers[name.lower()] = value

    def on_body(self, body: bytes):
        self.size += len(body)
        limit = self.env.response_limit if self.env is not None else 0
        if self.size > limit:
            self.too_large = True  # keep reading (the client sends it all), keep nothing
            self.body = []
        else:
            self.body.append(body)

    def on_message_complete(self):
        if self.env is None:
            self._send(*_error(403, "AccessDeniedException", "not an XX execution environment"))
            return
        method = self.parser.get_method()
        url = self.url.split(b"?", 1)[0]
        if not url.startswith(PREFIX):
            self._send(*_error(404, "InvalidRequest", "no such Runtime API path"))
            return
        path = url[len(PREFIX) :]
        if path == b"invocation/next":
            if method != b"GET":
                self._send(*_error(405, "InvalidRequest", "GET only"))
                return
            self.waiting = True
            self.transport.pause_reading()
            self.env.next(self._send_event)
            return
        if method != b"POST":
            self._send(*_error(405, "InvalidRequest", "POST only"))
            return
        if self.too_large:
            self._send(
                *_error(413, "RequestEntityTooLarge", f"over {self.env.response_limit} bytes")
            )
            self.env.error(
                (m.group(1).decode() if (m := INVOCATION_RE.fullmatch(path)) else ""),
                json.dumps(
                    {
                        "errorType": "Function.ResponseSizeTooLarge",
                        "errorMessage": f"Response payload size ({self.size} bytes) exceeded "
                        f"maximum allowed payload size ({self.env.response_limit} bytes).",
                    }
                ).encode(),
                "Function.ResponseSizeTooLarge",
            )
            return
        body = b"".join(self.body)
        etype = self.headers.get(b"lambda-runtime-function-error-type", b"").decode("latin-1")
        if path == b"init/error":
            self._send(*self.env.init_error(body, etype))
            return
        m = INVOCATION_RE.fullmatch(path)
        if m is None:
            self._send(*_error(404, "InvalidRequest", "no such Runtime API path"))
            return
        rid, what = m.group(1).decode(), m.group(2)
        if what == b"response":
            ctype = self.headers.get(b"content-type", b"application/json").decode("latin-1")
            self._send(*self.env.response(rid, body, ctype))
        else:
            self._send(*self.env.error(rid, body, etype))

    # -- replies -----------------------------------------------------------------------
    def _send_event(self, headers: dict[str, str], body: bytes) -> None:
        self.waiting = False
        if self.transport is None:
            return
        head = [b"HTTP/1.1 200 OK\r\n"]
        for k, v in headers.items():
            head.append(f"{k}: {v}\r\n".encode("latin-1"))
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self.transport.resume_reading()

    def _send(self, code: int, doc: dict, close: bool = False) -> None:
        if self.transport is None:
            return
        body = json.dumps(doc).encode() if code >= 400 else b'{"status":"OK"}'
        self.transport.write(
            _status_line(code)
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        if close or code in (400,):
            self.transport.close()


class RuntimeApi:
    """The listener; `owner` maps a peer uid to its environment (or None: a stranger)."""

    def __init__(self, owner: Callable[[int], Runtime | None], host: str = "127.0.0.1"):
        self.owner = owner
        self.host = host
        self.port = 0
        self.lookup = PeerLookup()
        self.server: asyncio.base_events.Server | None = None
        self.strangers = 0  # connections from no environment: refused
        self.malformed = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self, port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Conn(self), self.host, port, backlog=512)
        self.port = self.server.sockets[0].getsockname()[1]

    def owner_of(self, local, peer) -> Runtime | None:
        found = self.lookup.owner(local[:2], peer[:2])
        return None if found is None else self.owner(found[0])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.lookup.close()

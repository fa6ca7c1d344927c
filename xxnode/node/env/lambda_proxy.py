"""The Lambda API as a handler reaches it: AWS_ENDPOINT_URL_LAMBDA in every environment points
here, and each call goes on to the gateway of the caller's current invocation with the
caller's context vouched for by this node (cluster/caller.py): class inheritance along call
chains, without a priority inversion and without trusting the handler.

Who is calling is the peer socket's uid (sock_diag, as at the Runtime API): one uid per
environment. The credentials in the environment only satisfy the SDK's signer; they open
nothing anywhere else. Any X-XX-* header the handler sends is dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web

from xxnode.cluster import caller

log = logging.getLogger("xxnode")
MAX_BODY = 7 << 20  # Invoke's 6 MiB payload, and room for the rest
TIMEOUT_S = 900.0  # Lambda's longest function timeout: a synchronous callee may take that
_DROP = {"host", "content-length", "transfer-encoding", "connection", "authorization"}
_KEEP_BACK = ("content-type", "x-amzn-", "x-amz-", "retry-after", "x-xx-")


class LambdaProxy:
    def __init__(self, owner_of: Callable, key: bytes, host: str = "127.0.0.1"):
        self.owner_of = owner_of  # (local, peer) -> the calling Environment, or None
        self.key = key
        self.host, self.port = host, 0
        self.runner: web.AppRunner | None = None
        self.session: aiohttp.ClientSession | None = None
        self.stats = {"calls": 0, "strangers": 0, "no_gateway": 0, "failed": 0}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, 0, backlog=256)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=TIMEOUT_S), auto_decompress=False
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.runner is not None:
            await self.runner.cleanup()

    async def forward(self, request: web.Request) -> web.Response:
        t = request.transport
        env = None
        if t is not None:
            env = self.owner_of(t.get_extra_info("sockname"), t.get_extra_info("peername"))
        if env is None:
            self.stats["strangers"] += 1
            return _error(403, "AccessDeniedException", "only a function's environment calls here")
        inv = env.current or env.last
        chain = (inv.caller if inv is not None else None) or {}
        gateway = chain.get("gateway")
        if inv is None or not gateway:
            self.stats["no_gateway"] += 1
            return _error(503, "ServiceException",
                          "this invocation came from no gateway: no Lambda API to call")  # fmt: skip
        ctx = {
            "tenant": env.fn.tenant, "class": inv.cls, "depth": int(chain.get("depth", 0)),
            "payer": chain.get("payer") or env.fn.tenant, "invocation": inv.request_id,
        }  # fmt: skip
        headers = {
            k: v for k, v in request.headers.items()
            if k.lower() not in _DROP and not k.lower().startswith("x-xx-")
        }  # fmt: skip
        headers[caller.HEADER] = caller.vouch(self.key, ctx, time.time())
        body = await request.read()
        self.stats["calls"] += 1
        try:
            async with self.session.request(
                request.method, gateway.rstrip("/") + str(request.rel_url), headers=headers,
                data=body,
            ) as r:  # fmt: skip
                data = await r.read()
                back = {
                    k: v for k, v in r.headers.items() if k.lower().startswith(_KEEP_BACK)
                }  # fmt: skip
                return web.Response(status=r.status, body=data, headers=back)
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            self.stats["failed"] += 1
            return _error(502, "ServiceException", f"the gateway did not answer: {e}")


def _error(status: int, etype: str, msg: str) -> web.Response:
    return web.json_response(
        {"Type": "User" if status < 500 else "Service", "message": msg},
        status=status, headers={"x-amzn-ErrorType": etype},
    )  # fmt: skip

"""Client side of the control socket (xxctl, tests, benchmarks)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

ENV_SOCKET = "XX_NODE_SOCKET"
DEFAULT_SOCKET = "/run/xxnode.sock"


def socket_path(arg: str | None = None) -> Path:
    return Path(arg or os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET)


class DaemonError(Exception):
    """The daemon refused the request; the message is its reason."""


class Client:
    def __init__(self, path: str | Path | None = None, timeout: float | None = 30.0):
        self.path = socket_path(str(path) if path else None)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except FileNotFoundError:
            self.sock.close()
            raise FileNotFoundError(
                f"no xxnode socket at {self.path} (is xxnode running?)"
            ) from None
        except ConnectionRefusedError:
            self.sock.close()
            raise ConnectionRefusedError(f"xxnode is not answering on {self.path}") from None
        self.f = self.sock.makefile("rb")

    def send(self, req: dict) -> None:
        self.sock.sendall((json.dumps(req) + "\n").encode())

    def recv(self, timeout: float | None = -1) -> dict:
        if timeout != -1:
            self.sock.settimeout(timeout)
        line = self.f.readline()
        if not line:
            raise ConnectionResetError(f"xxnode closed the connection on {self.path}")
        return json.loads(line)

    def call(self, req: dict) -> dict:
        self.send(req)
        reply = self.recv()
        if not reply.get("ok"):
            raise DaemonError(reply.get("error", "request failed"))
        return reply

    def close(self) -> None:
        self.f.close()
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def call_async(req: dict, path: str | Path | None = None, replies: int = 1) -> list[dict]:
    """The same protocol from an event loop: send one request, read `replies` lines. Each
    call has its own connection, so a long-running job never holds up a short one."""
    import asyncio

    reader, writer = await asyncio.open_unix_connection(
        str(socket_path(str(path) if path else None))
    )
    try:
        writer.write((json.dumps(req) + "\n").encode())
        await writer.drain()
        out = []
        for _ in range(replies):
            line = await reader.readline()
            if not line:
                raise DaemonError("xxnode closed the connection")
            msg = json.loads(line)
            out.append(msg)
            if not msg.get("ok", True):
                break
        return out
    finally:
        writer.close()

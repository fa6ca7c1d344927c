"""The control socket: a Unix stream socket, root-only (0600, peer uid checked), one JSON
object per line each way.

Requests (op): status | classes | jobs {class?, limit?} | run {class, argv, env?, cwd?, stdin?
(base64), timeout?, wait?} | wait {job} | kill {job} | output {job, stream, limit?} |
fn_run {code, runtime, handler, class, payload? (base64), timeout?, name?, env?} | fn_envs |
fn_logs {ref: request id or function name}.
Every reply has "ok"; refusals carry "error". `run` replies once when the job is accepted
(durably journaled) and, with wait, again with {"event": "finished", "result": ...}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct

from xxnode.node.daemon import Node
from xxnode.node.env import local as fn_local
from xxnode.node.jobs import SpecError

log = logging.getLogger("xxnode")
MAX_REQUEST = 16 << 20  # a 6 MiB function payload, base64'd, fits


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return struct.unpack("3i", creds)[1]


class Api:
    def __init__(self, node: Node, on_ready=None):
        self.node = node
        self.on_ready = on_ready

    async def serve(self) -> None:
        path = self.node.cfg.socket
        _claim_socket_path(path)
        old = os.umask(0o177)  # born 0600: no window in which others could connect
        try:
            server = await asyncio.start_unix_server(
                self._client, path=str(path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        log.info("listening on %s", path)
        if self.on_ready:
            self.on_ready()
        try:
            async with server:
                await server.serve_forever()
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = _peer_uid(writer)
        try:
            if uid not in (0, os.getuid()):
                await self._send(writer, {"ok": False, "error": "permission denied"})
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._send(writer, {"ok": False, "error": "request too large"})
                    return
                if not line:
                    return
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError
                except ValueError:
                    await self._send(writer, {"ok": False, "error": "request is not a JSON object"})
                    continue
                await self._handle(req, writer)
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, msg: dict) -> None:
        writer.write((json.dumps(msg) + "\n").encode())
        await writer.drain()

    async def _handle(self, req: dict, writer: asyncio.StreamWriter) -> None:
        node, op = self.node, req.get("op")
        if op == "status":
            await self._send(writer, {"ok": True, "status": node.status()})
        elif op == "classes":
            await self._send(writer, {"ok": True, "classes": node.classes_info()})
        elif op == "memory":
            await self._send(writer, {"ok": True, "memory": node.memory_snapshot()})
        elif op == "jobs":
            limit = req.get("limit", 100)
            await self._send(
                writer,
                {
                    "ok": True,
                    "jobs": node.list_jobs(
                        req.get("class"), limit if isinstance(limit, int) else 100
                    ),
                },
            )
        elif op == "run":
            try:
                job = node.submit(req)
            except SpecError as e:
                await self._send(writer, {"ok": False, "error": f"job refused: {e}"})
                return
            await self._send(
                writer,
                {
                    "ok": True,
                    "event": "accepted",
                    "job": job.id,
                    "class": job.cls,
                    "state": job.state,
                    "pid": job.pid,
                },
            )
            if req.get("wait"):
                await self._finish(job.id, writer, req)
        elif op == "wait":
            await self._finish(str(req.get("job")), writer, req)
        elif op == "kill":
            await self._send(writer, node.kill(str(req.get("job"))))
        elif op == "output":
            jid, stream = str(req.get("job")), req.get("stream")
            if stream not in ("stdout", "stderr"):
                await self._send(writer, {"ok": False, "error": "stream: stdout or stderr"})
                return
            limit = req.get("limit", node.cfg.output_limit)
            await self._send(
                writer, {"ok": True, "data": node.read_output(jid, stream, int(limit))}
            )
        elif op == "fn_run":
            await self._send(writer, await fn_local.fn_run(node.functions, req))
        elif op == "fn_envs":
            envs = node.functions.list_envs() if node.functions else []
            await self._send(writer, {"ok": True, "envs": envs})
        elif op == "fn_logs":
            found = node.functions.logs(str(req.get("ref"))) if node.functions else []
            await self._send(writer, {"ok": True, "invocations": found})
        else:
            await self._send(writer, {"ok": False, "error": f"unknown op {op!r}"})

    async def _finish(self, jid: str, writer: asyncio.StreamWriter, req: dict) -> None:
        res = await self.node.wait(jid)
        if res is None:
            await self._send(writer, {"ok": False, "error": f"no such job {jid}"})
            return
        msg = {"ok": True, "event": "finished", "result": res}
        if req.get("output", True):
            lim = self.node.cfg.output_limit
            msg["stdout"] = self.node.read_output(jid, "stdout", lim)
            msg["stderr"] = self.node.read_output(jid, "stderr", lim)
        await self._send(writer, msg)


def _claim_socket_path(path) -> None:
    """Remove a stale socket; refuse if a live daemon answers on it."""
    if not os.path.exists(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        os.unlink(path)
        return
    finally:
        s.close()
    raise RuntimeError(f"another daemon is listening on {path}")

"""The local API's function requests (xxctl fn ...): a function version from a request, run
once on this node's warm pool. Every refusal is one line naming the field."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Awaitable, Callable
from pathlib import Path

from xxnode.cluster.code import DIGEST_RE, FetchError
from xxnode.node.env.code import CodeError
from xxnode.node.env.function import FunctionError, FunctionVersion
from xxnode.node.env.pool import Pool

LOCAL_TENANT = "local"


class RequestError(ValueError):
    pass


async def function_of(
    pool: Pool, req: dict, fetch: Callable[[str], Awaitable[bytes]] | None = None
) -> FunctionVersion:
    """The function version a request names. Its code is a path on the node, or a digest
    that ``fetch`` brings from the cluster's store the first time. It is zipped, hashed
    and (the first time) unpacked in a worker thread: up to 250 MiB must not stall the
    node's loop."""
    code, digest = req.get("code"), req.get("digest")
    if digest is not None:
        digest = await _by_digest(pool, digest, fetch)
        default_name = "function"
    else:
        if not isinstance(code, str) or not code:
            raise RequestError("code: a directory or a .zip file on the node")
        path = Path(code)
        if not path.exists():
            raise RequestError(f"code: no such file or directory {code}")
        try:
            digest = await asyncio.to_thread(pool.register_code, path)
        except CodeError as e:
            raise RequestError(f"code: {e}") from None
        default_name = path.name.removesuffix(".zip") or "function"
    env = req.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise RequestError("env: an object of strings")
    cls = req.get("class")
    if pool.classes.get(cls) is None:
        raise RequestError(f"class: no such class {cls!r} (have {', '.join(pool.classes.names())})")
    try:
        return FunctionVersion(
            tenant=str(req.get("tenant") or LOCAL_TENANT),
            name=str(req.get("name") or default_name),
            version=str(req.get("version") or "$LATEST"),
            digest=digest,
            runtime=str(req.get("runtime") or ""),
            handler=str(req.get("handler") or ""),
            timeout=float(req.get("timeout") or 3.0),
            cls=cls,
            memory_mb=int(req.get("memory_mb") or 128),
            env=tuple(sorted(env.items())),
        )
    except (FunctionError, TypeError, ValueError) as e:
        raise RequestError(str(e)) from None


async def _by_digest(pool: Pool, digest: object, fetch) -> str:
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise RequestError("digest: sha256:<64 hex digits>")
    if pool.code.has(digest):
        return digest
    if fetch is None:
        raise RequestError(f"digest: code {digest} is not on this node")
    try:
        data = await fetch(digest)
        got = await asyncio.to_thread(pool.register_code, data)
    except (FetchError, CodeError) as e:
        raise RequestError(f"code: {e}") from None
    if got != digest:  # fetch checks it too: a store that lies must not get this far
        raise RequestError(f"code: the store's bytes are {got}, not {digest}")
    return digest


def payload_of(req: dict, limit: int) -> bytes:
    raw = req.get("payload", "")
    try:
        data = base64.b64decode(raw, validate=True) if raw else b"{}"
    except (binascii.Error, TypeError):
        raise RequestError("payload: base64") from None
    if len(data) > limit:
        raise RequestError(f"payload: {len(data)} bytes, the limit is {limit}")
    return data


async def fn_run(pool: Pool | None, req: dict) -> dict:
    if pool is None:
        return {"ok": False, "error": "functions are not available on this node (see xxctl status)"}
    try:
        fn = await function_of(pool, req)
        payload = payload_of(req, pool.cfg.response_limit)
    except RequestError as e:
        return {"ok": False, "error": str(e)}
    result = await pool.invoke(fn, payload, req["class"])
    return {"ok": True, "result": result}

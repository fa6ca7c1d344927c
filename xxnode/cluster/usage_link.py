"""Usage records from a node to the ledger (any gateway: they share the store).

A batch is one POST of JSON to PATH, signed with the cluster key over its bytes, so only the
cluster's nodes can put usage in a tenant's bill. The answer names the ids the ledger now
holds (a resent one among them) and those it refused, with why.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import aiohttp

PATH = "/xx/usage"
HEADER = "X-XX-Usage-Token"
MAX_BATCH = 500  # records per POST
MAX_BODY = 4 << 20


class SendError(Exception):
    """The batch did not reach the ledger; str(e) says where and why."""


def token(key: bytes, body: bytes) -> str:
    return hmac.new(key, b"xx-usage\0" + hashlib.sha256(body).digest(), hashlib.sha256).hexdigest()


def token_ok(key: bytes, body: bytes, shown: str | None) -> bool:
    return shown is not None and hmac.compare_digest(token(key, body), shown)


async def send(
    session, base_url: str, key: bytes, node: str, records: list[dict], timeout: float = 10.0
):
    """(acked ids, {id: why refused}). On the caller's event loop (an aiohttp session): a
    sender thread would take the GIL from the loop in 5 ms slices, and each slice is a stall
    of every invocation on the node."""
    body = json.dumps({"node": node, "records": records}).encode()
    headers = {HEADER: token(key, body), "Content-Type": "application/json"}
    try:
        async with session.post(base_url.rstrip("/") + PATH, data=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as r:  # fmt: skip
            if r.status != 200:
                raise SendError(f"usage to {base_url}: HTTP {r.status} {r.reason}")
            doc = json.loads(await r.content.read(MAX_BODY))
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
        raise SendError(f"usage to {base_url}: {e or type(e).__name__}") from None
    acked, rejected = doc.get("acked"), doc.get("rejected")
    if not isinstance(acked, list) or not isinstance(rejected, dict):
        raise SendError(f"usage to {base_url}: an answer without acked and rejected")
    return [str(a) for a in acked], {str(k): str(v) for k, v in rejected.items()}

"""Usage records from a node to the ledger (any gateway: they share the store).

A batch is one POST of JSON to PATH, signed with the cluster key over its bytes, so only the
cluster's nodes can put usage in a tenant's bill. The answer names the ids the ledger now
holds (a resent one among them) and those it refused, with why.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.error
import urllib.request

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


def send(base_url: str, key: bytes, node: str, records: list[dict], timeout: float = 10.0):
    """(acked ids, {id: why refused}). Blocking: call it from a worker thread."""
    body = json.dumps({"node": node, "records": records}).encode()
    req = urllib.request.Request(
        base_url.rstrip("/") + PATH, data=body, method="POST",
        headers={HEADER: token(key, body), "Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            doc = json.loads(r.read(MAX_BODY))
    except urllib.error.HTTPError as e:
        raise SendError(f"usage to {base_url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise SendError(f"usage to {base_url}: {getattr(e, 'reason', e)}") from None
    acked, rejected = doc.get("acked"), doc.get("rejected")
    if not isinstance(acked, list) or not isinstance(rejected, dict):
        raise SendError(f"usage to {base_url}: an answer without acked and rejected")
    return [str(a) for a in acked], {str(k): str(v) for k, v in rejected.items()}

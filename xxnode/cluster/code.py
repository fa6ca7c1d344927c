"""Function code by digest, from the cluster's code store (a gateway) to a node.

A node pulls a zip over HTTP the first time an invocation needs it. It proves it belongs to
the cluster with a token made from the cluster key, so the store serves code only to
nodes. It checks the bytes against the digest it was given, so the store cannot hand it
other code. Then it unpacks the zip like any other (node/env/code.py).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import urllib.error
import urllib.request

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
HEADER = "X-XX-Code-Token"
PATH = "/xx/code/"  # the store's route: PATH + digest


class FetchError(Exception):
    """The code could not be had; str(e) says from where and why."""


def token(key: bytes, digest: str) -> str:
    """What a node shows for one digest. It is bound to the digest, so a token seen on the
    wire opens nothing else."""
    return hmac.new(key, b"xx-code\0" + digest.encode(), hashlib.sha256).hexdigest()


def token_ok(key: bytes, digest: str, shown: str | None) -> bool:
    return shown is not None and hmac.compare_digest(token(key, digest), shown)


LINK_S = 600  # a download link's life, as Lambda's presigned Code.Location (10 minutes)


def link_query(key: bytes, digest: str, now: float) -> str:
    """The query of a link that lets its holder download one zip until it expires: what
    GetFunction hands a tenant for its own function's code."""
    expires = int(now) + LINK_S
    sig = hmac.new(key, f"xx-link\0{digest}\0{expires}".encode(), hashlib.sha256).hexdigest()
    return f"expires={expires}&signature={sig}"


def link_ok(key: bytes, digest: str, expires: str | None, sig: str | None, now: float) -> bool:
    if not expires or not sig or not expires.isdigit() or int(expires) < now:
        return False
    want = hmac.new(key, f"xx-link\0{digest}\0{expires}".encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, sig)


def fetch(base_url: str, digest: str, key: bytes, limit: int, timeout: float = 60.0) -> bytes:
    """The zip's bytes, checked against ``digest``. Blocking: call it from a worker thread."""
    if not DIGEST_RE.match(digest):
        raise FetchError(f"{digest!r} is not a code digest (sha256:<64 hex>)")
    url = base_url.rstrip("/") + PATH + digest
    req = urllib.request.Request(url, headers={HEADER: token(key, digest)})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read(limit + 1)
    except urllib.error.HTTPError as e:
        raise FetchError(f"code {digest} from {base_url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        why = getattr(e, "reason", e)
        raise FetchError(f"code {digest} from {base_url}: {why}") from None
    if len(data) > limit:
        raise FetchError(f"code {digest} from {base_url}: more than {limit} bytes")
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise FetchError(f"code {digest} from {base_url}: the bytes do not match the digest")
    return data

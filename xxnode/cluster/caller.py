"""The caller's context along a call chain, as a node vouches for it to a gateway.

A handler calls Lambda through its node (AWS_ENDPOINT_URL_LAMBDA is the node's Lambda proxy).
The node knows which environment is calling — by the peer socket's uid, each environment's
own — and that environment's current invocation: its tenant, its effective class and the
chain's depth. It forwards the call with that context signed with the cluster key. So the
context is unforgeable: a handler never holds the key (the state dir is hidden from it), the
proxy drops any X-XX-* header it sent, and a header made up or replayed past its short life
is refused by the gateway.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

HEADER = "X-XX-Caller"
LIFE_S = 30.0  # a vouched context is good this long: one call's way to the gateway


class BadCaller(Exception):
    """The context is not the cluster's, or too old; str(e) says which."""


def _mac(key: bytes, body: bytes) -> str:
    return hmac.new(key, b"xx-caller\0" + body, hashlib.sha256).hexdigest()


def vouch(key: bytes, ctx: dict, now: float) -> str:
    """ctx: {tenant, class, depth, invocation}; the header's value."""
    body = base64.urlsafe_b64encode(
        json.dumps(ctx | {"exp": now + LIFE_S}, sort_keys=True).encode()
    )
    return f"{body.decode()}.{_mac(key, body)}"


def verify(key: bytes, value: str, now: float) -> dict:
    body, _, mac = value.encode().partition(b".")
    if not hmac.compare_digest(_mac(key, body), mac.decode(errors="replace")):
        raise BadCaller("the caller's context is not signed by this cluster")
    try:
        ctx = json.loads(base64.urlsafe_b64decode(body))
    except ValueError:
        raise BadCaller("the caller's context is not readable") from None
    if not isinstance(ctx, dict) or not isinstance(ctx.get("exp"), int | float):
        raise BadCaller("the caller's context has no expiry")
    if ctx["exp"] < now:
        raise BadCaller("the caller's context has expired")
    for k, t in (("tenant", str), ("class", str), ("depth", int)):
        if not isinstance(ctx.get(k), t):
            raise BadCaller(f"the caller's context has no {k}")
    return ctx

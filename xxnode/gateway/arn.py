"""Names of functions as Lambda's API takes them: a name, a partial ARN (ACCOUNT:function:
NAME) or a full ARN, each with an optional :QUALIFIER, and the ARNs we hand back.

A tenant is an AWS account to its clients: a 12-digit id derived from the tenant's name, so
ARNs carry the tenant and an SDK's client-side checks of an ARN's shape pass."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from xxnode.gateway.errors import invalid_parameter, not_found

NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
QUALIFIER_RE = re.compile(r"^(\$LATEST|[a-zA-Z0-9_-]{1,128})$")
_REF = re.compile(
    r"^(?:arn:aws[a-zA-Z-]*:lambda:(?P<region>[a-z0-9-]+):(?P<acct>\d{12}):function:"
    r"|(?P<acct2>\d{12}):function:)?(?P<name>[^:]+)(?::(?P<q>[^:]+))?$"
)


def account_of(tenant: str) -> str:
    return f"{int.from_bytes(hashlib.sha256(tenant.encode()).digest()[:8], 'big') % 10**12:012d}"


@dataclass(frozen=True)
class FunctionRef:
    name: str
    qualifier: str | None  # None: not given (the caller's ?Qualifier= may say)


def parse(ref: str, tenant: str, region: str) -> FunctionRef:
    """A FunctionName as given. Another account's ARN is "not found": a tenant cannot even
    learn that a function of another tenant exists."""
    if len(ref) > 170:
        raise invalid_parameter("FunctionName: at most 170 characters")
    m = _REF.match(ref)
    if m is None or not NAME_RE.match(m["name"]):
        raise invalid_parameter(
            f"1 validation error detected: Value '{_cut(ref)}' at 'functionName' failed to "
            "satisfy constraint: Member must satisfy regular expression pattern: "
            "(arn:(aws[a-zA-Z-]*)?:lambda:)?([a-z]{2}(-gov)?-[a-z]+-\\d{1}:)?(\\d{12}:)?"
            "(function:)?([a-zA-Z0-9-_]+)(:(\\$LATEST|[a-zA-Z0-9-_]+))?"
        )
    acct = m["acct"] or m["acct2"]
    if acct is not None and acct != account_of(tenant):
        raise not_found(f"Function not found: {_cut(ref)}")
    if m["region"] is not None and m["region"] != region:
        raise not_found(f"Function not found: {_cut(ref)}")
    q = m["q"]
    if q is not None and not QUALIFIER_RE.match(q):
        raise invalid_parameter(f"Qualifier: {_cut(q)!r} is not a version or alias")
    return FunctionRef(m["name"], q)


def account_in(ref: str) -> str | None:
    """The 12-digit account a FunctionName's ARN (or partial ARN) names, if it names one."""
    m = _REF.match(ref) if len(ref) <= 170 else None
    return None if m is None else (m["acct"] or m["acct2"])


def qualified(ref: FunctionRef, query_qualifier: str | None) -> str:
    """$LATEST unless the name or ?Qualifier= says otherwise; both saying different things is
    Lambda's InvalidParameterValueException."""
    if query_qualifier is not None and not QUALIFIER_RE.match(query_qualifier):
        raise invalid_parameter(f"Qualifier: {_cut(query_qualifier)!r} is not a version or alias")
    if ref.qualifier and query_qualifier and ref.qualifier != query_qualifier:
        raise invalid_parameter(
            "The derived qualifier from the function name does not match the specified qualifier."
        )
    return ref.qualifier or query_qualifier or "$LATEST"


def function_arn(tenant: str, region: str, name: str, qualifier: str | None = None) -> str:
    arn = f"arn:aws:lambda:{region}:{account_of(tenant)}:function:{name}"
    return f"{arn}:{qualifier}" if qualifier and qualifier != "$LATEST" else arn


def _cut(s: str, n: int = 140) -> str:
    return s if len(s) <= n else s[:n] + "..."

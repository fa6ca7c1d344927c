"""The ledger's contract: the rows, the errors and the one interface the gateway types against.

The gateway never learns which database it talks to. `open_store("sqlite:///var/lib/xx/ledger.db")`
is one gateway alone (an embedded file in WAL mode); `open_store("postgresql://...")` is several
gateways sharing one PostgreSQL database. Both run the same SQL (`schema.SqlStore`) and pass the
same contract suite (tests/host/test_ledger.py), so whatever the gateway sees from one it sees
from the other.

Conventions every backend keeps:
- Every function method takes the tenant, and a row of another tenant is simply not there
  (NotFound), so one tenant cannot learn that another's function exists.
- Lookups on the hot, per-request paths (`get_key`, `get_url_by_id`, `get_code`) return None
  on a miss; the API-shaped getters (`get_tenant`, `get_function`, `get_url`, ...) raise
  NotFound, whose message the gateway can hand back as ResourceNotFoundException.
- Times are seconds since the epoch from the store's clock (`time.time` unless one is passed
  to `open_store`), except `Function.last_modified`, which is kept as Lambda prints it. The
  clock is the caller's, not the database's, so a test can move it; gateways sharing a
  database are expected to run NTP, and event leases (tens of seconds) dwarf their skew.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import unquote, urlsplit

LATEST: Final = "$LATEST"
CLASS_TAG: Final = "xx:class"  # the tag that carries a function's price class

# What the schema is sized for; the gateway may refuse earlier with Lambda's own messages.
MAX_CODE_BYTES: Final = 50 * 1024 * 1024  # a directly uploaded zip
MAX_PAYLOAD_BYTES: Final = 6 * 1024 * 1024  # an invocation's payload

AUTH_TYPES: Final = ("NONE", "AWS_IAM")
INVOCATION_TYPES: Final = ("RequestResponse", "Event")
STATUSES: Final = ("accepted", "running", "succeeded", "failed")
FINISHED: Final = ("succeeded", "failed")

TENANT_RE: Final = re.compile(r"[a-z0-9-]{1,64}")
FUNCTION_RE: Final = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # Lambda's FunctionName rule
DIGEST_RE: Final = re.compile(r"sha256:[0-9a-f]{64}")
VERSION_RE: Final = re.compile(r"[1-9][0-9]*")


class LedgerError(Exception):
    """Every refusal the store makes; the message says what and which."""


class NotFound(LedgerError):
    """No such row for this tenant."""


class Conflict(LedgerError):
    """The row exists already, changed since the caller read it (revision), or is owned by
    someone else (an invocation's lease)."""


class Invalid(LedgerError, ValueError):
    """The arguments can never succeed: a bad name, a bad digest, too big a payload."""


class _Keep:
    """The 'leave it as it is' default where None is a value (a tenant's budget)."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = _Keep()


@dataclass(frozen=True)
class Tenant:
    name: str
    default_class: str
    created_at: float
    budget: float | None = None


@dataclass(frozen=True)
class AccessKey:
    access_key_id: str
    secret: str
    tenant: str
    created_at: float


@dataclass(frozen=True)
class Function:
    """One version of a function: "$LATEST" (mutable) or a published number (immutable).

    `create_function` reads only the configuration fields; the store fills in `code_size`
    (from the stored code), `version`, `revision_id` and `last_modified`. Tags belong to the
    function, not to a version (as in Lambda): every version shows $LATEST's tags, so a
    change of `xx:class` applies to all of them.
    """

    tenant: str
    name: str
    runtime: str
    handler: str
    code_digest: str
    timeout: float = 3.0
    memory_mb: int = 128
    environment: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""
    code_size: int = 0
    version: str = LATEST
    revision_id: str = ""
    last_modified: str = ""

    @property
    def price_class(self) -> str | None:
        return self.tags.get(CLASS_TAG)


@dataclass(frozen=True)
class FunctionUrl:
    url_id: str
    tenant: str
    function: str
    qualifier: str
    auth_type: str
    cors: dict[str, Any]
    created_at: float
    modified_at: float


@dataclass(frozen=True)
class Invocation:
    """One invocation's record. An Event's payload is kept until it has run; `lease_owner`
    and `lease_until` say which gateway runs a claimed event and until when its claim holds."""

    id: str
    tenant: str
    function: str
    qualifier: str
    price_class: str
    invocation_type: str
    status: str
    payload: bytes | None
    result: Any
    attempts: int
    lease_owner: str | None
    lease_until: float | None
    created_at: float
    updated_at: float
    context: dict | None = None  # an Event's caller: {payer, depth, own_class} (inheritance)


class Store(ABC):
    """The gateway's state. Thread-safe: the asyncio gateway calls it from worker threads
    (`asyncio.to_thread`); every method is one transaction."""

    # -- tenants and their keys
    @abstractmethod
    def create_tenant(self, name: str, default_class: str) -> Tenant: ...
    @abstractmethod
    def get_tenant(self, name: str) -> Tenant: ...
    @abstractmethod
    def list_tenants(self) -> list[Tenant]: ...
    @abstractmethod
    def set_tenant(
        self, name: str, *, default_class: str | None = None, budget: float | None | _Keep = KEEP
    ) -> Tenant: ...
    @abstractmethod
    def create_key(self, tenant: str) -> AccessKey: ...
    @abstractmethod
    def get_key(self, access_key_id: str) -> AccessKey | None: ...
    @abstractmethod
    def list_keys(self, tenant: str) -> list[AccessKey]: ...
    @abstractmethod
    def delete_key(self, access_key_id: str) -> None: ...

    # -- code, by the sha256 of its bytes
    @abstractmethod
    def put_code(self, data: bytes) -> str:
        """Store the bytes once; returns "sha256:<hex>", the same for the same bytes."""

    @abstractmethod
    def get_code(self, digest: str) -> bytes | None: ...
    @abstractmethod
    def has_code(self, digest: str) -> bool: ...

    # -- functions (every method takes the tenant)
    @abstractmethod
    def create_function(self, fn: Function) -> Function: ...
    @abstractmethod
    def get_function(self, tenant: str, name: str, qualifier: str = LATEST) -> Function: ...
    @abstractmethod
    def list_functions(
        self, tenant: str, marker: str | None = None, max_items: int = 50
    ) -> tuple[list[Function], str | None]:
        """$LATEST of each function by name; the second item is the marker of the next page
        (None on the last)."""

    @abstractmethod
    def list_versions(
        self, tenant: str, name: str, marker: str | None = None, max_items: int = 50
    ) -> tuple[list[Function], str | None]:
        """$LATEST, then the published versions by number (ListVersionsByFunction)."""

    @abstractmethod
    def update_function_code(
        self, tenant: str, name: str, code_digest: str, *, expect_revision: str | None = None
    ) -> Function: ...
    @abstractmethod
    def update_function_configuration(
        self,
        tenant: str,
        name: str,
        *,
        expect_revision: str | None = None,
        runtime: str | None = None,
        handler: str | None = None,
        timeout: float | None = None,
        memory_mb: int | None = None,
        environment: Mapping[str, str] | None = None,
        description: str | None = None,
    ) -> Function:
        """Changes only the fields given (not None); a new revision_id either way."""

    @abstractmethod
    def tag_function(self, tenant: str, name: str, tags: Mapping[str, str]) -> dict[str, str]: ...
    @abstractmethod
    def untag_function(self, tenant: str, name: str, keys: list[str]) -> dict[str, str]: ...
    @abstractmethod
    def delete_function(self, tenant: str, name: str) -> None:
        """Every version and every URL config of the function."""

    @abstractmethod
    def publish_version(
        self,
        tenant: str,
        name: str,
        *,
        description: str | None = None,
        expect_revision: str | None = None,
    ) -> Function:
        """$LATEST's configuration as the next numbered version; if nothing changed since
        the last one, that one is returned instead (as Lambda does)."""

    # -- function URLs
    @abstractmethod
    def create_url(
        self,
        tenant: str,
        function: str,
        qualifier: str = LATEST,
        *,
        auth_type: str = "NONE",
        cors: Mapping[str, Any] | None = None,
    ) -> FunctionUrl: ...
    @abstractmethod
    def get_url(self, tenant: str, function: str, qualifier: str = LATEST) -> FunctionUrl: ...
    @abstractmethod
    def get_url_by_id(self, url_id: str) -> FunctionUrl | None: ...
    @abstractmethod
    def list_urls(self, tenant: str, function: str) -> list[FunctionUrl]: ...
    @abstractmethod
    def update_url(
        self,
        tenant: str,
        function: str,
        qualifier: str = LATEST,
        *,
        auth_type: str | None = None,
        cors: Mapping[str, Any] | None = None,
    ) -> FunctionUrl: ...
    @abstractmethod
    def delete_url(self, tenant: str, function: str, qualifier: str = LATEST) -> None: ...

    # -- invocations
    @abstractmethod
    def record_event(
        self,
        tenant: str,
        function: str,
        qualifier: str,
        price_class: str,
        payload: bytes,
        *,
        invocation_id: str | None = None,
        context: dict | None = None,
    ) -> Invocation:
        """An accepted Event invocation, durable when this returns (Lambda's 202 may follow)."""

    @abstractmethod
    def record_request(
        self,
        tenant: str,
        function: str,
        qualifier: str,
        price_class: str,
        *,
        invocation_id: str | None = None,
    ) -> Invocation:
        """A RequestResponse invocation, running from the start; no payload is kept."""

    @abstractmethod
    def get_invocation(self, invocation_id: str) -> Invocation: ...
    @abstractmethod
    def claim_pending_events(
        self, limit: int, owner: str, lease_seconds: float
    ) -> list[Invocation]:
        """Up to `limit` events, oldest first, that are accepted or whose lease ran out; each
        is now `owner`'s until the lease ends. Atomic: no two claimers get the same one."""

    @abstractmethod
    def renew_lease(self, invocation_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend `owner`'s claim to now + lease_seconds while it still holds it; False if
        the lease already passed to another or the invocation is finished. A short lease,
        renewed while the event runs, lets a dead gateway's events move on quickly."""

    @abstractmethod
    def finish_invocation(
        self, invocation_id: str, status: str, result: Any = None, *, owner: str | None = None
    ) -> Invocation:
        """succeeded/failed, once. With `owner`, Conflict if the lease passed to another."""

    # -- the store itself
    @abstractmethod
    # -- usage (the bill): records from nodes, each kept once by its id
    @abstractmethod
    def record_usage(self, records: Sequence[object]) -> tuple[list[str], dict[str, str]]:
        """(ids now in the ledger, {id: why} for records refused); a record already there
        is acknowledged again and not added twice."""

    @abstractmethod
    def usage_records(self, tenant: str | None = None, month: str | None = None) -> list: ...
    @abstractmethod
    def bill(self, tenant: str, month: str) -> list:
        """BillLines: per function and class the tenant owns, then premium lines for calls
        it raised in other tenants."""

    @abstractmethod
    def month_spend(self, tenant: str, month: str) -> float:
        """What the tenant owes for the month so far: its own cost plus premiums it pays."""

    @abstractmethod
    def schema_version(self) -> int: ...
    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Clock = Callable[[], float]


def open_store(url: str, *, clock: Clock | None = None) -> Store:
    """`sqlite:///abs/path/ledger.db` (the path as in a file: URL) or a libpq URL
    `postgresql://user@host/db` / `postgres://...`. Applies pending migrations before it
    returns; the backend modules are imported here so a SQLite gateway never loads psycopg."""
    import time

    clock = clock or time.time
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        parts = urlsplit(url)
        if parts.netloc or not parts.path or parts.query:
            raise Invalid(f"not a sqlite URL (sqlite:///path/to/file.db): {url!r}")
        from xxnode.ledger.sqlite import SqliteStore

        return SqliteStore(unquote(parts.path), clock=clock)
    if scheme in ("postgresql", "postgres"):
        from xxnode.ledger.postgres import PostgresStore

        return PostgresStore(url, clock=clock)
    raise Invalid(f"unknown ledger URL scheme {scheme!r} (sqlite:// or postgresql://)")


def lambda_time(t: float) -> str:
    """Lambda's LastModified: "2026-12-03T16:40:12.345+0000" (milliseconds, +0000)."""
    d = datetime.fromtimestamp(t, UTC)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}+0000"


# -- checks every backend makes before touching the database


def check_tenant_name(name: object) -> str:
    if not isinstance(name, str) or not TENANT_RE.fullmatch(name):
        raise Invalid(f"tenant name must match [a-z0-9-]{{1,64}}: {name!r}")
    return name


def check_function_name(name: object) -> str:
    if not isinstance(name, str) or not FUNCTION_RE.fullmatch(name):
        raise Invalid(f"function name must match [a-zA-Z0-9-_]{{1,64}}: {name!r}")
    return name


def check_digest(digest: object) -> str:
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise Invalid(f"code digest must be sha256:<64 hex digits>: {digest!r}")
    return digest


def check_str_map(what: str, m: object) -> dict[str, str]:
    if not isinstance(m, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in m.items()
    ):
        raise Invalid(f"{what} must map strings to strings")
    return dict(m)


def check_class(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise Invalid(f"price class must be a non-empty name: {name!r}")
    return name

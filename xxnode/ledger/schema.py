"""The tables, their migrations, and the SQL that reads and writes them, shared by both backends.

Everything here is plain SQL that SQLite (3.35+, for RETURNING) and PostgreSQL both run; a
backend (`sqlite.py`, `postgres.py`) supplies only a connection per transaction and a
`Dialect`: two DDL types and two locking clauses. That is the whole difference, so the two
cannot drift apart. Statements are written with `?` placeholders; the PostgreSQL backend turns
them into psycopg's `%s` (no statement here contains a literal `?` or `%`).

Migrations are a numbered list, applied in order, each recorded in `schema_version` in the
same transaction as its DDL (both databases have transactional DDL), under a lock the backend
takes first, so two processes opening one store at once apply each migration exactly once.
Never edit a migration that has shipped: append a new one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import string
import uuid
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from xxnode.ledger import usage
from xxnode.ledger.store import (
    AUTH_TYPES,
    FINISHED,
    KEEP,
    LATEST,
    MAX_CODE_BYTES,
    MAX_PAYLOAD_BYTES,
    AccessKey,
    Clock,
    Conflict,
    Function,
    FunctionUrl,
    Invalid,
    Invocation,
    LedgerError,
    NotFound,
    Store,
    Tenant,
    _Keep,
    check_class,
    check_digest,
    check_function_name,
    check_str_map,
    check_tenant_name,
    lambda_time,
)

# Each migration is a tuple of statements; {blob} and {key} are the dialect's types.
# {key} is text that sorts by code point in both databases (PostgreSQL's "C" collation,
# SQLite's default BINARY), so a listing's order and its markers do not depend on the
# locale a PostgreSQL cluster was created with.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: the registry, code, URLs and invocations
        """CREATE TABLE tenants (
            name {key} PRIMARY KEY,
            default_class TEXT NOT NULL,
            budget DOUBLE PRECISION,
            created_at DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE access_keys (
            access_key_id TEXT PRIMARY KEY,
            secret TEXT NOT NULL,
            tenant {key} NOT NULL REFERENCES tenants (name),
            created_at DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX access_keys_by_tenant ON access_keys (tenant)",
        """CREATE TABLE code (
            digest TEXT PRIMARY KEY,
            size BIGINT NOT NULL,
            data {blob} NOT NULL,
            created_at DOUBLE PRECISION NOT NULL)""",
        # One row per version: '$LATEST' (mutable) and '1', '2', ... (immutable copies).
        # tags: the function's, read from $LATEST's row ('{{}}' on numbered rows, unread).
        # last_published: on $LATEST, the last number publish_version handed out (numbers
        # are never reused); 0 on numbered rows. code_size is code.size, joined.
        """CREATE TABLE functions (
            tenant {key} NOT NULL REFERENCES tenants (name),
            name {key} NOT NULL,
            version {key} NOT NULL,
            runtime TEXT NOT NULL,
            handler TEXT NOT NULL,
            timeout DOUBLE PRECISION NOT NULL,
            memory_mb INTEGER NOT NULL,
            environment TEXT NOT NULL,
            tags TEXT NOT NULL,
            description TEXT NOT NULL,
            code_digest TEXT NOT NULL REFERENCES code (digest),
            revision_id TEXT NOT NULL,
            last_modified TEXT NOT NULL,
            last_published INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (tenant, name, version))""",
        """CREATE TABLE function_urls (
            url_id TEXT PRIMARY KEY,
            tenant {key} NOT NULL,
            function_name {key} NOT NULL,
            qualifier {key} NOT NULL,
            auth_type TEXT NOT NULL CHECK (auth_type IN ('NONE', 'AWS_IAM')),
            cors TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            modified_at DOUBLE PRECISION NOT NULL,
            UNIQUE (tenant, function_name, qualifier),
            FOREIGN KEY (tenant, function_name, qualifier)
                REFERENCES functions (tenant, name, version))""",
        # No foreign key to functions: the record (and the bill) outlives the function.
        """CREATE TABLE invocations (
            id TEXT PRIMARY KEY,
            tenant {key} NOT NULL REFERENCES tenants (name),
            function_name TEXT NOT NULL,
            qualifier TEXT NOT NULL,
            price_class TEXT NOT NULL,
            invocation_type TEXT NOT NULL
                CHECK (invocation_type IN ('RequestResponse', 'Event')),
            status TEXT NOT NULL
                CHECK (status IN ('accepted', 'running', 'succeeded', 'failed')),
            payload {blob},
            result TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            lease_owner TEXT,
            lease_until DOUBLE PRECISION,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL)""",
        # Only the events still to run, oldest first: what claim_pending_events scans.
        """CREATE INDEX invocations_claimable ON invocations (created_at, id)
            WHERE invocation_type = 'Event' AND status IN ('accepted', 'running')""",
    ),
    (  # 2: usage records (the bill), and the caller's context an Event carries
        # One row per finished invocation, keyed by its cluster job id: a node resends
        # until acknowledged, and a resent record is the same row (exactly once).
        # cost: the owner's; premium: the payer's (0 unless another tenant raised it).
        """CREATE TABLE usage (
            id TEXT PRIMARY KEY,
            tenant {key} NOT NULL,
            function_name TEXT NOT NULL,
            version TEXT NOT NULL,
            price_class TEXT NOT NULL,
            own_class TEXT NOT NULL,
            payer {key} NOT NULL,
            depth INTEGER NOT NULL,
            node TEXT NOT NULL,
            month TEXT NOT NULL,
            finished_at DOUBLE PRECISION NOT NULL,
            cpu_s DOUBLE PRECISION NOT NULL,
            gb_s DOUBLE PRECISION NOT NULL,
            cpu_price DOUBLE PRECISION NOT NULL,
            own_cpu_price DOUBLE PRECISION NOT NULL,
            memory_price DOUBLE PRECISION NOT NULL,
            cost DOUBLE PRECISION NOT NULL,
            premium DOUBLE PRECISION NOT NULL,
            recorded_at DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX usage_by_tenant ON usage (tenant, month)",
        "CREATE INDEX usage_by_payer ON usage (payer, month)",
        "ALTER TABLE invocations ADD COLUMN context TEXT",
    ),
)

SCHEMA_VERSION_DDL = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    applied_at DOUBLE PRECISION NOT NULL)"""


@dataclass(frozen=True)
class Dialect:
    blob: str  # the type of bytes
    key: str  # the type of text compared and sorted by code point
    for_update: str  # after a SELECT of a row this transaction is about to change
    claim_lock: str  # after the claim's SELECT: lock what it picks, pass over what is held


class Tx(Protocol):
    """One transaction (or, for reads, one autocommit connection) of a backend."""

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...
    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Returns the number of rows changed."""


def apply_migrations(tx: Tx, dialect: Dialect, now: float) -> int:
    """Called by a backend inside its migration transaction, after taking its lock."""
    tx.run(SCHEMA_VERSION_DDL)
    current = tx.rows("SELECT MAX(version) FROM schema_version")[0][0] or 0
    if current > len(MIGRATIONS):
        raise LedgerError(
            f"the ledger's schema is version {current}, newer than this code knows "
            f"({len(MIGRATIONS)}): upgrade xxnode before opening it"
        )
    for number in range(current + 1, len(MIGRATIONS) + 1):
        for statement in MIGRATIONS[number - 1]:
            tx.run(statement.format(blob=dialect.blob, key=dialect.key))
        tx.run("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (number, now))
    return len(MIGRATIONS)


def _json(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def _random(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _marker(kind: str, after: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{after}".encode()).decode().rstrip("=")


def _unmarker(kind: str, marker: str) -> str:
    try:
        text = base64.urlsafe_b64decode(marker + "=" * (-len(marker) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        text = ""
    prefix, sep, after = text.partition(":")
    if prefix != kind or not sep:
        raise Invalid(f"not a marker this listing handed out: {marker!r}")
    return after


def _check_max_items(n: object) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10_000:
        raise Invalid(f"max_items must be an integer from 1 to 10000: {n!r}")
    return n


def _check_config(runtime: object, handler: object, timeout: object, memory_mb: object) -> None:
    if not isinstance(runtime, str) or not runtime:
        raise Invalid(f"runtime must be a non-empty string: {runtime!r}")
    if not isinstance(handler, str):
        raise Invalid(f"handler must be a string: {handler!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise Invalid(f"timeout must be a positive number of seconds: {timeout!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb <= 0:
        raise Invalid(f"memory_mb must be a positive integer: {memory_mb!r}")


_FN_COLS = (
    "v.tenant, v.name, v.runtime, v.handler, v.code_digest, v.timeout, v.memory_mb, "
    "v.environment, l.tags, v.description, c.size, v.version, v.revision_id, v.last_modified"
)
# Every version shows $LATEST's tags and its code's size.
_FN_FROM = (
    "FROM functions v JOIN functions l ON l.tenant = v.tenant AND l.name = v.name "
    "AND l.version = ? JOIN code c ON c.digest = v.code_digest"
)
_CONFIG_COLS = "runtime, handler, timeout, memory_mb, environment, description, code_digest"


class _Latest(NamedTuple):
    """$LATEST's own columns (not joined), as a change reads them before it writes."""

    runtime: str
    handler: str
    timeout: float
    memory_mb: int
    environment: str  # JSON
    description: str
    code_digest: str
    revision_id: str
    tags: str  # JSON
    last_published: int


# What makes a version differ from the last published one (a new description alone does not).
_VERSIONED = ("runtime", "handler", "timeout", "memory_mb", "environment", "code_digest")
_URL_COLS = "url_id, tenant, function_name, qualifier, auth_type, cors, created_at, modified_at"
_INV_COLS = (
    "id, tenant, function_name, qualifier, price_class, invocation_type, status, payload, "
    "result, attempts, lease_owner, lease_until, created_at, updated_at, context"
)
_USAGE_COLS = (
    "id, tenant, function_name, version, price_class, own_class, payer, depth, node, "
    "finished_at, cpu_s, gb_s, cpu_price, own_cpu_price, memory_price"
)


def _fn(r: tuple[Any, ...]) -> Function:
    return Function(
        tenant=r[0],
        name=r[1],
        runtime=r[2],
        handler=r[3],
        code_digest=r[4],
        timeout=float(r[5]),
        memory_mb=int(r[6]),
        environment=json.loads(r[7]),
        tags=json.loads(r[8]),
        description=r[9],
        code_size=int(r[10]),
        version=r[11],
        revision_id=r[12],
        last_modified=r[13],
    )


def _url(r: tuple[Any, ...]) -> FunctionUrl:
    return FunctionUrl(
        url_id=r[0],
        tenant=r[1],
        function=r[2],
        qualifier=r[3],
        auth_type=r[4],
        cors=json.loads(r[5]),
        created_at=float(r[6]),
        modified_at=float(r[7]),
    )


def _inv(r: tuple[Any, ...]) -> Invocation:
    return Invocation(
        id=r[0],
        tenant=r[1],
        function=r[2],
        qualifier=r[3],
        price_class=r[4],
        invocation_type=r[5],
        status=r[6],
        payload=None if r[7] is None else bytes(r[7]),
        result=None if r[8] is None else json.loads(r[8]),
        attempts=int(r[9]),
        lease_owner=r[10],
        lease_until=None if r[11] is None else float(r[11]),
        created_at=float(r[12]),
        updated_at=float(r[13]),
        context=None if r[14] is None else json.loads(r[14]),
    )


def _tenant(r: tuple[Any, ...]) -> Tenant:
    return Tenant(
        name=r[0],
        default_class=r[1],
        budget=None if r[2] is None else float(r[2]),
        created_at=float(r[3]),
    )


def _key(r: tuple[Any, ...]) -> AccessKey:
    return AccessKey(access_key_id=r[0], secret=r[1], tenant=r[2], created_at=float(r[3]))


class SqlStore(Store):
    """The whole Store in portable SQL, over a backend's `_tx`."""

    dialect: Dialect

    def __init__(self, clock: Clock):
        self._clock = clock

    @abstractmethod
    def _tx(self, write: bool) -> AbstractContextManager[Tx]:
        """write=True: one transaction that holds the write lock (SQLite) or row locks
        (PostgreSQL) it takes until commit; write=False: reads that need no transaction."""

    # -- tenants and keys

    def create_tenant(self, name: str, default_class: str) -> Tenant:
        check_tenant_name(name)
        check_class(default_class)
        with self._tx(True) as tx:
            if tx.rows("SELECT 1 FROM tenants WHERE name = ?", (name,)):
                raise Conflict(f"tenant {name} exists")
            tx.run(
                "INSERT INTO tenants (name, default_class, budget, created_at) VALUES (?, ?, ?, ?)",
                (name, default_class, None, self._clock()),
            )
            return self._tenant(tx, name)

    def get_tenant(self, name: str) -> Tenant:
        with self._tx(False) as tx:
            return self._tenant(tx, name)

    def _tenant(self, tx: Tx, name: str) -> Tenant:
        rows = tx.rows(
            "SELECT name, default_class, budget, created_at FROM tenants WHERE name = ?", (name,)
        )
        if not rows:
            raise NotFound(f"tenant {name} not found")
        return _tenant(rows[0])

    def list_tenants(self) -> list[Tenant]:
        with self._tx(False) as tx:
            rows = tx.rows(
                "SELECT name, default_class, budget, created_at FROM tenants ORDER BY name"
            )
        return [_tenant(r) for r in rows]

    def set_tenant(
        self, name: str, *, default_class: str | None = None, budget: float | None | _Keep = KEEP
    ) -> Tenant:
        if default_class is not None:
            check_class(default_class)
        if not isinstance(budget, _Keep) and budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, int | float):
                raise Invalid(f"budget must be a number or None: {budget!r}")
            budget = float(budget)
        with self._tx(True) as tx:
            t = self._tenant(tx, name)
            tx.run(
                "UPDATE tenants SET default_class = ?, budget = ? WHERE name = ?",
                (
                    t.default_class if default_class is None else default_class,
                    t.budget if isinstance(budget, _Keep) else budget,
                    name,
                ),
            )
            return self._tenant(tx, name)

    def create_key(self, tenant: str) -> AccessKey:
        key = AccessKey(
            # AWS's shape: AKIA + 16 of [A-Z0-9]; 36^16 makes a collision a non-event.
            access_key_id="AKIA" + _random(string.ascii_uppercase + string.digits, 16),
            secret=_random(string.ascii_letters + string.digits, 40),
            tenant=tenant,
            created_at=self._clock(),
        )
        with self._tx(True) as tx:
            self._tenant(tx, tenant)
            tx.run(
                "INSERT INTO access_keys (access_key_id, secret, tenant, created_at) "
                "VALUES (?, ?, ?, ?)",
                (key.access_key_id, key.secret, key.tenant, key.created_at),
            )
        return key

    def get_key(self, access_key_id: str) -> AccessKey | None:
        with self._tx(False) as tx:
            rows = tx.rows(
                "SELECT access_key_id, secret, tenant, created_at FROM access_keys "
                "WHERE access_key_id = ?",
                (access_key_id,),
            )
        return _key(rows[0]) if rows else None

    def list_keys(self, tenant: str) -> list[AccessKey]:
        with self._tx(False) as tx:
            self._tenant(tx, tenant)
            rows = tx.rows(
                "SELECT access_key_id, secret, tenant, created_at FROM access_keys "
                "WHERE tenant = ? ORDER BY created_at, access_key_id",
                (tenant,),
            )
        return [_key(r) for r in rows]

    def delete_key(self, access_key_id: str) -> None:
        with self._tx(True) as tx:
            if not tx.run("DELETE FROM access_keys WHERE access_key_id = ?", (access_key_id,)):
                raise NotFound(f"access key {access_key_id} not found")

    # -- code

    def put_code(self, data: bytes) -> str:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise Invalid("code must be bytes")
        data = bytes(data)
        if len(data) > MAX_CODE_BYTES:
            raise Invalid(f"code is {len(data)} bytes, more than {MAX_CODE_BYTES}")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if self.has_code(digest):  # spares sending up to 50 MiB again
            return digest
        with self._tx(True) as tx:
            tx.run(
                "INSERT INTO code (digest, size, data, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (digest) DO NOTHING",
                (digest, len(data), data, self._clock()),
            )
        return digest

    def get_code(self, digest: str) -> bytes | None:
        with self._tx(False) as tx:
            rows = tx.rows("SELECT data FROM code WHERE digest = ?", (digest,))
        return bytes(rows[0][0]) if rows else None

    def has_code(self, digest: str) -> bool:
        with self._tx(False) as tx:
            return bool(tx.rows("SELECT 1 FROM code WHERE digest = ?", (digest,)))

    # -- functions

    def create_function(self, fn: Function) -> Function:
        check_tenant_name(fn.tenant)
        check_function_name(fn.name)
        check_digest(fn.code_digest)
        _check_config(fn.runtime, fn.handler, fn.timeout, fn.memory_mb)
        env = check_str_map("environment", fn.environment)
        tags = check_str_map("tags", fn.tags)
        if not isinstance(fn.description, str):
            raise Invalid("description must be a string")
        if fn.version != LATEST:
            raise Invalid(f"a function is created as {LATEST}; publish_version makes the rest")
        with self._tx(True) as tx:
            self._tenant(tx, fn.tenant)
            if self._latest(tx, fn.tenant, fn.name, lock=False, must=False):
                raise Conflict(f"function {fn.name} exists")
            self._code_stored(tx, fn.code_digest)
            tx.run(
                "INSERT INTO functions (tenant, name, version, runtime, handler, timeout, "
                "memory_mb, environment, tags, description, code_digest, revision_id, "
                "last_modified) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    fn.tenant,
                    fn.name,
                    LATEST,
                    fn.runtime,
                    fn.handler,
                    float(fn.timeout),
                    fn.memory_mb,
                    _json(env),
                    _json(tags),
                    fn.description,
                    fn.code_digest,
                    str(uuid.uuid4()),
                    lambda_time(self._clock()),
                ),
            )
            return self._function(tx, fn.tenant, fn.name, LATEST)

    def get_function(self, tenant: str, name: str, qualifier: str = LATEST) -> Function:
        with self._tx(False) as tx:
            return self._function(tx, tenant, name, qualifier)

    def _function(self, tx: Tx, tenant: str, name: str, qualifier: str) -> Function:
        rows = tx.rows(
            f"SELECT {_FN_COLS} {_FN_FROM} WHERE v.tenant = ? AND v.name = ? AND v.version = ?",
            (LATEST, tenant, name, qualifier),
        )
        if not rows:
            what = name if qualifier == LATEST else f"{name}:{qualifier}"
            raise NotFound(f"function {what} not found")
        return _fn(rows[0])

    def _latest(
        self, tx: Tx, tenant: str, name: str, *, lock: bool, must: bool = True
    ) -> _Latest | None:
        """Row-locked when about to change it (PostgreSQL; SQLite's writer is alone)."""
        rows = tx.rows(
            f"SELECT {_CONFIG_COLS}, revision_id, tags, last_published FROM functions "
            "WHERE tenant = ? AND name = ? AND version = ?"
            + (self.dialect.for_update if lock else ""),
            (tenant, name, LATEST),
        )
        if not rows and must:
            raise NotFound(f"function {name} not found")
        return _Latest(*rows[0]) if rows else None

    def _code_stored(self, tx: Tx, digest: str) -> None:
        if not tx.rows("SELECT 1 FROM code WHERE digest = ?", (digest,)):
            raise Invalid(f"code {digest} is not in the store (put_code first)")

    @staticmethod
    def _check_revision(row: _Latest | None, expect: str | None) -> _Latest:
        assert row is not None  # _latest(must=True) raised NotFound already
        if expect is not None and row.revision_id != expect:
            raise Conflict(f"revision {expect} is not the current one ({row.revision_id})")
        return row

    def list_functions(
        self, tenant: str, marker: str | None = None, max_items: int = 50
    ) -> tuple[list[Function], str | None]:
        _check_max_items(max_items)
        after = "" if marker is None else _unmarker("f", marker)
        with self._tx(False) as tx:
            rows = tx.rows(
                f"SELECT {_FN_COLS} {_FN_FROM} WHERE v.tenant = ? AND v.version = ? "
                "AND v.name > ? ORDER BY v.name LIMIT ?",
                (LATEST, tenant, LATEST, after, max_items + 1),
            )
        fns = [_fn(r) for r in rows[:max_items]]
        more = len(rows) > max_items
        return fns, _marker("f", fns[-1].name) if more else None

    def list_versions(
        self, tenant: str, name: str, marker: str | None = None, max_items: int = 50
    ) -> tuple[list[Function], str | None]:
        _check_max_items(max_items)
        # Versions are digit strings without leading zeros: by (length, text) is by number.
        after = "" if marker is None else _unmarker("v", marker)
        if after and not after.isdigit():
            raise Invalid(f"not a marker this listing handed out: {marker!r}")
        with self._tx(False) as tx:
            latest = self._function(tx, tenant, name, LATEST)
            items = [latest] if marker is None else []
            want = max_items - len(items)
            rows = tx.rows(
                f"SELECT {_FN_COLS} {_FN_FROM} WHERE v.tenant = ? AND v.name = ? "
                "AND v.version <> ? AND (LENGTH(v.version) > ? OR "
                "(LENGTH(v.version) = ? AND v.version > ?)) "
                "ORDER BY LENGTH(v.version), v.version LIMIT ?",
                (LATEST, tenant, name, LATEST, len(after), len(after), after, want + 1),
            )
        items += [_fn(r) for r in rows[:want]]
        if len(rows) <= want:
            return items, None
        last = items[-1].version
        return items, _marker("v", "" if last == LATEST else last)

    def update_function_code(
        self, tenant: str, name: str, code_digest: str, *, expect_revision: str | None = None
    ) -> Function:
        check_digest(code_digest)
        with self._tx(True) as tx:
            row = self._check_revision(self._latest(tx, tenant, name, lock=True), expect_revision)
            self._code_stored(tx, code_digest)
            self._write_config(tx, tenant, name, row._replace(code_digest=code_digest))
            return self._function(tx, tenant, name, LATEST)

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
        env = None if environment is None else check_str_map("environment", environment)
        if description is not None and not isinstance(description, str):
            raise Invalid("description must be a string")
        with self._tx(True) as tx:
            row = self._check_revision(self._latest(tx, tenant, name, lock=True), expect_revision)
            given = {
                "runtime": runtime,
                "handler": handler,
                "timeout": timeout,
                "memory_mb": memory_mb,
                "environment": None if env is None else _json(env),
                "description": description,
            }
            new = row._replace(**{k: v for k, v in given.items() if v is not None})
            _check_config(new.runtime, new.handler, new.timeout, new.memory_mb)
            self._write_config(tx, tenant, name, new)
            return self._function(tx, tenant, name, LATEST)

    def _write_config(self, tx: Tx, tenant: str, name: str, c: _Latest) -> None:
        tx.run(
            "UPDATE functions SET runtime = ?, handler = ?, timeout = ?, memory_mb = ?, "
            "environment = ?, description = ?, code_digest = ?, revision_id = ?, "
            "last_modified = ? WHERE tenant = ? AND name = ? AND version = ?",
            (
                c.runtime,
                c.handler,
                float(c.timeout),
                c.memory_mb,
                c.environment,
                c.description,
                c.code_digest,
                str(uuid.uuid4()),
                lambda_time(self._clock()),
                tenant,
                name,
                LATEST,
            ),
        )

    def tag_function(self, tenant: str, name: str, tags: Mapping[str, str]) -> dict[str, str]:
        add = check_str_map("tags", tags)
        return self._retag(tenant, name, lambda t: {**t, **add})

    def untag_function(self, tenant: str, name: str, keys: list[str]) -> dict[str, str]:
        drop = set(keys)
        return self._retag(tenant, name, lambda t: {k: v for k, v in t.items() if k not in drop})

    def _retag(self, tenant: str, name: str, change: Any) -> dict[str, str]:
        # Tags are not configuration: no new revision, no new last_modified (as in Lambda).
        with self._tx(True) as tx:
            row = self._check_revision(self._latest(tx, tenant, name, lock=True), None)
            tags = change(json.loads(row.tags))
            tx.run(
                "UPDATE functions SET tags = ? WHERE tenant = ? AND name = ? AND version = ?",
                (_json(tags), tenant, name, LATEST),
            )
            return tags

    def delete_function(self, tenant: str, name: str) -> None:
        with self._tx(True) as tx:
            self._latest(tx, tenant, name, lock=True)
            tx.run(
                "DELETE FROM function_urls WHERE tenant = ? AND function_name = ?", (tenant, name)
            )
            tx.run("DELETE FROM functions WHERE tenant = ? AND name = ?", (tenant, name))

    def publish_version(
        self,
        tenant: str,
        name: str,
        *,
        description: str | None = None,
        expect_revision: str | None = None,
    ) -> Function:
        if description is not None and not isinstance(description, str):
            raise Invalid("description must be a string")
        with self._tx(True) as tx:
            # The row lock on $LATEST also serialises the version counter.
            row = self._check_revision(self._latest(tx, tenant, name, lock=True), expect_revision)
            last = int(row.last_published)
            if last:
                prev = tx.rows(
                    f"SELECT {', '.join(_VERSIONED)} FROM functions "
                    "WHERE tenant = ? AND name = ? AND version = ?",
                    (tenant, name, str(last)),
                )
                if prev and prev[0] == tuple(getattr(row, f) for f in _VERSIONED):
                    return self._function(tx, tenant, name, str(last))
            version = str(last + 1)
            tx.run(
                "INSERT INTO functions (tenant, name, version, runtime, handler, timeout, "
                "memory_mb, environment, tags, description, code_digest, revision_id, "
                "last_modified) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    tenant,
                    name,
                    version,
                    row.runtime,
                    row.handler,
                    row.timeout,
                    row.memory_mb,
                    row.environment,
                    "{}",
                    row.description if description is None else description,
                    row.code_digest,
                    str(uuid.uuid4()),
                    lambda_time(self._clock()),
                ),
            )
            tx.run(
                "UPDATE functions SET last_published = ? "
                "WHERE tenant = ? AND name = ? AND version = ?",
                (last + 1, tenant, name, LATEST),
            )
            return self._function(tx, tenant, name, version)

    # -- function URLs

    def create_url(
        self,
        tenant: str,
        function: str,
        qualifier: str = LATEST,
        *,
        auth_type: str = "NONE",
        cors: Mapping[str, Any] | None = None,
    ) -> FunctionUrl:
        if auth_type not in AUTH_TYPES:
            raise Invalid(f"auth_type must be NONE or AWS_IAM: {auth_type!r}")
        cors_json = self._cors({} if cors is None else cors)
        url_id = _random(string.ascii_lowercase + string.digits, 32)
        now = self._clock()
        with self._tx(True) as tx:
            self._function(tx, tenant, function, qualifier)
            if tx.rows(
                "SELECT 1 FROM function_urls WHERE tenant = ? AND function_name = ? "
                "AND qualifier = ?",
                (tenant, function, qualifier),
            ):
                raise Conflict(f"function {function}:{qualifier} has a URL already")
            tx.run(
                f"INSERT INTO function_urls ({_URL_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (url_id, tenant, function, qualifier, auth_type, cors_json, now, now),
            )
            return self._url(tx, tenant, function, qualifier)

    @staticmethod
    def _cors(cors: object) -> str:
        if not isinstance(cors, Mapping):
            raise Invalid("cors must be a JSON object")
        try:
            return _json(dict(cors))
        except (TypeError, ValueError) as e:
            raise Invalid(f"cors must be a JSON object: {e}") from None

    def get_url(self, tenant: str, function: str, qualifier: str = LATEST) -> FunctionUrl:
        with self._tx(False) as tx:
            return self._url(tx, tenant, function, qualifier)

    def _url(self, tx: Tx, tenant: str, function: str, qualifier: str) -> FunctionUrl:
        rows = tx.rows(
            f"SELECT {_URL_COLS} FROM function_urls WHERE tenant = ? AND function_name = ? "
            "AND qualifier = ?",
            (tenant, function, qualifier),
        )
        if not rows:
            raise NotFound(f"function {function}:{qualifier} has no URL")
        return _url(rows[0])

    def get_url_by_id(self, url_id: str) -> FunctionUrl | None:
        with self._tx(False) as tx:
            rows = tx.rows(f"SELECT {_URL_COLS} FROM function_urls WHERE url_id = ?", (url_id,))
        return _url(rows[0]) if rows else None

    def list_urls(self, tenant: str, function: str) -> list[FunctionUrl]:
        with self._tx(False) as tx:
            self._function(tx, tenant, function, LATEST)
            rows = tx.rows(
                f"SELECT {_URL_COLS} FROM function_urls WHERE tenant = ? AND function_name = ? "
                "ORDER BY qualifier",
                (tenant, function),
            )
        return [_url(r) for r in rows]

    def update_url(
        self,
        tenant: str,
        function: str,
        qualifier: str = LATEST,
        *,
        auth_type: str | None = None,
        cors: Mapping[str, Any] | None = None,
    ) -> FunctionUrl:
        if auth_type is not None and auth_type not in AUTH_TYPES:
            raise Invalid(f"auth_type must be NONE or AWS_IAM: {auth_type!r}")
        cors_json = None if cors is None else self._cors(cors)
        with self._tx(True) as tx:
            old = self._url(tx, tenant, function, qualifier)
            tx.run(
                "UPDATE function_urls SET auth_type = ?, cors = ?, modified_at = ? "
                "WHERE url_id = ?",
                (
                    old.auth_type if auth_type is None else auth_type,
                    _json(old.cors) if cors_json is None else cors_json,
                    self._clock(),
                    old.url_id,
                ),
            )
            return self._url(tx, tenant, function, qualifier)

    def delete_url(self, tenant: str, function: str, qualifier: str = LATEST) -> None:
        with self._tx(True) as tx:
            if not tx.run(
                "DELETE FROM function_urls WHERE tenant = ? AND function_name = ? "
                "AND qualifier = ?",
                (tenant, function, qualifier),
            ):
                raise NotFound(f"function {function}:{qualifier} has no URL")

    # -- invocations

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
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise Invalid("payload must be bytes")
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise Invalid(f"payload is {len(payload)} bytes, more than {MAX_PAYLOAD_BYTES}")
        return self._record(
            tenant,
            function,
            qualifier,
            price_class,
            "Event",
            "accepted",
            bytes(payload),
            invocation_id,
            context,
        )

    def record_request(
        self,
        tenant: str,
        function: str,
        qualifier: str,
        price_class: str,
        *,
        invocation_id: str | None = None,
    ) -> Invocation:
        return self._record(
            tenant,
            function,
            qualifier,
            price_class,
            "RequestResponse",
            "running",
            None,
            invocation_id,
        )

    def _record(
        self,
        tenant: str,
        function: str,
        qualifier: str,
        price_class: str,
        kind: str,
        status: str,
        payload: bytes | None,
        invocation_id: str | None,
        context: dict | None = None,
    ) -> Invocation:
        check_class(price_class)
        inv_id = invocation_id or str(uuid.uuid4())
        if not isinstance(inv_id, str):
            raise Invalid(f"invocation id must be a string: {inv_id!r}")
        now = self._clock()
        # Durable at commit: the backends commit with a sync (SQLite synchronous=FULL,
        # PostgreSQL's synchronous_commit) before _tx returns.
        with self._tx(True) as tx:
            self._tenant(tx, tenant)
            if tx.rows("SELECT 1 FROM invocations WHERE id = ?", (inv_id,)):
                raise Conflict(f"invocation {inv_id} exists")
            tx.run(
                f"INSERT INTO invocations ({_INV_COLS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    inv_id,
                    tenant,
                    function,
                    qualifier,
                    price_class,
                    kind,
                    status,
                    payload,
                    None,
                    0,
                    None,
                    None,
                    now,
                    now,
                    None if context is None else _json(context),
                ),
            )
            return self._invocation(tx, inv_id)

    def get_invocation(self, invocation_id: str) -> Invocation:
        with self._tx(False) as tx:
            return self._invocation(tx, invocation_id)

    def _invocation(self, tx: Tx, invocation_id: str, lock: bool = False) -> Invocation:
        rows = tx.rows(
            f"SELECT {_INV_COLS} FROM invocations WHERE id = ?"
            + (self.dialect.for_update if lock else ""),
            (invocation_id,),
        )
        if not rows:
            raise NotFound(f"invocation {invocation_id} not found")
        return _inv(rows[0])

    def claim_pending_events(
        self, limit: int, owner: str, lease_seconds: float
    ) -> list[Invocation]:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise Invalid(f"limit must be a positive integer: {limit!r}")
        if not isinstance(owner, str) or not owner:
            raise Invalid(f"owner must be a non-empty string: {owner!r}")
        _check_lease(lease_seconds)
        now = self._clock()
        # One statement claims: the inner SELECT picks (and, on PostgreSQL, row-locks,
        # skipping rows another claimer holds), the UPDATE takes them. The redundant
        # status IN (...) lets both planners use the partial index.
        with self._tx(True) as tx:
            rows = tx.rows(
                "UPDATE invocations SET status = 'running', lease_owner = ?, lease_until = ?, "
                "attempts = attempts + 1, updated_at = ? WHERE id IN ("
                "SELECT id FROM invocations WHERE invocation_type = 'Event' "
                "AND status IN ('accepted', 'running') "
                "AND (status = 'accepted' OR lease_until <= ?) "
                "ORDER BY created_at, id LIMIT ?" + self.dialect.claim_lock + ") "
                f"RETURNING {_INV_COLS}",
                (owner, now + lease_seconds, now, now, limit),
            )
        return sorted((_inv(r) for r in rows), key=lambda i: (i.created_at, i.id))

    def renew_lease(self, invocation_id: str, owner: str, lease_seconds: float) -> bool:
        _check_lease(lease_seconds)
        now = self._clock()
        with self._tx(True) as tx:
            rows = tx.rows(
                "UPDATE invocations SET lease_until = ?, updated_at = ? WHERE id = ? "
                "AND lease_owner = ? AND status = 'running' AND lease_until > ? RETURNING id",
                (now + lease_seconds, now, invocation_id, owner, now),
            )
        return bool(rows)

    def finish_invocation(
        self, invocation_id: str, status: str, result: Any = None, *, owner: str | None = None
    ) -> Invocation:
        if status not in FINISHED:
            raise Invalid(f"status must be succeeded or failed: {status!r}")
        try:
            result_json = None if result is None else _json(result)
        except (TypeError, ValueError) as e:
            raise Invalid(f"result must be JSON: {e}") from None
        with self._tx(True) as tx:
            inv = self._invocation(tx, invocation_id, lock=True)
            if inv.status in FINISHED:
                raise Conflict(f"invocation {invocation_id} is {inv.status} already")
            if owner is not None and inv.lease_owner != owner:
                raise Conflict(
                    f"invocation {invocation_id} is claimed by {inv.lease_owner}, not {owner}"
                )
            tx.run(
                "UPDATE invocations SET status = ?, result = ?, lease_until = NULL, "
                "updated_at = ? WHERE id = ?",
                (status, result_json, self._clock(), invocation_id),
            )
            return self._invocation(tx, invocation_id)

    # -- usage and the bill

    def record_usage(self, records: Sequence[object]) -> tuple[list[str], dict[str, str]]:
        now = self._clock()
        good, rejected = usage.parse_all(records)
        if not good:
            return [], rejected
        # One statement for the batch: a resent record is the row already there (DO
        # NOTHING), acknowledged and not counted twice. One statement, not one per row,
        # keeps the Python in this worker thread short: it shares the GIL with the loop.
        row = "(" + ", ".join("?" * 19) + ")"
        params: list = []
        for u in good:
            params += (u.id, u.tenant, u.function, u.version, u.price_class, u.own_class,
                       u.payer, u.depth, u.node, u.finished_at, u.cpu_s, u.gb_s, u.cpu_price,
                       u.own_cpu_price, u.memory_price, u.month, u.cost, u.premium, now)  # fmt: skip
        with self._tx(True) as tx:
            tx.run(
                f"INSERT INTO usage ({_USAGE_COLS}, month, cost, premium, recorded_at) "
                f"VALUES {', '.join([row] * len(good))} ON CONFLICT (id) DO NOTHING",
                params,
            )
        return [u.id for u in good], rejected

    def usage_records(self, tenant: str | None = None, month: str | None = None) -> list:
        where, params = _usage_filter(tenant, month)
        with self._tx(False) as tx:
            rows = tx.rows(f"SELECT {_USAGE_COLS} FROM usage{where} ORDER BY id", params)
        return [_usage(r) for r in rows]

    def bill(self, tenant: str, month: str) -> list:
        with self._tx(False) as tx:
            own = tx.rows(
                "SELECT function_name, price_class, COUNT(*), SUM(cpu_s), SUM(gb_s), "
                "SUM(cost) FROM usage WHERE tenant = ? AND month = ? "
                "GROUP BY function_name, price_class ORDER BY function_name, price_class",
                (tenant, month),
            )
            raised = tx.rows(
                "SELECT tenant, function_name, price_class, COUNT(*), SUM(cpu_s), "
                "SUM(premium) FROM usage WHERE payer = ? AND month = ? AND tenant <> payer "
                "GROUP BY tenant, function_name, price_class "
                "ORDER BY tenant, function_name, price_class",
                (tenant, month),
            )
        lines = [
            usage.BillLine(r[0], r[1], int(r[2]), float(r[3]), float(r[4]), float(r[5]))
            for r in own
        ]
        lines += [
            usage.BillLine(r[1], r[2], int(r[3]), float(r[4]), 0.0, float(r[5]), r[0], True)
            for r in raised
        ]
        return lines

    def month_spend(self, tenant: str, month: str) -> float:
        with self._tx(False) as tx:
            a = tx.rows(
                "SELECT COALESCE(SUM(cost), 0) FROM usage WHERE tenant = ? AND month = ?",
                (tenant, month),
            )[0][0]
            b = tx.rows(
                "SELECT COALESCE(SUM(premium), 0) FROM usage WHERE payer = ? AND month = ? "
                "AND tenant <> payer",
                (tenant, month),
            )[0][0]
        return float(a) + float(b)

    def schema_version(self) -> int:
        with self._tx(False) as tx:
            return int(tx.rows("SELECT MAX(version) FROM schema_version")[0][0] or 0)


def _usage_filter(tenant: str | None, month: str | None) -> tuple[str, tuple]:
    conds, params = [], []
    if tenant is not None:
        conds.append("tenant = ?")
        params.append(tenant)
    if month is not None:
        conds.append("month = ?")
        params.append(month)
    return (" WHERE " + " AND ".join(conds) if conds else ""), tuple(params)


def _usage(r: tuple[Any, ...]):
    return usage.Usage(
        id=r[0], tenant=r[1], function=r[2], version=r[3], price_class=r[4], own_class=r[5],
        payer=r[6], depth=int(r[7]), node=r[8], finished_at=float(r[9]), cpu_s=float(r[10]),
        gb_s=float(r[11]), cpu_price=float(r[12]), own_cpu_price=float(r[13]),
        memory_price=float(r[14]),
    )  # fmt: skip


def _check_lease(lease_seconds: object) -> None:
    if isinstance(lease_seconds, bool) or not isinstance(lease_seconds, int | float):
        raise Invalid(f"lease_seconds must be a number: {lease_seconds!r}")
    if lease_seconds <= 0:
        raise Invalid(f"lease_seconds must be positive: {lease_seconds!r}")

"""The ledger in PostgreSQL, for several gateways sharing one database.

- A small psycopg_pool of autocommit connections: a write is an explicit transaction
  (`conn.transaction()`), a read is one statement with no BEGIN/COMMIT round trips, which
  matters on the per-request lookups (keys, URL ids). A connection broken while idle fails
  the one call that meets it, and the pool replaces it.
- Row locks stand in for SQLite's single writer: a change to a function first takes
  `SELECT ... FOR UPDATE` on its $LATEST row, and the event claim picks with
  `FOR UPDATE SKIP LOCKED`, so two gateways claiming at once each take different events
  and neither waits for the other.
- Every connection runs with `synchronous_commit = on` whatever the server's default, so a
  committed record_event is on disk (or on a synchronous standby) when it returns.
- Migrations run on their own connection under `pg_advisory_xact_lock`, held until their
  transaction commits, so gateways starting together apply each migration once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors
from psycopg_pool import ConnectionPool

from xxnode.ledger.schema import Dialect, SqlStore, apply_migrations
from xxnode.ledger.store import Clock, Conflict, Invalid, LedgerError, NotFound

MIGRATION_LOCK = 0x78786C6564676572  # "xxledger": the advisory lock key of migrations
POOL_SIZE = 8  # asyncio.to_thread's executor has min(32, cpus + 4) threads; 8 is plenty


@functools.lru_cache(maxsize=512)
def _pg(sql: str) -> str:
    """schema.py's `?` placeholders as psycopg's."""
    return sql.replace("?", "%s")


class _Tx:
    def __init__(self, cur: psycopg.Cursor[Any]):
        self._cur = cur

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._cur.execute(_pg(sql), params)
        return self._cur.fetchall() if self._cur.description is not None else []

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._cur.execute(_pg(sql), params)
        return self._cur.rowcount


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SET synchronous_commit = on")


class PostgresStore(SqlStore):
    dialect = Dialect(
        blob="BYTEA",
        key='TEXT COLLATE "C"',
        for_update=" FOR UPDATE",
        claim_lock=" FOR UPDATE SKIP LOCKED",
    )

    def __init__(self, url: str, *, clock: Clock, pool_size: int = POOL_SIZE):
        super().__init__(clock)
        try:
            with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                with conn.cursor() as cur:
                    apply_migrations(_Tx(cur), self.dialect, self._clock())
        except psycopg.OperationalError as e:
            raise LedgerError(f"cannot open the ledger database: {e}") from e
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True},
            configure=_configure,
            open=True,
            name="xx-ledger",
        )

    @contextmanager
    def _tx(self, write: bool) -> Iterator[_Tx]:
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                if write:
                    with conn.transaction():
                        yield _Tx(cur)
                else:
                    yield _Tx(cur)
        # Only races reach these (the store checks first); say which kind it was.
        except errors.UniqueViolation as e:
            raise Conflict(f"exists already ({e.diag.message_primary})") from e
        except errors.ForeignKeyViolation as e:
            raise NotFound(f"refers to a row that is not there ({e.diag.message_primary})") from e
        except errors.CheckViolation as e:
            raise Invalid(str(e.diag.message_primary)) from e

    def close(self) -> None:
        self._pool.close()

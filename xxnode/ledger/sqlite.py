"""The ledger in one SQLite file, for a gateway that runs alone.

- WAL, so readers never wait for the writer and the writer never waits for readers; every
  write is `BEGIN IMMEDIATE`, which takes the one write lock up front (a deferred transaction
  that reads and then writes can fail to upgrade instead of waiting). `busy_timeout` makes a
  second process (or a second store object) wait its turn rather than fail.
- `synchronous=FULL` for the whole database: in WAL mode NORMAL may lose the last commits on
  power loss, and most of what this store writes is exactly what must not be lost (accepted
  events, results); the registry's own writes are too rare for their fsync to matter.
- Code blobs live in a table, not in files beside the database: one file to back up, and the
  code and the function that refers to it commit together, so a crash leaves neither an
  orphan file nor a function whose digest points at nothing. SQLite reads and writes a 50 MiB
  blob in one piece without trouble; `journal_size_limit` keeps the WAL from staying as big
  as the largest zip ever written once it has been checkpointed.
- Thread-safe by a small pool: a connection is used by one thread at a time, and threads
  share the pool, so any number of worker threads (`asyncio.to_thread`) can read at once.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from xxnode.ledger.schema import Dialect, SqlStore, apply_migrations
from xxnode.ledger.store import Clock, Conflict, Invalid, LedgerError, NotFound

BUSY_TIMEOUT_S = 10.0  # longest a writer waits for another's transaction (then "locked")
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024


class _Tx:
    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, params).rowcount


def _translate(e: sqlite3.IntegrityError) -> LedgerError:
    """Only races reach here (the store checks first); say which kind it was."""
    text = str(e)
    if text.startswith("UNIQUE") or "PRIMARY KEY" in text:
        return Conflict(f"exists already ({text})")
    if text.startswith("FOREIGN KEY"):
        return NotFound(f"refers to a row that is not there ({text})")
    return Invalid(text)


class SqliteStore(SqlStore):
    dialect = Dialect(blob="BLOB", key="TEXT", for_update="", claim_lock="")

    def __init__(self, path: str, *, clock: Clock):
        super().__init__(clock)
        self.path = path
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._closed = False
        conn = self._connect()
        try:
            self._switch_to_wal(conn)
            conn.execute("BEGIN IMMEDIATE")  # the migration lock: one opener at a time
            try:
                apply_migrations(_Tx(conn), self.dialect, self._clock())
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except BaseException:
            conn.close()
            raise
        self._idle.append(conn)

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: the module starts no transactions; _tx says BEGIN itself.
            # check_same_thread=False: the pool hands a connection to one thread at a time.
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.OperationalError as e:
            raise LedgerError(f"cannot open the ledger {self.path}: {e}") from e
        try:
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _switch_to_wal(self, conn: sqlite3.Connection) -> None:
        """WAL is a property of the file, so once is enough; but two openers of a new file
        race for it, and SQLite refuses the second switcher at once rather than calling the
        busy handler (each holds a shared lock the other waits on). The loser then waits
        for the winner by taking the write lock, which does wait, and looks again."""
        for _ in range(10):
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError as e:
                if "locked" not in str(e):
                    raise
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
                continue
            if mode != "wal":
                raise LedgerError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
            return
        raise LedgerError(f"{self.path}: could not switch to WAL mode: the file stays locked")

    def _acquire(self) -> sqlite3.Connection:
        with self._lock:
            if self._closed:
                raise LedgerError("the ledger store is closed")
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _release(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    @contextmanager
    def _tx(self, write: bool) -> Iterator[_Tx]:
        conn = self._acquire()
        try:
            if write:
                conn.execute("BEGIN IMMEDIATE")
            try:
                yield _Tx(conn)
                if write:
                    conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.IntegrityError as e:
            raise _translate(e) from e
        finally:
            self._release(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

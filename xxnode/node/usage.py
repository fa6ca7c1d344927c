"""The node's usage outbox: every finished invocation's usage record, kept on disk until the
ledger acknowledges it, then kept a while longer as what this node metered.

Exactly once, end to end: a record is written here (keyed by the invocation's cluster job
id) before the invocation's result leaves the node, and sent until a gateway answers that
the ledger holds that id; the ledger keeps one row per id, so a resend after a lost answer
or a restart is acknowledged, not counted again. The write commits to SQLite's WAL
(synchronous=NORMAL): it survives a kill -9 of the node, as the page cache keeps it; a power
cut may lose the last records, as it may the journal's unsynced `invoked` lines.

Records go to the gateway whose invocation they are (its URL rides in the spec), else to
any other this node has heard of: gateways share one ledger.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from pathlib import Path

import aiohttp

from xxnode.cluster import usage_link

log = logging.getLogger("xxnode")
KEEP_S = 35 * 86400.0  # acknowledged records kept this long: a month's metering, to compare
RETRY_S = (0.5, 1, 2, 5, 10, 30)  # pauses after a failed round, growing
CHECKPOINT_S = 2.0  # the WAL is folded into the database this often, off the event loop
LINGER_S = 0.1  # a round waits this long for more records: one POST (and one ledger
# commit) per batch, not per invocation, at the cost of 0.1 s more lag for budgets


class UsageOutbox:
    def __init__(self, path: Path, key: bytes, node_id: str):
        self.key, self.node_id = key, node_id
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")
        # The event loop writes here, so it must never checkpoint: a checkpoint fsyncs, and
        # a loop stalled on the disk stalls every invocation. The sender's thread does it.
        self.db.execute("PRAGMA wal_autocheckpoint = 0")
        self._cp = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._cp_at = 0.0
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS usage (id TEXT PRIMARY KEY, ledger TEXT NOT NULL, "
            "record TEXT NOT NULL, at REAL NOT NULL, acked REAL, rejected TEXT)"
        )
        # what a round reads: the unsent, by an index of them alone (the table keeps a
        # month of acknowledged records; a round must not scan them)
        self.db.execute(
            "CREATE INDEX IF NOT EXISTS unsent ON usage (at) "
            "WHERE acked IS NULL AND rejected IS NULL"
        )
        self.db.execute("DELETE FROM usage WHERE acked < ?", (time.time() - KEEP_S,))
        self.ledgers = {u for (u,) in self.db.execute("SELECT DISTINCT ledger FROM usage") if u}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._session = None  # aiohttp's, made on the loop at the first send
        self.stats = {"sent": 0, "rejected": 0, "send_failures": 0}

    def add(self, record: dict, ledger: str) -> None:
        """Durable when it returns; one row per id, whatever calls it again."""
        if ledger:
            self.ledgers.add(ledger)
        self.db.execute(
            "INSERT OR IGNORE INTO usage (id, ledger, record, at) VALUES (?, ?, ?, ?)",
            (record["id"], ledger, json.dumps(record, sort_keys=True), time.time()),
        )
        self._wake.set()

    def counts(self) -> dict:
        (unsent,) = self.db.execute(
            "SELECT COUNT(*) FROM usage WHERE acked IS NULL AND rejected IS NULL"
        ).fetchone()
        acked, rejected = self.db.execute(
            "SELECT COUNT(acked), COUNT(rejected) FROM usage"
        ).fetchone()  # a scan, for `xxctl status` only
        return {"unsent": unsent, "acked": acked, "rejected": rejected} | self.stats

    # -- sending ----------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.db.close()
        self._cp.close()

    async def _run(self) -> None:
        failures = 0
        while True:
            if failures:  # new records do not hurry a retry: the ledger is not answering
                await asyncio.sleep(RETRY_S[min(failures, len(RETRY_S)) - 1])
            else:
                await self._wake.wait()
                await asyncio.sleep(LINGER_S)
            self._wake.clear()
            try:
                sent_all = await self._round()
            except Exception:  # never lose the sender: the records stay for the next round
                log.exception("usage: sending failed")
                sent_all = False
            failures = 0 if sent_all else failures + 1
            if not sent_all:
                self.stats["send_failures"] += 1
            if time.monotonic() - self._cp_at > CHECKPOINT_S:
                self._cp_at = time.monotonic()
                await asyncio.to_thread(self._cp.execute, "PRAGMA wal_checkpoint(PASSIVE)")

    async def _round(self) -> bool:
        """Send the unacknowledged records (more rounds at once while batches are full);
        True if all went. Records that arrive meanwhile wait for the next round's linger,
        so a busy node sends a batch per linger, not one per invocation."""
        while True:
            rows = self.db.execute(
                "SELECT id, ledger, record FROM usage WHERE acked IS NULL AND rejected IS NULL "
                "ORDER BY at LIMIT ?",
                (usage_link.MAX_BATCH,),
            ).fetchall()
            if not rows:
                return True
            by_ledger: dict[str, list[dict]] = {}
            for _, ledger, rec in rows:
                by_ledger.setdefault(ledger, []).append(json.loads(rec))
            for ledger, batch in by_ledger.items():
                others = sorted(self.ledgers - {ledger})
                if not await self._send(batch, [ledger, *others]):
                    return False
            if len(rows) < usage_link.MAX_BATCH:
                return True

    async def _send(self, batch: list[dict], urls: list[str]) -> bool:
        for url in [u for u in urls if u]:
            if self._session is None:
                self._session = aiohttp.ClientSession()
            try:
                acked, rejected = await usage_link.send(
                    self._session, url, self.key, self.node_id, batch
                )
            except usage_link.SendError as e:
                log.warning("%s", e)
                continue
            now = time.time()
            self.db.executemany(
                "UPDATE usage SET acked = ? WHERE id = ?", [(now, i) for i in acked]
            )
            self.db.executemany(
                "UPDATE usage SET rejected = ? WHERE id = ?",
                [(why, i) for i, why in rejected.items()],
            )
            for i, why in rejected.items():
                log.error("usage: the ledger refused record %s: %s", i, why)
            self.stats["sent"] += len(acked)
            self.stats["rejected"] += len(rejected)
            missing = {r["id"] for r in batch} - set(acked) - set(rejected)
            return not missing
        return False


def read(path: Path) -> tuple[int, dict[str, dict]]:
    """(records not yet acknowledged, every record kept by id) of an outbox file, read from
    outside the node (audits, tests): what the node metered."""
    db = sqlite3.connect(path)
    try:
        (unsent,) = db.execute(
            "SELECT COUNT(*) FROM usage WHERE acked IS NULL AND rejected IS NULL"
        ).fetchone()
        records = [json.loads(r) for (r,) in db.execute("SELECT record FROM usage")]
    finally:
        db.close()
    return unsent, {r["id"]: r for r in records}

"""The shard's durable state: what it acknowledged survives a crash and a restart.

Without it a shard is memory only, and a *detached* submission (the submitter took the
ack and left) dies with its shard.  With ``[shard] state_dir`` the shard answers only
what is on disk: SUBMIT_ACK after the job is journaled, GRANT after the grant is, the
ACK of a DONE after the finish is -- so a crash between the two loses nothing the other
side believes done: it retransmits, and the restarted shard answers from its journal.

Records (xxnode.journal, bytes as hex):
  submitted {job, cls, arbiter, spec, size, digest, inline}   input > 1 KiB: payloads/DIGEST
  granted   {job, node}                                       the shard arbitrated
  finished  {job, status}

Writes are group-committed by one writer thread: records that arrive while a batch is
being written and fdatasync'd go together in the next one, so the event loop never
waits on the disk and a burst costs one sync, not one per job.  On start the journal
is replayed and rewritten with only what is still needed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from xxnode.journal import Journal

JOURNAL = "shard.journal"
log = logging.getLogger("xxshard")


@dataclass
class Recovered:
    """What the journal says: jobs not finished (submitted records, by job id), who was
    granted what, and the finished jobs' statuses (oldest first)."""

    jobs: dict[bytes, dict] = field(default_factory=dict)
    grants: dict[bytes, str] = field(default_factory=dict)
    finished: dict[bytes, int] = field(default_factory=dict)


class ShardStore:
    def __init__(self, state_dir: str | Path, keep_finished: int = 100_000) -> None:
        self.dir = Path(state_dir)
        self.payload_dir = self.dir / "payloads"
        # every job's argv and input is in here: owner only, also for a dir made by an
        # older version (mkdir's mode does not apply to an existing dir, nor past umask)
        self.payload_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (self.dir, self.payload_dir):
            os.chmod(d, 0o700)
        self.keep_finished = keep_finished
        self.recovered = self._compact(self._replay())
        self._journal = Journal(self.dir / JOURNAL)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="xxshard-store")
        self._batch: list[tuple[bytes, bytes | None, asyncio.Future]] = []
        self._writing = False
        self.syncs = 0

    # recovery ------------------------------------------------------------------------
    def _replay(self) -> Recovered:
        r = Recovered()
        for rec in Journal.replay(self.dir / JOURNAL):
            try:
                jid = bytes.fromhex(rec["job"])
                ev = rec["ev"]
                if ev == "submitted":
                    _check_submitted(rec)
                    r.jobs[jid] = rec
                elif ev == "granted":
                    r.grants[jid] = str(rec["node"])
                elif ev == "finished":
                    r.jobs.pop(jid, None)
                    r.grants.pop(jid, None)
                    r.finished.pop(jid, None)
                    r.finished[jid] = int(rec["status"])
            except (KeyError, TypeError, ValueError) as e:
                log.warning("%s: unusable record skipped (%s): %.200s", JOURNAL, e, rec)
        for jid, rec in list(r.jobs.items()):
            if (
                rec["size"] > len(rec["inline"]) // 2
                and self.payload(bytes.fromhex(rec["digest"])) is None
            ):
                del r.jobs[jid]  # its input never reached the disk: it was never acked
                r.grants.pop(jid, None)
        while len(r.finished) > self.keep_finished:
            del r.finished[next(iter(r.finished))]
        return r

    def _compact(self, r: Recovered) -> Recovered:
        """Rewrite the journal with only what a restart needs (atomically: rename)."""
        lines = [_line(rec) for rec in r.jobs.values()]
        lines += [_line(_granted(j, n)) for j, n in r.grants.items()]
        lines += [_line(_finished(j, s)) for j, s in r.finished.items()]
        tmp = self.dir / (JOURNAL + ".new")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # a leftover .new keeps its old mode otherwise
            f.write(b"".join(lines))
            f.flush()
            os.fdatasync(f.fileno())
        os.replace(tmp, self.dir / JOURNAL)
        _sync_dir(self.dir)
        live = {rec["digest"] for rec in r.jobs.values()}
        for p in self.payload_dir.iterdir():
            if p.name not in live:
                p.unlink(missing_ok=True)
        return r

    def payload(self, dig: bytes) -> bytes | None:
        try:
            return (self.payload_dir / dig.hex()).read_bytes()
        except FileNotFoundError:
            return None

    # durable writes --------------------------------------------------------------------
    def submitted(self, job, payload: bytes) -> asyncio.Future:
        """Durable once the future is done; ``job`` is the shard's Job (its PLACE)."""
        p = job.place
        rec = {
            "ev": "submitted",
            "job": job.id.hex(),
            "cls": job.cls,
            "arbiter": p.arbiter,
            "spec": p.spec,
            "size": p.size,
            "digest": p.digest.hex(),
            "inline": p.inline.hex(),
        }
        return self._commit(_line(rec), payload if not p.inline and p.size else None, p.digest)

    def granted(self, jid: bytes, node: str) -> asyncio.Future:
        return self._commit(_line(_granted(jid, node)))

    def finished(self, jid: bytes, status: int, digest: bytes | None = None) -> asyncio.Future:
        if digest is not None:
            (self.payload_dir / digest.hex()).unlink(missing_ok=True)
        return self._commit(_line(_finished(jid, status)))

    def _commit(self, line: bytes, payload=None, dig: bytes = b"") -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._batch.append((line, (dig, payload) if payload is not None else None, fut))
        if not self._writing:
            self._writing = True
            asyncio.get_running_loop().call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        if not batch:
            self._writing = False
            return
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._writer, self._write, batch)
        work.add_done_callback(lambda w: self._written(batch, w))

    def _write(self, batch) -> None:  # the writer thread
        wrote_payload = False
        for _, payload, _ in batch:
            if payload is not None:
                dig, data = payload
                path = self.payload_dir / dig.hex()
                with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fdatasync(f.fileno())
                wrote_payload = True
        if wrote_payload:
            _sync_dir(self.payload_dir)
        self._journal.append_raw(b"".join(line for line, _, _ in batch), sync=True)

    def _written(self, batch, work: asyncio.Future) -> None:
        self.syncs += 1
        exc = work.exception()
        if exc is not None:  # nothing in the batch is acknowledged; the peers retransmit
            log.error("%s: write failed: %s", JOURNAL, exc)
        for _, _, fut in batch:
            if not fut.done():
                if exc is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(exc)
        self._flush()  # what arrived meanwhile: the next group

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._journal.close()


def _check_submitted(rec: dict) -> None:
    """A submitted record as _recover will read it, or ValueError/KeyError/TypeError."""
    if not isinstance(rec["cls"], str) or not isinstance(rec["arbiter"], str):
        raise TypeError("cls/arbiter")
    if not isinstance(rec["spec"], dict) or not isinstance(rec["size"], int):
        raise TypeError("spec/size")
    if len(bytes.fromhex(rec["digest"])) != 32 or len(bytes.fromhex(rec["job"])) != 16:
        raise ValueError("digest/job length")
    bytes.fromhex(rec["inline"])


def _line(rec: dict) -> bytes:
    return Journal.encode(rec)


def _granted(jid: bytes, node: str) -> dict:
    return {"ev": "granted", "job": jid.hex(), "node": node}


def _finished(jid: bytes, status: int) -> dict:
    return {"ev": "finished", "job": jid.hex(), "status": status}


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

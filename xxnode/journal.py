"""A durable journal: one JSON object per line, appended, never rewritten.

Every record has "ev" (what happened) and "job".  The node daemon's records
(xxnode/node/daemon.py; a job's "job" is its local id, j000001...):
  accepted  {job, t, spec[, cluster]}        fsync'd before the client hears "accepted";
                                             the class is spec["class"]; cluster =
                                             {job, arbiter, shard} when a shard placed it
  started   {job, t, pid, shim_pid}          not fsync'd: the state dir's shim file decides
  kill      {job, t, reason}                 fsync'd before cgroup.kill, so the reason survives
  finished  {job, t, result}                 fsync'd; billing reads these (result has class,
                                             state, cpu_ms, price and charge_uc = cpu s x price)
Its dispatcher's (xxnode/node/executor.py; "job" is the cluster job id in hex):
  placed    {job, t, shard, place}           fsync'd before the shard hears ACCEPT
  done_acked / done_abandoned {job, t}       the job's DONE was acknowledged / given up
The shard's are in xxnode/shard/store.py.
A torn last line (crash mid-write) is skipped on replay and the next append starts a new line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("xxnode")


class Journal:
    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        size = os.fstat(self._fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")  # seal a torn record

    def append(self, rec: dict, sync: bool = False) -> None:
        self.append_raw(self.encode(rec), sync)

    def append_raw(self, lines: bytes, sync: bool = False) -> None:
        """Records already encoded (a group of them: one write, one sync)."""
        os.write(self._fd, lines)
        if sync:
            os.fdatasync(self._fd)

    @staticmethod
    def encode(rec: dict) -> bytes:
        return (json.dumps(rec, separators=(",", ":")) + "\n").encode()

    def close(self) -> None:
        os.close(self._fd)

    @staticmethod
    def replay(path: Path) -> Iterator[dict]:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return
        with f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    log.warning("journal %s line %d: unreadable record skipped", path, n)
                    continue
                if isinstance(rec, dict) and "ev" in rec and "job" in rec:
                    yield rec

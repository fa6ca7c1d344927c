"""How the daemons' log lines are written: text (the default), JSON, or the systemd journal's
native protocol, one event a record.

* text: ``2026-12-03T10:20:00.123Z xxshard INFO job 5f.. done on node0`` (UTC; under systemd
  the journal stamps each line itself, so the stamp is left out there);
* json: one object a line, ``{"ts": "...Z", "level": "info", "prog": "xxnode", "logger":
  "xxnode", "msg": "...", "invocation": "...", "class": "high", ...}``;
* journal: each record one datagram to journald's socket (``KEY=VALUE`` fields: MESSAGE,
  PRIORITY, SYSLOG_IDENTIFIER, and XX_INVOCATION, XX_JOB, XX_CLASS, XX_TENANT, ... for what
  the line is about), so ``journalctl XX_INVOCATION=<id>`` finds one invocation's lines in
  every daemon. Chosen by ``--log-target journal``, or by ``auto`` when stderr *is* the
  journal (``$JOURNAL_STREAM`` names stderr's device:inode, as systemd(1) sets it).

A call site says what a line is about with ``extra=about(...)``::

    log.info("job %s done", jid, extra=about(job=jid, cls="high", invocation=inv))
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import logging
import os
import socket
import struct
import sys
import time
import uuid

JOURNAL_SOCKET = "/run/systemd/journal/socket"
ENV_SOCKET = "XX_JOURNAL_SOCKET"  # another socket path: the tests' stand-in for journald
FORMATS = ("text", "json")
TARGETS = ("auto", "stderr", "journal")
# what ``about`` takes; "cls" stands for "class" (a keyword in Python)
FIELDS = ("invocation", "job", "class", "tenant", "function", "node", "env")
# syslog(3) priorities, as journald's PRIORITY field wants them
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


def about(*, cls: str | None = None, **fields: object) -> dict:
    """``extra=`` for a log call: the invocation, job, class, tenant... a line is about."""
    if cls is not None:
        fields["class"] = cls
    bad = set(fields) - set(FIELDS)
    if bad:
        raise TypeError(f"about(): unknown field {sorted(bad)[0]!r} (known: {', '.join(FIELDS)})")
    return {"xx": {k: str(v) for k, v in fields.items() if v is not None and v != ""}}


def invocation_id(job: bytes) -> str:
    """A cluster job id as every daemon logs it: a 16-byte id in UUID form (the gateway's
    x-amzn-RequestId is that UUID), anything else in hex."""
    return str(uuid.UUID(bytes=job)) if len(job) == 16 else job.hex()


def _stamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
        f".{int(record.msecs):03d}Z"
    )


class TextFormatter(logging.Formatter):
    converter = time.gmtime

    def __init__(self, prog: str, stamp: bool = True) -> None:
        head = "%(asctime)s.%(msecs)03dZ " if stamp else ""
        super().__init__(f"{head}{prog} %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (UTC), level, prog, logger, msg, the fields of ``about``,
    and exc (the traceback) when there is one."""

    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": _stamp(record),
            "level": record.levelname.lower(),
            "prog": self.prog,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        xx = getattr(record, "xx", None)
        if isinstance(xx, dict):
            for k, v in xx.items():
                doc.setdefault(k, v)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


# -- the journal's native protocol ------------------------------------------------------------
def encode_fields(fields: list[tuple[str, str]]) -> bytes:
    """systemd's native journal protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL): one field a
    line, ``KEY=VALUE\\n``; a value holding a newline goes as ``KEY\\n``, its length as a
    64-bit little-endian integer, the value, ``\\n``. Keys: A-Z, 0-9, _, not leading _."""
    out = bytearray()
    for key, value in fields:
        v = value.encode("utf-8", "replace")
        k = key.encode()
        if b"\n" in v:
            out += k + b"\n" + struct.pack("<Q", len(v)) + v + b"\n"
        else:
            out += k + b"=" + v + b"\n"
    return bytes(out)


def journal_fields(record: logging.LogRecord, prog: str, message: str) -> list[tuple[str, str]]:
    """A record as journal fields: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, where in the code,
    and XX_<FIELD> for each field of ``about``."""
    fields = [
        ("MESSAGE", message),
        ("PRIORITY", str(PRIORITY.get(record.levelno, 2 if record.levelno > 40 else 6))),
        ("SYSLOG_IDENTIFIER", prog),
        ("LOGGER", record.name),
        ("CODE_FILE", record.pathname),
        ("CODE_LINE", str(record.lineno)),
        ("CODE_FUNC", record.funcName),
    ]
    fields = [(k, v) for k, v in fields if v is not None]
    xx = getattr(record, "xx", None)
    if isinstance(xx, dict):
        fields += [("XX_" + k.upper(), str(v)) for k, v in xx.items() if k.isidentifier()]
    return fields


class JournalHandler(logging.Handler):
    """Each record one datagram to journald; one too large for a datagram goes in a sealed
    memfd, as sd_journal_send does. Should the socket refuse, the record goes to
    ``fallback`` (stderr) instead of being lost."""

    def __init__(self, prog: str, path: str = JOURNAL_SOCKET, fallback=None) -> None:
        super().__init__()
        self.prog, self.path = prog, path
        self.fallback = fallback
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = encode_fields(journal_fields(record, self.prog, self.format(record)))
            try:
                self.sock.sendto(data, self.path)
            except OSError as e:
                if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                self._send_memfd(data)
        except OSError:
            if self.fallback is not None:
                self.fallback.handle(record)
        except Exception:
            self.handleError(record)

    def _send_memfd(self, data: bytes) -> None:
        fd = os.memfd_create("xx-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            self.sock.sendmsg([], rights, 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.sock.close()
        super().close()


def stderr_is_journal(env=os.environ) -> bool:
    """systemd sets $JOURNAL_STREAM to stderr's device:inode when stderr is the journal; a
    child whose stderr was redirected inherits the variable but not the match."""
    dev, sep, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


def handler_for(prog: str, fmt: str = "text", target: str = "auto") -> logging.Handler:
    """The handler a daemon logs through: the journal's socket when asked (or, with
    ``auto``, when stderr is the journal and its socket is there), else stderr."""
    stream = logging.StreamHandler(sys.stderr)
    under_journal = stderr_is_journal()
    if fmt == "json":
        stream.setFormatter(JsonFormatter(prog))
    else:
        stream.setFormatter(TextFormatter(prog, stamp=not under_journal))
    path = os.environ.get(ENV_SOCKET) or JOURNAL_SOCKET
    if target == "journal" or (target == "auto" and under_journal and os.path.exists(path)):
        return JournalHandler(prog, path, fallback=stream)
    return stream

"""A throwaway PostgreSQL server for tests: its own cluster in a temporary directory, listening
only on a unix socket there (no TCP, so no port to collide on), gone when stopped.

Debian's `postgresql` package (tools/setup) provides the binaries; no system cluster is used.
PostgreSQL refuses to run as root, so as root the cluster belongs to `nobody` (its directory
is chown'd to it, under /dev/shm or /tmp where nobody can reach it); otherwise it runs as the
caller.
Durability is switched off (`fsync=off`): nothing here outlives the session, and it keeps
CREATE DATABASE and commits fast.

    with PostgresServer() as pg:
        url = pg.create_database("t1")   # postgresql:///t1?host=...&user=xx
        ...
        pg.drop_database("t1")

Readiness is the server's own log line, read from its stderr as it is written; a server that
exits or does not get ready raises PostgresError with its log, so a test that needs it fails
loudly instead of skipping.
"""

from __future__ import annotations

import atexit
import collections
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote

SUPERUSER = "xx"
READY = "database system is ready to accept connections"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class PostgresError(RuntimeError):
    pass


def find_bindir() -> Path:
    """The newest /usr/lib/postgresql/<major>/bin that has both initdb and postgres."""
    found = [
        Path(d)
        for d in glob.glob("/usr/lib/postgresql/*/bin")
        if os.access(Path(d) / "initdb", os.X_OK) and os.access(Path(d) / "postgres", os.X_OK)
    ]
    if not found:
        raise PostgresError("no PostgreSQL under /usr/lib/postgresql/*/bin: run tools/setup")
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)


def _scratch(as_root: bool) -> str | None:
    """tmpfs when there is one (CREATE DATABASE copies a whole template: on a busy disk that
    alone took 0.3 s a test); as root, a place nobody can reach, not a caller's TMPDIR."""
    for d in ("/dev/shm", "/tmp"):
        if os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK):
            return d
    return None if not as_root else "/tmp"


class PostgresServer:
    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.root: Path | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=200)
        self._ready = threading.Event()  # set on the ready line, or at EOF
        self._saw_ready = False
        self._drain: threading.Thread | None = None

    # -- life

    def start(self) -> PostgresServer:
        as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="xx-pg-", dir=_scratch(as_root)))
        atexit.register(self.stop)  # a session that dies without its finalizers
        try:
            self._start(as_root)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, as_root: bool) -> None:
        assert self.root is not None
        user: dict[str, Any] = {}
        if as_root:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
            user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        data = self.root / "data"
        init = subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust",
             "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"],
            cwd=self.root, env=env, capture_output=True, text=True, **user,
        )  # fmt: skip
        if init.returncode != 0:
            raise PostgresError(f"initdb failed ({init.returncode}):\n{init.stdout}{init.stderr}")
        self._proc = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(data), "-k", str(self.root), "-h", "",
             "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=200",
             "-c", "logging_collector=off", "-c", "log_destination=stderr"],
            cwd=self.root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True, **user,
        )  # fmt: skip
        self._drain = threading.Thread(target=self._read_log, name="postgres-log", daemon=True)
        self._drain.start()
        if not self._ready.wait(START_TIMEOUT_S) or not self._saw_ready:
            raise PostgresError(f"postgres did not start; its log:\n{self.log()}")

    def _read_log(self) -> None:
        """Keeps the pipe drained for as long as the server lives (a full pipe would stall
        it), and says when it is ready or gone."""
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            self._log.append(line.rstrip("\n"))
            if READY in line:
                self._saw_ready = True
                self._ready.set()
        self._ready.set()  # EOF: it exited (before getting ready, if start() still waits)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back, disconnect, exit), then the directory."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and self._drain is not None:
            self._drain.join()
            if proc.stderr is not None:
                proc.stderr.close()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return "\n".join(self._log)

    # -- databases

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL for the socket directory: postgresql:///DB?host=DIR&user=xx."""
        assert self.root is not None, "not started"
        return f"postgresql:///{dbname}?host={quote(str(self.root), safe='/')}&user={SUPERUSER}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self, name: str) -> str:
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

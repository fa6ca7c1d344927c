"""xxctl tenant create | list | set | key, xxctl bill, and xxctl up — the gateway's side of xxctl.

`tenant` commands act on the gateway's store: --store URL, else $XX_STORE, else the store
of `xxctl up`'s state dir (/var/lib/xx/up). `tenant create` prints an access key id and
its secret once; they are never shown again.

`xxctl up` runs a whole XX on this machine, in the foreground: an xxshard, the local xxnode
(joined to it) and an xxgate in front, with embedded defaults — SQLite in the state dir, a
generated cluster key, the built-in classes and a tenant `default`. It prints
`endpoint: http://127.0.0.1:PORT` and `credentials: PATH` (an AWS shared-credentials file,
profile `default`, of that tenant). Ctrl-C or SIGTERM stops everything; no process stays.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from xxnode import wire
from xxnode.config.defaults import builtin_classes
from xxnode.ledger.bill import bill_doc, bill_text
from xxnode.ledger.store import KEEP, Conflict, LedgerError, NotFound, open_store
from xxnode.policy.budget import month_of

UP_DIR = Path("/var/lib/xx/up")
DEFAULT_TENANT = "default"


class _Usage(Exception):
    """One line on stderr, exit 2."""


def register(sub) -> None:
    t = sub.add_parser("tenant", help="tenants of the gateway and their access keys")
    tsub = t.add_subparsers(dest="tenant_command", metavar="COMMAND", required=True)

    def add(name: str, help: str, func):
        p = tsub.add_parser(name, help=help)
        p.add_argument("--store", metavar="URL", help="sqlite:///PATH or postgresql://...")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=lambda args: _guard(func, args), command=f"tenant {name}")
        return p

    p = add("create", "a tenant and its first access key (the secret is shown once)", cmd_create)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--default-class", metavar="C", help="class of its untagged functions")
    add("list", "the tenants", cmd_list)
    p = add("set", "change a tenant", cmd_set)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--default-class", metavar="C")
    p.add_argument("--budget", metavar="AMOUNT",
                   help="monthly budget in µ¢ (the classes' price unit); 'none' removes it")  # fmt: skip
    p = add("key", "a new access key for a tenant (the secret is shown once)", cmd_key)
    p.add_argument("name", metavar="NAME")

    b = sub.add_parser("bill", help="a month's usage and cost, per function and class")
    b.add_argument("--tenant", metavar="T", help="one tenant (default: every tenant)")
    b.add_argument("--month", metavar="YYYY-MM", help="default: this month (UTC)")
    b.add_argument("--store", metavar="URL", help="sqlite:///PATH or postgresql://...")
    b.add_argument("--json", action="store_true", help="machine-readable output")
    b.set_defaults(func=lambda args: _guard(cmd_bill, args), command="bill")

    u = sub.add_parser("up", help="a whole XX on this machine: gateway, shard, node")
    u.add_argument("--state-dir", type=Path, default=UP_DIR, help=f"default {UP_DIR}")
    u.add_argument("--port", type=int, default=0, help="the gateway's port (default: any free)")
    u.add_argument(
        "--store", metavar="URL", help="the gateway's store (default: SQLite in the state dir)"
    )
    u.add_argument(
        "--metrics", metavar="HOST:PORT",
        help="Prometheus /metrics: the gateway's at PORT, the shard's at PORT+1, the node's at PORT+2",
    )  # fmt: skip
    u.set_defaults(func=lambda args: _guard(cmd_up, args), command="up")


def _guard(func, args) -> int:
    try:
        return func(args)
    except (_Usage, LedgerError, ValueError, OSError) as e:
        print(f"xxctl {args.command}: {e}", file=sys.stderr)
        return 2


def _store(args):
    url = args.store or os.environ.get("XX_STORE") or f"sqlite:///{UP_DIR / 'gateway.db'}"
    return open_store(url)


def _class_ok(cls: str | None) -> str:
    classes = builtin_classes()
    if cls is None:
        return min(classes, key=lambda c: c.price).name
    if classes.get(cls) is None:
        raise _Usage(f"--default-class: no class {cls!r} (have {', '.join(classes.names())})")
    return cls


def cmd_create(args) -> int:
    cls = _class_ok(args.default_class)
    with _store(args) as s:
        try:
            t = s.create_tenant(args.name, cls)
        except Conflict:
            raise _Usage(
                f"tenant {args.name!r} exists (xxctl tenant key {args.name} adds a key)"
            ) from None
        k = s.create_key(t.name)
    _print_key(args, t.name, t.default_class, k)
    return 0


def cmd_key(args) -> int:
    with _store(args) as s:
        try:
            t = s.get_tenant(args.name)
        except NotFound:
            raise _Usage(f"no tenant {args.name!r}") from None
        k = s.create_key(t.name)
    _print_key(args, t.name, t.default_class, k)
    return 0


def _print_key(args, tenant: str, cls: str, k) -> None:
    out = {"tenant": tenant, "default_class": cls, "access_key_id": k.access_key_id,
           "secret_access_key": k.secret}  # fmt: skip
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"tenant {tenant} (default class {cls})")
        print(f"aws_access_key_id = {k.access_key_id}")
        print(f"aws_secret_access_key = {k.secret}")
        print("(the secret is not shown again)", file=sys.stderr)


def cmd_list(args) -> int:
    with _store(args) as s:
        ts = s.list_tenants()
    if args.json:
        print(
            json.dumps([{"tenant": t.name, "default_class": t.default_class} for t in ts], indent=2)
        )
    else:
        for t in ts:
            print(f"{t.name:<24} {t.default_class}")
    return 0


def cmd_set(args) -> int:
    budget = KEEP
    if args.budget is not None:
        budget = None if args.budget.lower() == "none" else _amount(args.budget)
    with _store(args) as s:
        try:
            t = s.set_tenant(
                args.name,
                default_class=_class_ok(args.default_class) if args.default_class else None,
                budget=budget,
            )
        except NotFound:
            raise _Usage(f"no tenant {args.name!r}") from None
    doc = {"tenant": t.name, "default_class": t.default_class, "budget": t.budget}
    shown = "none" if t.budget is None else f"{t.budget:g} µ¢ per month"
    print(
        json.dumps(doc)
        if args.json
        else f"{t.name}: default class {t.default_class}, budget {shown}"
    )
    return 0


def _amount(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise _Usage(f"--budget: a number of µ¢ or 'none', not {text[:32]!r}") from None
    if not (v > 0 and v < float("inf")):
        raise _Usage("--budget: a positive number of µ¢ per month")
    return v


def cmd_bill(args) -> int:
    month = args.month or month_of(time.time())
    with _store(args) as s:
        names = [args.tenant] if args.tenant else [t.name for t in s.list_tenants()]
        try:
            docs = [bill_doc(s, n, month) for n in names]
        except NotFound:
            raise _Usage(f"no tenant {args.tenant!r}") from None
    if args.json:
        print(json.dumps(docs[0] if args.tenant else docs, indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(bill_text(d) for d in docs))
    return 0


# -- xxctl up ------------------------------------------------------------------------------
CONTROL_PRIORITY = 40  # the node daemon's own (daemon_priority): above every class


def _control_plane() -> None:
    """In the shard's and the gateway's child before exec: SCHED_FIFO above every class,
    as the node daemon runs. On one machine they share the CPUs with the functions, and a
    high-class request must not wait behind low-class work at the front door either. Their
    threads inherit it; neither starts processes."""
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(CONTROL_PRIORITY))


RESTARTS = 5  # a daemon that dies more often than this in RESTART_WINDOW stops `up`
RESTART_WINDOW = 60.0


class _Up:
    """The three daemons of a one-machine XX, started in order and stopped in reverse; one
    that dies is started again (as systemd's Restart=on-failure would), with the same
    address, so what it held resumes from its state dir: the shard's journal, the node's
    journal and cgroups, the gateway's store."""

    def __init__(self, state: Path, port: int, store: str | None = None, metrics: str = ""):
        self.state, self.port = state, port
        self.store = store  # None: SQLite in the state dir
        self.metrics = metrics  # HOST:PORT: gateway's /metrics; the shard's +1, the node's +2
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.again: list[tuple[list[str], bool]] = []  # per proc: argv to restart it, control
        self.restarts: dict[int, list[float]] = {}
        # a cgroup subtree and a uid range of this state dir's own: two `up`s on one machine
        # (or a test's beside a user's) must neither clear nor share each other's
        h = int(hashlib.sha256(str(state).encode()).hexdigest()[:8], 16)
        self.cgroup_root = f"xx-up-{h:08x}"
        self.functions: dict = {"uid_first": 1_000_000 + h % 4096 * 10_000, "uid_count": 10_000}
        self.done = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> tuple[str, Path]:
        st = self.state
        st.mkdir(parents=True, exist_ok=True)
        os.chmod(st, 0o700)
        key = st / "cluster.key"
        if not key.exists():
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, secrets.token_hex(32).encode())
            os.close(fd)
        py = sys.executable

        def shard_argv(listen: str) -> list[str]:
            return [py, "-m", "xxnode.shard.main", "--listen", listen, "--key-file", str(key),
                    "--state-dir", str(st / "shard"), *self._metrics_flag(1)]  # fmt: skip

        shard = self._spawn("xxshard", shard_argv("127.0.0.1:0"), control=True)
        line = shard.stdout.readline()
        if "listening on" not in line:
            raise _Usage(f"xxshard did not start: {line.strip() or 'no output'}")
        shard_addr = line.split()[-1]
        self.again[-1] = (shard_argv(shard_addr), True)  # restarted on the address it has
        node_toml = st / "node.toml"
        node_toml.write_text(
            f'[node]\nstate_dir = "{st / "node"}"\nsocket = "{st / "xxnode.sock"}"\n'
            f'cgroup_root = "{self.cgroup_root}"\n'
            f'[cluster]\nshards = ["{shard_addr}"]\nkey_file = "{key}"\n'
            f'listen = "127.0.0.1:0"\nnode_id = "local"\n'
            "[functions]\n" + "".join(f"{k} = {v!r}\n" for k, v in self.functions.items())
        )
        rd, wr = os.pipe()
        node_argv = [py, "-m", "xxnode.node.main", "--config", str(node_toml),
                     *self._metrics_flag(2)]  # fmt: skip
        self._spawn("xxnode", node_argv + ["--ready-fd", str(wr)], pass_fds=(wr,))
        self.again[-1] = (node_argv, False)  # restarted without the ready fd
        os.close(wr)
        with os.fdopen(rd, "rb") as f:
            if not f.read(1):
                raise _Usage(f"xxnode did not start (its log: {st / 'xxnode.log'})")
        port = self.port or _free_port()
        url = f"http://127.0.0.1:{port}"
        db = self.store or f"sqlite:///{st / 'gateway.db'}"
        self._gateway_argv = lambda port: [
            py, "-m", "xxnode.gateway.main", "--listen", f"127.0.0.1:{port}", "--store", db,
            "--shards", shard_addr, "--key-file", str(key), "--public-url", f"http://127.0.0.1:{port}",
            *self._metrics_flag(0),
        ]  # fmt: skip
        self.add_gateway(port)
        return url, self._credentials(db)

    def _metrics_flag(self, offset: int) -> list[str]:
        if not self.metrics:
            return []
        host, port = wire.parse_addr(self.metrics)
        return ["--metrics-listen", f"{host}:{port + offset}"]

    def add_gateway(self, port: int, event_workers: int | None = None) -> str:
        """One more xxgate on the same store and shard (several share a PostgreSQL store)."""
        extra = [] if event_workers is None else ["--event-workers", str(event_workers)]
        gate = self._spawn("xxgate", self._gateway_argv(port) + extra, control=True)
        line = gate.stdout.readline()
        if "listening on" not in line:
            log = self.state / "xxgate.log"
            raise _Usage(f"xxgate did not start: {line.strip() or 'no output'} (log: {log})")
        return f"http://127.0.0.1:{port}"

    def _spawn(self, name: str, argv: list[str], pass_fds=(), control: bool = False):
        """Started with its first line on a pipe (its address, for the shard and the
        gateway); watched and restarted from then on."""
        p = self._popen(name, argv, control, piped=True, pass_fds=pass_fds)
        self.procs.append((name, p))
        self.again.append((argv, control))
        threading.Thread(target=self._watch, args=(len(self.procs) - 1,), daemon=True).start()
        return p

    def _watch(self, i: int) -> None:
        """Restart daemon i whenever it dies, until `up` stops or it dies too often."""
        while True:
            name, p = self.procs[i]
            p.wait()
            with self._lock:
                if self.done.is_set():
                    return
                now = time.monotonic()
                recent = [t for t in self.restarts.get(i, []) if now - t < RESTART_WINDOW]
                if len(recent) >= RESTARTS:
                    print(
                        f"xxctl up: {name} keeps dying; stopping (logs in {self.state})",
                        file=sys.stderr,
                    )
                    self.done.set()
                    return
                self.restarts[i] = recent + [now]
                print(
                    f"xxctl up: {name} exited ({p.returncode}); starting it again", file=sys.stderr
                )
                argv, control = self.again[i]
                self.procs[i] = (name, self._popen(name, argv, control, piped=False))

    def _popen(self, name: str, argv: list[str], control: bool, piped: bool, pass_fds=()):
        log = open(self.state / f"{name}.log", "ab")
        try:
            return subprocess.Popen(
                argv, stdout=subprocess.PIPE if piped else log, stderr=log,
                stdin=subprocess.DEVNULL, text=True, pass_fds=pass_fds, start_new_session=True,
                preexec_fn=_control_plane if control else None,
            )  # fmt: skip
        finally:
            log.close()

    def _credentials(self, db: str) -> Path:
        """The default tenant's key in an AWS shared-credentials file (reused across ups)."""
        path = self.state / "credentials"
        with open_store(db) as s:
            try:
                s.get_tenant(DEFAULT_TENANT)
            except NotFound:
                s.create_tenant(DEFAULT_TENANT, _class_ok(None))
            akid = _read_akid(path)
            if akid is None or s.get_key(akid) is None:
                k = s.create_key(DEFAULT_TENANT)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.write(fd, (f"[default]\naws_access_key_id = {k.access_key_id}\n"
                              f"aws_secret_access_key = {k.secret}\n").encode())  # fmt: skip
                os.close(fd)
        return path

    def wait(self) -> int:
        """Until a signal (exit 0), or until a daemon keeps dying (exit 1)."""
        stopped = threading.Event()
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda *_: (stopped.set(), self.done.set()))
        for name, p in self.procs:
            threading.Thread(
                target=_drain, args=(p, self.state / f"{name}.log"), daemon=True
            ).start()
        self.done.wait()
        return 0 if stopped.is_set() else 1

    def stop(self) -> None:
        with self._lock:
            self.done.set()  # no more restarts
        for _name, p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        _kill_cgroup(self.cgroup_root)  # its jobs and environments outlive it by design


def _drain(p: subprocess.Popen, log: Path) -> None:
    if p.stdout is None:
        return
    with open(log, "a") as f:
        for line in p.stdout:
            f.write(line)


def _read_akid(path: Path) -> str | None:
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition("=")
            if k.strip() == "aws_access_key_id":
                return v.strip()
    except OSError:
        return None
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_cgroup(name: str) -> None:
    from xxnode.kernel.cgroup import Cgroup, find_cgroup2_mount
    from xxnode.kernel.cgroup_watch import PopulatedWatcher

    mount = find_cgroup2_mount()
    if mount is None:
        return
    cg = Cgroup(mount / name)
    if not cg.exists():
        return
    cg.kill()
    w = PopulatedWatcher()
    try:
        w.wait(cg, 10)
    finally:
        w.close()
    cg.remove_tree()


def cmd_up(args) -> int:
    if os.geteuid() != 0:
        raise _Usage("needs root: the node makes cgroups and sets SCHED_FIFO")
    if args.metrics:
        try:
            wire.parse_addr(args.metrics)
        except ValueError as e:
            raise _Usage(f"--metrics: {e}") from None
    up = _Up(args.state_dir.resolve(), args.port, args.store, args.metrics or "")
    try:
        url, creds = up.start()
        print(f"endpoint: {url}", flush=True)
        print(f"credentials: {creds}", flush=True)
        print(f"AWS_SHARED_CREDENTIALS_FILE={creds} aws --endpoint-url {url} --region us-east-1 "
              "lambda list-functions", file=sys.stderr)  # fmt: skip
        return up.wait()
    finally:
        up.stop()

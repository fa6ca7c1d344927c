"""The ledger's contract, run against both backends: SQLite in a file and a real PostgreSQL
server started for the session (tests/support/postgres.py). Whatever passes here for one
behaves the same on the other; nothing is mocked.

Each test gets an empty database (a new file, or CREATE DATABASE), opened through
`open_store`, so the migrations run in every test. The store's clock is a fake that ticks a
millisecond per reading: times are distinct and ordered, and a lease expires when the test
says so, not when a sleep hopes so.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.support.postgres import PostgresServer
from xxnode.ledger import (
    CLASS_TAG,
    LATEST,
    Conflict,
    Function,
    Invalid,
    LedgerError,
    NotFound,
    Store,
    lambda_time,
    open_store,
)
from xxnode.ledger.schema import MIGRATIONS

ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self, start: float = 1_796_000_000.0):
        self._t = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self._t += 0.001
            return self._t

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._t += seconds


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    with PostgresServer() as pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path}/ledger.db"
        return
    pg: PostgresServer = request.getfixturevalue("pg_server")
    name = f"t_{uuid.uuid4().hex[:16]}"
    db_url = pg.create_database(name)
    yield db_url
    pg.drop_database(name)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(url: str, clock: FakeClock) -> Iterator[Store]:
    s = open_store(url, clock=clock)
    yield s
    s.close()


def raw(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The database behind the store's back, on a connection of its own."""
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(urlsplit(url).path, isolation_level=None)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql.replace("?", "%s"), params)
        return cur.fetchall() if cur.description else []


def add_function(store: Store, tenant: str, name: str, **kw: Any) -> Function:
    digest = store.put_code(kw.pop("code", b"PK-zip-of-" + name.encode()))
    fields = {"runtime": "python3.11", "handler": "app.handler", **kw}
    return store.create_function(Function(tenant=tenant, name=name, code_digest=digest, **fields))


LAMBDA_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# -- opening, migrations


def test_open_store_refuses_unknown_urls() -> None:
    for bad in ("mysql://x/y", "sqlite://host/x.db", "sqlite:", "ledger.db"):
        with pytest.raises(Invalid):
            open_store(bad)


def test_migrations_apply_once_and_reopen_keeps_rows(url: str, store: Store) -> None:
    assert store.schema_version() == len(MIGRATIONS)
    store.create_tenant("acme", "low")
    store.close()
    with open_store(url) as again:
        assert again.schema_version() == len(MIGRATIONS)
        assert [t.name for t in again.list_tenants()] == ["acme"]
    rows = raw(url, "SELECT version FROM schema_version ORDER BY version")
    assert [r[0] for r in rows] == list(range(1, len(MIGRATIONS) + 1))


def test_concurrent_opens_by_threads(url: str) -> None:
    """A fresh database opened by 6 store objects at once: each migration exactly once."""
    n = 6
    barrier = threading.Barrier(n)

    def open_one(_: int) -> int:
        barrier.wait()
        with open_store(url) as s:
            return s.schema_version()

    with ThreadPoolExecutor(n) as pool:
        assert list(pool.map(open_one, range(n))) == [len(MIGRATIONS)] * n
    assert raw(url, "SELECT COUNT(*) FROM schema_version") == [(len(MIGRATIONS),)]


def test_concurrent_opens_by_processes(url: str) -> None:
    """As gateways starting together: each child waits for the go line, then opens."""
    code = (
        "import sys; from xxnode.ledger import open_store; sys.stdin.readline(); "
        "s = open_store(sys.argv[1]); print(s.schema_version()); s.close()"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, url],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.strip() == str(len(MIGRATIONS))
    assert raw(url, "SELECT COUNT(*) FROM schema_version") == [(len(MIGRATIONS),)]


def test_a_newer_schema_is_refused(url: str, store: Store) -> None:
    store.close()
    raw(url, "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (999, 0.0))
    with pytest.raises(LedgerError, match="newer"):
        open_store(url)


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/wal.db"
    open_store(url).close()
    assert raw(url, "PRAGMA journal_mode") == [("wal",)]  # persistent: a new connection sees it


# -- tenants and keys


def test_tenants(store: Store, clock: FakeClock) -> None:
    t = store.create_tenant("zeta-2", "low")
    assert (t.name, t.default_class, t.budget) == ("zeta-2", "low", None)
    assert 0 < t.created_at <= clock()
    store.create_tenant("acme", "high")
    assert [x.name for x in store.list_tenants()] == ["acme", "zeta-2"]
    assert store.get_tenant("acme").default_class == "high"
    with pytest.raises(Conflict):
        store.create_tenant("acme", "low")
    for bad in ("Acme", "", "a" * 65, "a_b", "a b", "acme\n"):
        with pytest.raises(Invalid):
            store.create_tenant(bad, "low")
    with pytest.raises(Invalid):
        store.create_tenant("ok", "")
    with pytest.raises(NotFound):
        store.get_tenant("nobody")

    assert store.set_tenant("acme", budget=12.5).budget == 12.5
    t = store.set_tenant("acme", default_class="medium")
    assert (t.default_class, t.budget) == ("medium", 12.5)  # budget kept
    assert store.set_tenant("acme", budget=None).budget is None
    assert store.get_tenant("acme").default_class == "medium"
    with pytest.raises(NotFound):
        store.set_tenant("nobody", budget=1.0)
    with pytest.raises(Invalid):
        store.set_tenant("acme", budget="lots")  # type: ignore[arg-type]


def test_access_keys(store: Store) -> None:
    store.create_tenant("acme", "low")
    store.create_tenant("other", "low")
    k1 = store.create_key("acme")
    k2 = store.create_key("acme")
    store.create_key("other")
    assert re.fullmatch(r"AKIA[A-Z0-9]{16}", k1.access_key_id)
    assert re.fullmatch(r"[A-Za-z0-9]{40}", k1.secret)
    assert k1.access_key_id != k2.access_key_id and k1.secret != k2.secret
    assert store.get_key(k1.access_key_id) == k1
    assert store.get_key("AKIA0000000000000000") is None
    assert {k.access_key_id for k in store.list_keys("acme")} == {
        k1.access_key_id,
        k2.access_key_id,
    }
    store.delete_key(k1.access_key_id)
    assert store.get_key(k1.access_key_id) is None
    assert store.get_key(k2.access_key_id) == k2
    with pytest.raises(NotFound):
        store.delete_key(k1.access_key_id)
    with pytest.raises(NotFound):
        store.create_key("nobody")
    with pytest.raises(NotFound):
        store.list_keys("nobody")


# -- code


def test_code_is_stored_once_by_digest(url: str, store: Store) -> None:
    blob = bytes(range(256)) * (5 * 1024 * 1024 // 256)  # 5 MiB
    digest = store.put_code(blob)
    assert digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert store.put_code(blob) == digest
    assert store.has_code(digest)
    assert store.get_code(digest) == blob
    assert raw(url, "SELECT COUNT(*), MAX(size) FROM code") == [(1, len(blob))]
    missing = "sha256:" + "0" * 64
    assert store.get_code(missing) is None and not store.has_code(missing)
    with pytest.raises(Invalid):
        store.put_code(b"\0" * (50 * 1024 * 1024 + 1))
    with pytest.raises(Invalid):
        store.put_code("text")  # type: ignore[arg-type]


# -- functions


def test_create_and_get_function(store: Store) -> None:
    store.create_tenant("acme", "low")
    code = b"PK\x03\x04 a zip"
    fn = add_function(
        store,
        "acme",
        "Hello_World-1",
        code=code,
        timeout=2.5,
        memory_mb=256,
        environment={"A": "1", "B": "two"},
        tags={CLASS_TAG: "high", "team": "web"},
        description="says hello",
    )
    assert (fn.tenant, fn.name, fn.version) == ("acme", "Hello_World-1", LATEST)
    assert (fn.runtime, fn.handler, fn.timeout, fn.memory_mb) == (
        "python3.11",
        "app.handler",
        2.5,
        256,
    )
    assert fn.environment == {"A": "1", "B": "two"}
    assert fn.tags == {CLASS_TAG: "high", "team": "web"} and fn.price_class == "high"
    assert fn.description == "says hello"
    assert fn.code_digest == "sha256:" + hashlib.sha256(code).hexdigest()
    assert fn.code_size == len(code)
    assert UUID.fullmatch(fn.revision_id)
    assert LAMBDA_TIME.fullmatch(fn.last_modified)
    assert store.get_function("acme", "Hello_World-1") == fn
    assert store.get_function("acme", "Hello_World-1", LATEST) == fn

    with pytest.raises(Conflict):
        add_function(store, "acme", "Hello_World-1")
    with pytest.raises(NotFound):
        store.get_function("acme", "absent")
    with pytest.raises(NotFound):
        store.get_function("acme", "Hello_World-1", "1")
    with pytest.raises(NotFound):
        add_function(store, "nobody", "f")


def test_create_function_refuses_bad_input(store: Store) -> None:
    store.create_tenant("acme", "low")
    digest = store.put_code(b"zip")

    def make(**kw: Any) -> Function:
        fields: dict[str, Any] = {
            "tenant": "acme",
            "name": "f",
            "runtime": "python3.11",
            "handler": "app.handler",
            "code_digest": digest,
            **kw,
        }
        return store.create_function(Function(**fields))

    for name in ("", "a" * 65, "has space", "dot.ted", "colon:1", "f\n", "ünï"):
        with pytest.raises(Invalid):
            make(name=name)
    for kw in (
        {"code_digest": "sha1:abc"},
        {"runtime": ""},
        {"timeout": 0},
        {"timeout": -1.0},
        {"memory_mb": 0},
        {"memory_mb": 1.5},
        {"environment": {"A": 1}},
        {"tags": {"k": None}},
        {"description": None},
        {"version": "1"},
    ):
        with pytest.raises(Invalid):
            make(**kw)
    with pytest.raises(Invalid, match="put_code"):
        make(code_digest="sha256:" + "1" * 64)
    assert store.list_functions("acme") == ([], None)
    assert make(name="a" * 64).name == "a" * 64


def test_list_functions_pages_by_name(store: Store) -> None:
    store.create_tenant("acme", "low")
    store.create_tenant("other", "low")
    names = [f"fn-{i:02d}" for i in range(17)] + ["A", "Z", "_x", "-y", "a-b", "aB", "ab"]
    for n in reversed(names):
        add_function(store, "acme", n)
    add_function(store, "other", "fn-00b")
    store.publish_version("acme", "fn-03")  # versions are not listed here

    seen: list[str] = []
    marker = None
    pages = 0
    while True:
        page, marker = store.list_functions("acme", marker, 5)
        pages += 1
        assert 1 <= len(page) <= 5
        assert all(f.version == LATEST and f.tenant == "acme" for f in page)
        seen += [f.name for f in page]
        if marker is None:
            break
    assert seen == sorted(names)  # code-point order, as both backends compare
    assert pages == 5
    everything, last = store.list_functions("acme", None, 100)
    assert [f.name for f in everything] == seen and last is None
    one, m = store.list_functions("acme", None, len(names))
    assert len(one) == len(names) and m is None

    with pytest.raises(Invalid):
        store.list_functions("acme", "not-a-marker", 5)
    for bad in (0, -1, 10_001):
        with pytest.raises(Invalid):
            store.list_functions("acme", None, bad)
    assert store.list_functions("nobody") == ([], None)


def test_update_function_code_and_revision_conflict(store: Store) -> None:
    store.create_tenant("acme", "low")
    fn = add_function(store, "acme", "f")
    new = store.put_code(b"version two of the zip")
    with pytest.raises(Conflict):
        store.update_function_code("acme", "f", new, expect_revision=str(uuid.uuid4()))
    assert store.get_function("acme", "f") == fn  # nothing changed
    up = store.update_function_code("acme", "f", new, expect_revision=fn.revision_id)
    assert up.code_digest == new and up.code_size == len(b"version two of the zip")
    assert up.revision_id != fn.revision_id and up.last_modified > fn.last_modified
    assert (up.runtime, up.handler, up.environment) == (fn.runtime, fn.handler, fn.environment)
    with pytest.raises(Conflict):  # the revision the caller read is stale now
        store.update_function_code("acme", "f", fn.code_digest, expect_revision=fn.revision_id)
    again = store.update_function_code("acme", "f", fn.code_digest)  # no expectation: wins
    assert again.code_digest == fn.code_digest and again.revision_id != up.revision_id
    with pytest.raises(Invalid):
        store.update_function_code("acme", "f", "sha256:" + "2" * 64)
    with pytest.raises(Invalid):
        store.update_function_code("acme", "f", "nonsense")
    with pytest.raises(NotFound):
        store.update_function_code("acme", "absent", new)


def test_update_function_configuration_is_partial(store: Store) -> None:
    store.create_tenant("acme", "low")
    fn = add_function(store, "acme", "f", environment={"A": "1"}, description="d")
    up = store.update_function_configuration("acme", "f", memory_mb=512)
    assert up.memory_mb == 512
    assert (up.timeout, up.environment, up.description, up.handler, up.runtime) == (
        fn.timeout,
        fn.environment,
        fn.description,
        fn.handler,
        fn.runtime,
    )
    assert up.revision_id != fn.revision_id
    up2 = store.update_function_configuration(
        "acme",
        "f",
        expect_revision=up.revision_id,
        runtime="python3.12",
        handler="main.go",
        timeout=30,
        environment={},
        description="",
    )
    assert (up2.runtime, up2.handler, up2.timeout, up2.environment, up2.description) == (
        "python3.12",
        "main.go",
        30.0,
        {},
        "",
    )
    assert up2.memory_mb == 512 and up2.code_digest == fn.code_digest
    with pytest.raises(Conflict):
        store.update_function_configuration("acme", "f", expect_revision=up.revision_id)
    for kw in ({"timeout": 0}, {"memory_mb": -5}, {"environment": {"A": 2}}, {"runtime": ""}):
        with pytest.raises(Invalid):
            store.update_function_configuration("acme", "f", **kw)
    assert store.get_function("acme", "f") == up2
    with pytest.raises(NotFound):
        store.update_function_configuration("acme", "absent", memory_mb=256)


def test_one_of_many_racing_updates_wins(store: Store) -> None:
    """The revision check and the write are one atomic step: of 8 writers that read the
    same revision, exactly one succeeds."""
    store.create_tenant("acme", "low")
    rev = add_function(store, "acme", "f").revision_id
    n = 8
    barrier = threading.Barrier(n)

    def update(i: int) -> str:
        barrier.wait()
        try:
            store.update_function_configuration(
                "acme", "f", expect_revision=rev, description=f"writer {i}"
            )
            return "won"
        except Conflict:
            return "conflict"

    with ThreadPoolExecutor(n) as pool:
        outcomes = list(pool.map(update, range(n)))
    assert outcomes.count("won") == 1 and outcomes.count("conflict") == n - 1
    winner = outcomes.index("won")
    assert store.get_function("acme", "f").description == f"writer {winner}"


def test_tags(store: Store) -> None:
    store.create_tenant("acme", "low")
    fn = add_function(store, "acme", "f", tags={"a": "1"})
    v1 = store.publish_version("acme", "f")
    assert store.tag_function("acme", "f", {CLASS_TAG: "high", "a": "2"}) == {
        "a": "2",
        CLASS_TAG: "high",
    }
    assert store.untag_function("acme", "f", ["a", "never-there"]) == {CLASS_TAG: "high"}
    now = store.get_function("acme", "f")
    assert now.tags == {CLASS_TAG: "high"} and now.price_class == "high"
    assert now.revision_id == fn.revision_id  # tags are not configuration
    # The class is the function's: a published version shows the current tags.
    assert store.get_function("acme", "f", v1.version).price_class == "high"
    with pytest.raises(Invalid):
        store.tag_function("acme", "f", {"k": 1})  # type: ignore[dict-item]
    with pytest.raises(NotFound):
        store.tag_function("acme", "absent", {"k": "v"})
    with pytest.raises(NotFound):
        store.untag_function("acme", "absent", ["k"])


def test_publish_version(store: Store) -> None:
    store.create_tenant("acme", "low")
    fn = add_function(store, "acme", "f", description="first")
    v1 = store.publish_version("acme", "f")
    assert v1.version == "1" and v1.description == "first"
    assert v1.code_digest == fn.code_digest and v1.revision_id != fn.revision_id
    assert store.publish_version("acme", "f") == v1  # nothing changed: the same version
    with pytest.raises(Conflict):
        store.publish_version("acme", "f", expect_revision=str(uuid.uuid4()))

    store.update_function_configuration("acme", "f", memory_mb=1024, environment={"E": "x"})
    latest = store.get_function("acme", "f")
    v2 = store.publish_version(
        "acme", "f", description="bigger", expect_revision=latest.revision_id
    )
    assert (v2.version, v2.memory_mb, v2.environment, v2.description) == (
        "2",
        1024,
        {"E": "x"},
        "bigger",
    )
    # Versions are immutable copies: $LATEST moves on, 1 and 2 stay.
    store.update_function_code("acme", "f", store.put_code(b"three"))
    assert store.get_function("acme", "f", "1") == v1
    assert store.get_function("acme", "f", "2") == v2
    with pytest.raises(NotFound):
        store.get_function("acme", "f", "3")
    with pytest.raises(NotFound):
        store.publish_version("acme", "absent")

    for i in range(9):  # versions 3..11: two-digit numbers sort after one-digit ones
        store.publish_version("acme", "f")
        store.update_function_configuration("acme", "f", memory_mb=200 + i)
    listed: list[str] = []
    marker = None
    while True:
        page, marker = store.list_versions("acme", "f", marker, 4)
        listed += [v.version for v in page]
        if marker is None:
            break
    assert listed == [LATEST] + [str(i) for i in range(1, 12)]
    assert [v.version for v in store.list_versions("acme", "f", None, 1)[0]] == [LATEST]
    with pytest.raises(Invalid):
        store.list_versions("acme", "f", "garbage")
    with pytest.raises(NotFound):
        store.list_versions("acme", "absent")


def test_delete_function_takes_versions_and_urls(store: Store) -> None:
    store.create_tenant("acme", "low")
    add_function(store, "acme", "f")
    add_function(store, "acme", "keep")
    store.publish_version("acme", "f")
    u = store.create_url("acme", "f")
    u1 = store.create_url("acme", "f", "1")
    store.delete_function("acme", "f")
    for q in (LATEST, "1"):
        with pytest.raises(NotFound):
            store.get_function("acme", "f", q)
    assert store.get_url_by_id(u.url_id) is None and store.get_url_by_id(u1.url_id) is None
    assert [f.name for f in store.list_functions("acme")[0]] == ["keep"]
    with pytest.raises(NotFound):
        store.delete_function("acme", "f")
    # The name is free again, and its versions start over.
    add_function(store, "acme", "f")
    assert store.publish_version("acme", "f").version == "1"


def test_tenant_isolation(store: Store) -> None:
    store.create_tenant("a", "low")
    store.create_tenant("b", "low")
    fa = add_function(store, "a", "shared-name", description="a's")
    store.publish_version("a", "shared-name")
    url = store.create_url("a", "shared-name")
    d = store.put_code(b"b's code")

    calls = [
        lambda: store.get_function("b", "shared-name"),
        lambda: store.get_function("b", "shared-name", "1"),
        lambda: store.update_function_code("b", "shared-name", d),
        lambda: store.update_function_configuration("b", "shared-name", memory_mb=999),
        lambda: store.tag_function("b", "shared-name", {CLASS_TAG: "high"}),
        lambda: store.untag_function("b", "shared-name", ["x"]),
        lambda: store.publish_version("b", "shared-name"),
        lambda: store.list_versions("b", "shared-name"),
        lambda: store.delete_function("b", "shared-name"),
        lambda: store.create_url("b", "shared-name"),
        lambda: store.get_url("b", "shared-name"),
        lambda: store.update_url("b", "shared-name", auth_type="NONE"),
        lambda: store.delete_url("b", "shared-name"),
        lambda: store.list_urls("b", "shared-name"),
    ]
    for call in calls:
        with pytest.raises(NotFound):
            call()
    assert store.list_functions("b") == ([], None)
    assert store.get_function("a", "shared-name") == fa
    assert store.get_url("a", "shared-name") == url
    # b's function of the same name is b's own.
    fb = add_function(store, "b", "shared-name", description="b's")
    assert store.get_function("b", "shared-name") == fb != fa
    store.delete_function("b", "shared-name")
    assert store.get_function("a", "shared-name") == fa


# -- function URLs


def test_function_urls(store: Store, clock: FakeClock) -> None:
    store.create_tenant("acme", "low")
    add_function(store, "acme", "f")
    store.publish_version("acme", "f")
    u = store.create_url("acme", "f", cors={"AllowOrigins": ["*"], "MaxAge": 60})
    assert re.fullmatch(r"[a-z0-9]{32}", u.url_id)
    assert (u.tenant, u.function, u.qualifier, u.auth_type) == ("acme", "f", LATEST, "NONE")
    assert u.cors == {"AllowOrigins": ["*"], "MaxAge": 60}
    assert u.created_at == u.modified_at
    assert store.get_url("acme", "f") == u
    assert store.get_url_by_id(u.url_id) == u
    assert store.get_url_by_id("x" * 32) is None
    with pytest.raises(Conflict):
        store.create_url("acme", "f")

    u1 = store.create_url("acme", "f", "1", auth_type="AWS_IAM")
    assert u1.url_id != u.url_id and u1.cors == {}
    assert store.list_urls("acme", "f") == sorted([u, u1], key=lambda x: x.qualifier)

    up = store.update_url("acme", "f", auth_type="AWS_IAM")
    assert (up.auth_type, up.cors, up.url_id) == ("AWS_IAM", u.cors, u.url_id)
    assert up.modified_at > u.modified_at and up.created_at == u.created_at
    up = store.update_url("acme", "f", cors={})
    assert (up.auth_type, up.cors) == ("AWS_IAM", {})

    with pytest.raises(Invalid):
        store.create_url("acme", "f", "1", auth_type="OPEN")
    with pytest.raises(Invalid):
        store.update_url("acme", "f", auth_type="OPEN")
    with pytest.raises(Invalid):
        store.create_url("acme", "f", cors={"x": object()})
    with pytest.raises(NotFound):
        store.create_url("acme", "f", "7")
    with pytest.raises(NotFound):
        store.create_url("acme", "absent")

    store.delete_url("acme", "f")
    with pytest.raises(NotFound):
        store.get_url("acme", "f")
    assert store.get_url_by_id(u.url_id) is None
    with pytest.raises(NotFound):
        store.delete_url("acme", "f")
    with pytest.raises(NotFound):
        store.update_url("acme", "f", auth_type="NONE")
    assert store.get_url("acme", "f", "1") == u1


# -- invocations


def test_record_event_is_visible_to_another_connection_on_return(url: str, store: Store) -> None:
    store.create_tenant("acme", "low")
    payload = b'{"who": "you"}' * 1000
    inv = store.record_event("acme", "f", LATEST, "high", payload)
    assert UUID.fullmatch(inv.id)
    assert (inv.status, inv.invocation_type, inv.attempts, inv.payload) == (
        "accepted",
        "Event",
        0,
        payload,
    )
    assert (inv.tenant, inv.function, inv.qualifier, inv.price_class) == (
        "acme",
        "f",
        LATEST,
        "high",
    )
    # Committed, not merely buffered: another store object and a bare connection see it.
    with open_store(url) as other:
        assert other.get_invocation(inv.id) == inv
    assert raw(url, "SELECT status, payload FROM invocations WHERE id = ?", (inv.id,)) == [
        ("accepted", payload)
    ]

    mine = store.record_event("acme", "f", "3", "low", b"", invocation_id="my-request-id")
    assert mine.id == "my-request-id" and mine.payload == b""
    with pytest.raises(Conflict):
        store.record_event("acme", "f", LATEST, "low", b"", invocation_id="my-request-id")
    with pytest.raises(Invalid):
        store.record_event("acme", "f", LATEST, "low", b"x" * (6 * 1024 * 1024 + 1))
    with pytest.raises(Invalid):
        store.record_event("acme", "f", LATEST, "", b"")
    with pytest.raises(NotFound):
        store.record_event("nobody", "f", LATEST, "low", b"")
    with pytest.raises(NotFound):
        store.get_invocation("absent")


def test_request_invocations_finish_once(store: Store) -> None:
    store.create_tenant("acme", "low")
    inv = store.record_request("acme", "f", LATEST, "high")
    assert (inv.status, inv.invocation_type, inv.payload) == ("running", "RequestResponse", None)
    assert store.claim_pending_events(10, "gw", 30) == []  # only events are claimed
    with pytest.raises(Invalid):
        store.finish_invocation(inv.id, "running")
    with pytest.raises(Invalid):
        store.finish_invocation(inv.id, "succeeded", {"x": object()})
    done = store.finish_invocation(inv.id, "succeeded", {"statusCode": 200, "body": "hi"})
    assert done.status == "succeeded" and done.result == {"statusCode": 200, "body": "hi"}
    assert done.updated_at > inv.updated_at and done.created_at == inv.created_at
    assert store.get_invocation(inv.id) == done
    with pytest.raises(Conflict):
        store.finish_invocation(inv.id, "failed", {"errorType": "Late"})
    failed = store.finish_invocation(store.record_request("acme", "f", "1", "low").id, "failed")
    assert failed.status == "failed" and failed.result is None
    with pytest.raises(NotFound):
        store.finish_invocation("absent", "succeeded")


def test_claim_takes_oldest_events_first(store: Store) -> None:
    store.create_tenant("acme", "low")
    ids = [store.record_event("acme", "f", LATEST, "low", b"%d" % i).id for i in range(5)]
    store.record_request("acme", "f", LATEST, "low")
    first = store.claim_pending_events(2, "gw-1", 30)
    assert [i.id for i in first] == ids[:2]
    assert all(
        (i.status, i.lease_owner, i.attempts) == ("running", "gw-1", 1) and i.lease_until
        for i in first
    )
    assert [i.payload for i in first] == [b"0", b"1"]
    rest = store.claim_pending_events(10, "gw-2", 30)
    assert [i.id for i in rest] == ids[2:]
    assert store.claim_pending_events(10, "gw-3", 30) == []
    with pytest.raises(Conflict):  # gw-2 holds it
        store.finish_invocation(ids[2], "succeeded", owner="gw-1")
    assert store.finish_invocation(ids[2], "succeeded", owner="gw-2").lease_owner == "gw-2"
    for bad in ((0, "gw", 30), (1, "", 30), (1, "gw", 0), (1, "gw", "30")):
        with pytest.raises(Invalid):
            store.claim_pending_events(*bad)  # type: ignore[arg-type]


def test_an_expired_lease_makes_the_event_claimable_again(store: Store, clock: FakeClock) -> None:
    store.create_tenant("acme", "low")
    inv = store.record_event("acme", "f", LATEST, "low", b"{}")
    [claimed] = store.claim_pending_events(10, "gw-1", 30)
    assert claimed.id == inv.id
    clock.advance(29)
    assert store.claim_pending_events(10, "gw-2", 30) == []  # still gw-1's
    clock.advance(2)  # gw-1 died without finishing
    [again] = store.claim_pending_events(10, "gw-2", 30)
    assert (again.id, again.lease_owner, again.attempts) == (inv.id, "gw-2", 2)
    with pytest.raises(Conflict):  # gw-1 wakes up late: its result is refused
        store.finish_invocation(inv.id, "succeeded", {"late": True}, owner="gw-1")
    done = store.finish_invocation(inv.id, "succeeded", {"ok": True}, owner="gw-2")
    assert (done.status, done.result, done.attempts) == ("succeeded", {"ok": True}, 2)
    clock.advance(3600)
    assert store.claim_pending_events(10, "gw-3", 30) == []  # finished stays finished


def test_a_renewed_lease_holds_and_a_lapsed_one_cannot_be_renewed(
    store: Store, clock: FakeClock
) -> None:
    store.create_tenant("acme", "low")
    inv = store.record_event("acme", "f", LATEST, "low", b"{}")
    [claimed] = store.claim_pending_events(10, "gw-1", 30)
    clock.advance(20)
    assert store.renew_lease(inv.id, "gw-1", 30) is True  # now until t=50
    clock.advance(20)
    assert store.claim_pending_events(10, "gw-2", 30) == []  # still gw-1's at t=40
    assert store.renew_lease(inv.id, "gw-2", 30) is False  # not gw-2's to renew
    clock.advance(11)  # gw-1 fell silent: the lease lapsed at t=50
    assert store.renew_lease(inv.id, "gw-1", 30) is False
    [again] = store.claim_pending_events(10, "gw-2", 30)
    assert again.lease_owner == "gw-2"
    store.finish_invocation(inv.id, "succeeded", owner="gw-2")
    assert store.renew_lease(inv.id, "gw-2", 30) is False  # finished


def test_concurrent_claimers_never_share_an_event(url: str, store: Store, clock: FakeClock) -> None:
    """200 events, two store objects (as two gateways) with two threads each, claiming in
    small batches at once: every event is claimed exactly once."""
    store.create_tenant("acme", "low")
    ids = {store.record_event("acme", "f", LATEST, "low", b"%d" % i).id for i in range(200)}
    other = open_store(url, clock=clock)
    claimers = [(store, "gw-a1"), (store, "gw-a2"), (other, "gw-b1"), (other, "gw-b2")]
    barrier = threading.Barrier(len(claimers))

    def claim_all(job: tuple[Store, str]) -> list[str]:
        s, owner = job
        got: list[str] = []
        barrier.wait()
        while batch := s.claim_pending_events(7, owner, 300):
            got += [i.id for i in batch]
            assert all(i.lease_owner == owner and i.attempts == 1 for i in batch)
        return got

    try:
        with ThreadPoolExecutor(len(claimers)) as pool:
            results = list(pool.map(claim_all, claimers))
    finally:
        other.close()
    claimed = [i for r in results for i in r]
    assert len(claimed) == len(set(claimed)) == 200
    assert set(claimed) == ids
    assert raw(url, "SELECT COUNT(*) FROM invocations WHERE attempts = 1") == [(200,)]


def test_threads_share_one_store(store: Store) -> None:
    """What the asyncio gateway does through asyncio.to_thread: many threads, one store."""
    store.create_tenant("acme", "low")

    def work(i: int) -> str:
        fn = add_function(store, "acme", f"f{i}", code=b"code %d" % (i % 3))
        store.update_function_configuration("acme", fn.name, memory_mb=256)
        store.get_key(store.create_key("acme").access_key_id)
        return store.get_function("acme", fn.name).name

    with ThreadPoolExecutor(8) as pool:
        names = list(pool.map(work, range(24)))
    assert sorted(names) == sorted(f"f{i}" for i in range(24))
    fns, _ = store.list_functions("acme", None, 100)
    assert len(fns) == 24 and all(f.memory_mb == 256 for f in fns)
    assert len(store.list_keys("acme")) == 24


def test_lambda_time() -> None:
    assert lambda_time(1_796_316_012.345678) == "2026-12-03T16:40:12.345+0000"
    assert lambda_time(0) == "1970-01-01T00:00:00.000+0000"


# -- usage and the bill ----------------------------------------------------------------------
def _usage(i: str, **kw) -> dict:
    rec = {
        "id": i, "tenant": "acme", "function": "f", "version": "$LATEST", "class": "high",
        "own_class": "high", "payer": "acme", "depth": 0, "node": "n1",
        "finished_at": 1_796_000_000.0, "cpu_ms": 1000.0, "gb_s": 0.5, "cpu_price": 2.0,
        "own_cpu_price": 2.0, "memory_price": 0.0001,
    }  # fmt: skip
    return rec | kw


def test_usage_is_kept_once_per_id_and_bad_records_are_refused_by_name(store: Store) -> None:
    store.create_tenant("acme", "low")
    acked, rejected = store.record_usage([_usage("a"), _usage("b"), {"id": "c"}, "junk"])
    assert acked == ["a", "b"]
    assert rejected == {"c": "tenant: a non-empty string of at most 256 characters",
                        "?": "a usage record is a JSON object"}  # fmt: skip
    # resent (a lost answer, a node's restart): acknowledged again, not counted again
    acked, _ = store.record_usage([_usage("a", cpu_ms=9999.0)])
    assert acked == ["a"]
    rows = store.usage_records("acme")
    assert [u.id for u in rows] == ["a", "b"] and rows[0].cpu_s == 1.0
    for bad in ({"cpu_ms": -1}, {"cpu_ms": float("nan")}, {"depth": 17}, {"gb_s": True}):
        _, rejected = store.record_usage([_usage("x", **bad)])
        assert list(rejected) == ["x"], bad


def test_the_bill_splits_a_cross_tenant_premium_to_the_caller(store: Store) -> None:
    store.create_tenant("acme", "low")
    store.create_tenant("lib", "low")
    month = "2026-11"  # 1_796_000_000 is in November 2026
    store.record_usage([
        _usage("own"),  # acme's own high function: 1 CPU-s at 2.0 + 0.5 GB-s at 0.0001
        # lib's low function raised to high by acme's call: lib pays low, acme the rest
        _usage("raised", tenant="lib", function="g", own_class="low", own_cpu_price=0.5,
               payer="acme", depth=1),
    ])  # fmt: skip
    lib = {(x.function, x.price_class): x for x in store.bill("lib", month)}
    assert lib[("g", "high")].cost == pytest.approx(0.5 + 0.00005)
    acme = store.bill("acme", month)
    own = [x for x in acme if not x.premium]
    prem = [x for x in acme if x.premium]
    assert own[0].cost == pytest.approx(2.0 + 0.00005)
    assert prem[0].owner == "lib" and prem[0].cost == pytest.approx(1.5)
    assert store.month_spend("acme", month) == pytest.approx(3.5 + 0.00005)
    assert store.month_spend("lib", month) == pytest.approx(0.5 + 0.00005)
    assert store.bill("acme", "2026-10") == [] and store.month_spend("acme", "2026-12") == 0


def test_an_event_keeps_its_callers_chain(store: Store) -> None:
    store.create_tenant("acme", "low")
    inv = store.record_event("acme", "f", "$LATEST", "high", b"{}",
                             context={"payer": "lib", "depth": 3, "own_class": "low"})  # fmt: skip
    (claimed,) = store.claim_pending_events(1, "gw", 10)
    assert claimed.id == inv.id and claimed.context == {
        "payer": "lib",
        "depth": 3,
        "own_class": "low",
    }

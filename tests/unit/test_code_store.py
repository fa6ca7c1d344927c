"""xxnode.node.env.code: a digest names a whole, checked, read-only tree, or nothing."""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import stat
import threading
import warnings
import zipfile
from pathlib import Path

import pytest

from xxnode.node.env import code
from xxnode.node.env.code import CHUNK, TMP, CodeError, CodeStore

REG, EXE, DIR, LNK = (
    stat.S_IFREG | 0o644,
    stat.S_IFREG | 0o755,
    stat.S_IFDIR | 0o755,
    stat.S_IFLNK | 0o777,
)


def _zip(*entries: tuple, method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """Entries (name, data[, unix mode]); a mode of 0 is a zip with no unix attributes."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of duplicate names: some tests want them
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data, *mode in entries:
                zi = zipfile.ZipInfo("x", date_time=(2020, 1, 1, 0, 0, 0))
                zi.filename = name  # past ZipInfo's constructor, which would cut a NUL
                zi.create_system = 3
                zi.external_attr = (mode[0] if mode else REG) << 16
                zi.compress_type = method
                zf.writestr(zi, data)
    return buf.getvalue()


def _listing(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


@pytest.fixture
def store(tmp_path):
    return CodeStore(tmp_path / "code")


def test_put_zip_unpacks_under_its_digest_and_keeps_the_zip(store):
    data = _zip(("handler.py", b"def h(e, c): return 1\n"), ("lib/", b"", DIR), ("lib/m.py", b"x"))
    digest = store.put_zip(data)
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    tree = store.path(digest)
    assert tree == store.root / digest.removeprefix("sha256:")
    assert (tree / "handler.py").read_bytes() == b"def h(e, c): return 1\n"
    assert (tree / "lib" / "m.py").read_bytes() == b"x"
    assert store.has(digest) and store.zip_bytes(digest) == data
    assert _listing(store.root) == sorted([tree.name, tree.name + ".zip"])


def test_a_second_put_of_the_same_bytes_is_a_cheap_no_op(store, monkeypatch):
    data = _zip(("a", b"1"))
    digest = store.put_zip(data)
    ino = store.path(digest).stat().st_ino

    def no_opening(*a, **k):
        raise AssertionError("the second put opened the zip")

    monkeypatch.setattr(code.zipfile, "ZipFile", no_opening)
    assert store.put_zip(data) == digest
    assert store.path(digest).stat().st_ino == ino


def test_a_directory_zips_to_the_same_digest_every_time_and_keeps_the_exec_bit(store, tmp_path):
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "bin" / "bootstrap").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "bin" / "bootstrap").chmod(0o700)  # any exec bit counts; owner bits are noise
    (src / "data.txt").write_bytes(b"d" * 10000)
    (src / "data.txt").chmod(0o600)
    (src / "link").symlink_to("bin/bootstrap")
    first = store.put_path(src)

    again = tmp_path / "again"
    shutil.copytree(src, again, symlinks=True)  # new inodes, new mtimes
    os.utime(again / "data.txt", (1, 1))
    (again / "data.txt").chmod(0o644)
    assert store.put_path(again) == first

    tree = store.path(first)
    assert stat.S_IMODE((tree / "bin" / "bootstrap").stat().st_mode) == 0o555
    assert stat.S_IMODE((tree / "data.txt").stat().st_mode) == 0o444
    assert (tree / "empty").is_dir() and os.readlink(tree / "link") == "bin/bootstrap"
    (again / "bin" / "bootstrap").chmod(0o644)  # the exec bit is part of the code
    assert store.put_path(again) != first


def test_put_path_reads_a_zip_file_and_refuses_what_is_neither(store, tmp_path):
    data = _zip(("a", b"1"))
    (tmp_path / "code.zip").write_bytes(data)
    assert store.put_path(tmp_path / "code.zip") == "sha256:" + hashlib.sha256(data).hexdigest()
    with pytest.raises(CodeError, match="neither a zip file nor a directory"):
        store.put_path(tmp_path / "missing")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(CodeError, match="neither"):
        store.put_path(tmp_path / "fifo")


def test_put_path_refuses_an_oversized_file_before_reading_it(tmp_path, monkeypatch):
    store = CodeStore(tmp_path / "code", max_zipped=1000)
    (tmp_path / "big.zip").write_bytes(b"\0" * 1001)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read"))
    with pytest.raises(CodeError, match="more than the 1000 bytes limit"):
        store.put_path(tmp_path / "big.zip")


def test_a_directory_with_a_fifo_is_refused(store, tmp_path):
    (tmp_path / "src").mkdir()
    os.mkfifo(tmp_path / "src" / "pipe")
    with pytest.raises(CodeError, match="'pipe', a device, fifo or socket"):
        store.put_path(tmp_path / "src")
    assert _listing(store.root) == []


def test_the_tree_is_writable_by_nobody_and_executables_by_anybody(store):
    data = _zip(
        ("run", b"#!/bin/sh\n", stat.S_IFREG | 0o100),
        ("d/e/f.txt", b"f", stat.S_IFREG | 0o666),
        ("windows.txt", b"w", 0),  # no unix mode at all
        ("setuid", b"s", stat.S_IFREG | 0o4755),
        ("d/up", b"../run", LNK),
    )
    tree = store.path(store.put_zip(data))
    modes = {}
    for p in [tree, *tree.rglob("*")]:
        st = p.lstat()
        assert st.st_uid == os.getuid()
        if not stat.S_ISLNK(st.st_mode):
            assert st.st_mode & 0o7222 == 0, p  # no write bit, no setuid/setgid/sticky
            modes[p.relative_to(tree).as_posix()] = stat.S_IMODE(st.st_mode)
    assert modes == {
        ".": 0o555, "run": 0o555, "d": 0o555, "d/e": 0o555, "d/e/f.txt": 0o444,
        "windows.txt": 0o444, "setuid": 0o555,
    }  # fmt: skip
    assert stat.S_IMODE(os.stat(store.root / (tree.name + ".zip")).st_mode) == 0o444


def test_relative_symlinks_that_stay_inside_are_kept(store):
    data = _zip(
        ("bin/tool", b"t", EXE),
        ("tool", b"bin/tool", LNK),
        ("lib/deep/up", b"../../bin", LNK),
        ("self", b".", LNK),
        ("chain", b"tool", LNK),  # ends at a link: that one is checked on its own
    )
    tree = store.path(store.put_zip(data))
    assert os.readlink(tree / "tool") == "bin/tool"
    assert (tree / "lib" / "deep" / "up" / "tool").read_bytes() == b"t"
    assert (tree / "chain").read_bytes() == b"t" and (tree / "self").resolve() == tree


def test_path_and_zip_bytes_of_a_missing_or_malformed_digest_are_refused(store):
    missing = "sha256:" + "0" * 64
    for bad in (missing, "sha256:abc", "md5:" + "0" * 64, "sha256:" + "0" * 64 + "/..", ""):
        assert not store.has(bad)
        with pytest.raises(CodeError):
            store.path(bad)
        with pytest.raises(CodeError):
            store.zip_bytes(bad)
    with pytest.raises(CodeError, match="not on this node"):
        store.path(missing)


def test_remove_takes_the_tree_and_the_zip_and_may_be_repeated(store):
    digest = store.put_zip(_zip(("d/e/f", b"f"), ("x", b"x", EXE)))
    store.remove(digest)
    assert not store.has(digest) and _listing(store.root) == []
    with pytest.raises(CodeError, match="not on this node"):
        store.path(digest)
    store.remove(digest)
    assert store.put_zip(_zip(("d/e/f", b"f"), ("x", b"x", EXE))) == digest  # and back again
    with pytest.raises(CodeError, match="not a code digest"):
        store.remove("../etc")


def test_construction_clears_what_a_crash_left(tmp_path):
    root = tmp_path / "code"
    store = CodeStore(root)
    kept = store.put_zip(_zip(("a", b"1")))
    half = root / f"{TMP}abc" / "d"
    half.mkdir(parents=True)
    (half / "f").write_bytes(b"f")
    half.chmod(0o555)
    (half.parent).chmod(0o555)
    (root / f"{TMP}xyz.zip").write_bytes(b"partial")
    orphan = root / ("1" * 64 + ".zip")  # its tree was never named
    orphan.write_bytes(b"z")
    CodeStore(root)
    assert _listing(root) == sorted(
        [kept.removeprefix("sha256:"), kept.removeprefix("sha256:") + ".zip"]
    )


def test_concurrent_puts_of_the_same_code_agree(store):
    data = _zip(*((f"f{i}", os.urandom(1000)) for i in range(50)))
    got, barrier = [], threading.Barrier(8)

    def put():
        barrier.wait()
        got.append(store.put_zip(data))

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and len(got) == 8
    assert _listing(store.root) == sorted([got[0][7:], got[0][7:] + ".zip"])


def test_losing_the_rename_race_keeps_the_winners_tree(store, monkeypatch):
    data = _zip(("a", b"1"))
    digest = store.put_zip(data)
    ino = store.path(digest).stat().st_ino
    monkeypatch.setattr(CodeStore, "has", lambda self, d: False)  # as if put concurrently
    assert store.put_zip(data) == digest
    monkeypatch.undo()
    assert store.path(digest).stat().st_ino == ino
    assert _listing(store.root) == sorted([digest[7:], digest[7:] + ".zip"])


def _entries_zip(n: int) -> bytes:
    return _zip(*((f"f{i}", b"") for i in range(n)), method=zipfile.ZIP_STORED)


def _corrupt() -> bytes:
    data = bytearray(_zip(("a", random.Random(4).randbytes(1000))))
    data[30 + 1 + 500] ^= 0xFF  # past the local header and name: the CRC will not match
    return bytes(data)


def _encrypted() -> bytes:
    data = _zip(("a", b"x"))
    zf = zipfile.ZipFile(io.BytesIO(data))
    info = zf.infolist()[0]
    assert info.flag_bits & 1 == 0
    raw = bytearray(data)
    raw[6] |= 1  # local header's flags
    cd = raw.rindex(b"PK\x01\x02")
    raw[cd + 8] |= 1  # central directory's flags
    return bytes(raw)


REFUSED = {
    "empty": (b"", "code is not a zip file"),
    "text": (b"#!/bin/sh\necho not a zip\n", "code is not a zip file"),
    "random": (random.Random(1).randbytes(5000), "code is not a zip file"),
    "corrupt": (_corrupt(), "code zip is corrupt: entry 'a'"),
    "encrypted": (_encrypted(), "'a' is encrypted"),
    "absolute": (_zip(("/etc/cron.d/x", b"x")), "'/etc/cron.d/x' is an absolute path"),
    "dotdot": (_zip(("a/../../x", b"x")), "climbs out of the code with .."),
    "dotdot-start": (_zip(("../x", b"x")), "climbs out"),
    "nul": (_zip(("a\0b", b"x")), "has a NUL in its name"),
    "backslash": (_zip(("..\\x", b"x")), "backslash"),
    "empty-name": (_zip(("./", b"", DIR)), "empty name"),
    "link-absolute": (_zip(("l", b"/etc", LNK)), "symlink to an absolute path '/etc'"),
    "link-escapes": (_zip(("a/l", b"../../x", LNK)), "symlink out of the code"),
    "link-escapes-late": (_zip(("l", b"a/b/../../../x", LNK)), "symlink out of the code"),
    "link-chain": (_zip(("s", b".", LNK), ("t", b"s/..", LNK)), "through another symlink"),
    "link-empty": (_zip(("l", b"", LNK)), "empty symlink"),
    "link-too-long": (_zip(("l", b"a/" * 3000, LNK)), "longer than 4096"),
    "through-link": (_zip(("l", b"d", LNK), ("l/x", b"x")), "'l/x' goes through a symlink"),
    "through-link-after": (_zip(("l/x", b"x"), ("l", b".", LNK)), "goes through a symlink"),
    "inside-file": (_zip(("a", b"f"), ("a/b", b"x")), "'a/b' is inside a file"),
    "device": (_zip(("dev", b"", stat.S_IFCHR | 0o666)), "'dev' is a device, fifo or socket"),
    "fifo": (_zip(("p", b"", stat.S_IFIFO | 0o666)), "device, fifo or socket"),
    "slash-file": (_zip(("d/", b"", REG)), "ends in / but is not a directory"),
    "duplicate": (_zip(("a", b"1"), ("a", b"2")), "has 'a' twice"),
    "duplicate-dotted": (_zip(("a/b", b"1"), ("a/./b", b"2")), "has 'a/b' twice"),
    "duplicate-dir": (_zip(("a", b"1"), ("a/", b"", DIR)), "has 'a' twice"),
    "name-too-long": (_zip(("a" * 300, b"x")), "File name too long"),
    "too-many": (_entries_zip(20001), "20001 entries, more than 20000"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_hostile_code_is_refused_and_leaves_nothing(store, case):
    data, message = REFUSED[case]
    with pytest.raises(CodeError) as e:
        store.put_zip(data)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert _listing(store.root) == []


def test_20000_entries_are_allowed():
    # checked without unpacking: 20000 fsync'd files would cost the suite seconds
    with zipfile.ZipFile(io.BytesIO(_entries_zip(20000))) as zf:
        assert len(code._entries(zf)) == 20000


def test_over_the_zipped_limit_is_refused_before_it_is_opened(tmp_path, monkeypatch):
    store = CodeStore(tmp_path / "code", max_zipped=1 << 20)
    data = _zip(("r", random.Random(2).randbytes(2 << 20)))
    monkeypatch.setattr(code.zipfile, "ZipFile", lambda *a: pytest.fail("opened"))
    with pytest.raises(CodeError, match=r"code is 2\.0 MiB zipped, more than the 1 MiB limit"):
        store.put_zip(data)


def test_a_zip_bomb_stops_as_soon_as_the_budget_is_spent(tmp_path, monkeypatch):
    store = CodeStore(tmp_path / "code", max_unpacked=1 << 20)
    data = _zip(("first", b"1"), ("bomb", bytes(2 << 20)), ("after", b"never"))
    assert len(data) < 10000  # compressible: the zipped limit does not stop it

    read, opened = [0], []
    real_read, real_open = zipfile.ZipExtFile.read, zipfile.ZipFile.open

    def counting_read(self, n=-1):
        chunk = real_read(self, n)
        read[0] += len(chunk)
        return chunk

    def noting_open(self, name, *a, **k):
        opened.append(getattr(name, "filename", name))
        return real_open(self, name, *a, **k)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting_read)
    monkeypatch.setattr(zipfile.ZipFile, "open", noting_open)
    with pytest.raises(CodeError, match=r"^code unpacks to more than 1 MiB$"):
        store.put_zip(data)
    assert read[0] <= (1 << 20) + CHUNK + 1  # not the 2 MiB the entry holds
    assert opened == ["first", "bomb"]
    assert _listing(store.root) == []  # the partial tmp tree is gone


def test_a_directory_over_the_unpacked_limit_is_refused_while_zipping(tmp_path):
    store = CodeStore(tmp_path / "code", max_unpacked=1 << 20)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "big").write_bytes(bytes((1 << 20) + 1))
    with pytest.raises(CodeError, match="code unpacks to more than 1 MiB"):
        store.put_path(tmp_path / "src")


def test_mangled_zips_give_a_code_error_never_another_exception(store):
    """Flip bytes of a valid zip at random: whatever zipfile makes of it, the user sees a
    refusal (or, when the damage is harmless, a tree), never a traceback."""
    good = _zip(("a/b.py", b"print(1)\n" * 50, EXE), ("l", b"a", LNK), ("c/", b"", DIR))
    rng = random.Random(3)
    for _ in range(400):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            store.remove(store.put_zip(bytes(data)))
        except CodeError:
            pass
        assert not [p for p in store.root.iterdir() if p.name.startswith(TMP)]

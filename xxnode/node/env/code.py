"""The node's store of function code: content-addressed, unpacked once, read-only to all.

A function's code arrives as a zip (Lambda's deployment package, with Lambda's limits) and
is hostile until checked: every entry's name, type and symlink target is checked before
anything is written, unpacked bytes are counted as they come out (a header's size is a
claim, not a fact), and a tree takes its digest's name only by one atomic rename once it
is complete, durable and sealed.  So a name in the store is always a whole, checked tree.

Layout under root: ``<hex>/`` the tree (dirs 0o555, files 0o444 or 0o555), ``<hex>.zip``
the bytes it came from (the cluster serves them on), ``.tmp-*`` work in progress.
"""

from __future__ import annotations

import errno
import hashlib
import io
import lzma
import os
import re
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MAX_ZIPPED = 50 << 20
MAX_UNPACKED = 250 << 20
MAX_ENTRIES = 20000
MAX_LINK = 4096  # PATH_MAX: a longer symlink target could never resolve
CHUNK = 1 << 16
TMP = ".tmp-"
DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # zip's epoch: a tree's digest must not hang on mtimes
# the disk failing is the node's trouble, not a reason to refuse the user's code
_STORE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)
# what zipfile and its decoders raise for a damaged archive (ValueError: a seek to a
# mangled offset; OSError: bz2's "Invalid data stream" -- it reads from memory, not disk)
_ZIP_ERRORS = (
    zipfile.BadZipFile, zlib.error, lzma.LZMAError, struct.error, EOFError, OSError,
    ValueError, NotImplementedError, RuntimeError, OverflowError,
)  # fmt: skip


class CodeError(Exception):
    """a refusal; str(e) is a clear one-line reason for the user"""


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = f"{n >> shift}" if n % (1 << shift) == 0 else f"{n / (1 << shift):.1f}"
            return f"{v} {unit}"
    return f"{n} bytes"


def _show(name: str) -> str:
    """A name as the user may read it: quoted, control bytes escaped, never a screenful."""
    return repr(name if len(name) <= 80 else name[:77] + "...")


def _hex(digest: object) -> str:
    m = DIGEST_RE.fullmatch(digest) if isinstance(digest, str) else None
    if m is None:
        raise CodeError(f"not a code digest (sha256:<64 hex>): {_show(str(digest))}")
    return m.group(1)


@dataclass
class _Entry:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]
    kind: str  # "file", "dir" or "link"
    executable: bool = False
    target: str = ""  # a link's

    @property
    def name(self) -> str:
        return self.info.orig_filename


class _Budget:
    """Unpacked bytes left: counted from what decompression yields, so a lying header or
    a bomb is stopped within one chunk of the limit."""

    def __init__(self, limit: int):
        self.limit = limit
        self.left = limit

    def take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise CodeError(f"code unpacks to more than {_size(self.limit)}")


@contextmanager
def _reading(name: str) -> Iterator[None]:
    """zipfile signals a damaged archive with many types; the user needs one message."""
    try:
        yield
    except _ZIP_ERRORS as e:
        raise CodeError(f"code zip is corrupt: entry {_show(name)}: {e}") from None


# --- checking: nothing touches the disk until the whole archive passes ---------------


def _parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    # orig_filename: zipfile cuts .filename at a NUL, which would hide it
    raw = info.orig_filename
    bad = (
        "has a NUL in its name" if "\0" in raw
        else "has a backslash in its name (zip paths use /)" if "\\" in raw
        else "is an absolute path" if raw.startswith("/")
        else None
    )  # fmt: skip
    parts = tuple(p for p in raw.split("/") if p not in ("", "."))
    if bad is None and ".." in parts:
        bad = "climbs out of the code with .."
    if bad is None and not parts:
        bad = "has an empty name"
    if bad:
        raise CodeError(f"code zip entry {_show(raw)} {bad}")
    return parts


def _kind(info: zipfile.ZipInfo) -> tuple[str, bool]:
    mode = info.external_attr >> 16
    fmt = stat.S_IFMT(mode)
    if fmt == 0:  # no unix mode (a zip made on Windows): the name says which
        fmt = stat.S_IFDIR if info.filename.endswith("/") else stat.S_IFREG
    if fmt == stat.S_IFDIR:
        return "dir", False
    if info.filename.endswith("/"):
        raise CodeError(
            f"code zip entry {_show(info.orig_filename)} ends in / but is not a directory"
        )
    if fmt == stat.S_IFREG:
        return "file", bool(mode & 0o111)
    if fmt == stat.S_IFLNK:
        return "link", False
    raise CodeError(f"code zip entry {_show(info.orig_filename)} is a device, fifo or socket")


def _entries(zf: zipfile.ZipFile) -> list[_Entry]:
    infos = zf.infolist()
    if len(infos) > MAX_ENTRIES:
        raise CodeError(f"code zip has {len(infos)} entries, more than {MAX_ENTRIES}")
    entries: list[_Entry] = []
    seen: set[tuple[str, ...]] = set()
    for info in infos:
        parts = _parts(info)
        if info.flag_bits & 0x1:
            raise CodeError(f"code zip entry {_show(info.orig_filename)} is encrypted")
        if parts in seen:  # which one would win is up to the unpacker: refuse to guess
            raise CodeError(f"code zip has {_show('/'.join(parts))} twice")
        seen.add(parts)
        entries.append(_Entry(info, parts, *_kind(info)))
    _check_prefixes(entries)
    return entries


def _check_prefixes(entries: list[_Entry]) -> None:
    """An entry under a symlink entry would be written wherever the link points."""
    kinds = {e.parts: e.kind for e in entries}
    for e in entries:
        for i in range(1, len(e.parts)):
            kind = kinds.get(e.parts[:i])
            if kind == "link":
                raise CodeError(f"code zip entry {_show(e.name)} goes through a symlink")
            if kind == "file":
                raise CodeError(f"code zip entry {_show(e.name)} is inside a file")


def _check_link(e: _Entry, kinds: dict[tuple[str, ...], str]) -> None:
    """Resolve the target from the link's dir, one component at a time: ``..`` is lexical
    only through real dirs, so stepping through another link (``s -> .``, ``t -> s/..``)
    is refused; a link ending at a link is fine, as that one is checked in its own turn."""
    t = e.target
    bad = (
        "is an empty symlink" if not t
        else "is a symlink with a NUL in its target" if "\0" in t
        else f"is a symlink to an absolute path {_show(t)}" if t.startswith("/")
        else None
    )  # fmt: skip
    at = list(e.parts[:-1])
    for p in t.split("/") if bad is None else ():
        if p in ("", "."):
            continue
        if kinds.get(tuple(at)) == "link":
            bad = f"is a symlink resolving through another symlink ({_show(t)})"
            break
        if p != "..":
            at.append(p)
        elif at:
            at.pop()
        else:
            bad = f"is a symlink out of the code ({_show(t)})"
            break
    if bad:
        raise CodeError(f"code zip entry {_show(e.name)} {bad}")


def _read_links(zf: zipfile.ZipFile, entries: list[_Entry], budget: _Budget) -> None:
    kinds = {e.parts: e.kind for e in entries}
    for e in entries:
        if e.kind != "link":
            continue
        with _reading(e.name), zf.open(e.info) as f:
            raw = f.read(MAX_LINK + 1)
        budget.take(len(raw))
        if len(raw) > MAX_LINK:
            raise CodeError(f"code zip entry {_show(e.name)} is a symlink longer than {MAX_LINK}")
        e.target = os.fsdecode(raw)
        _check_link(e, kinds)


# --- unpacking -----------------------------------------------------------------------


def _chunks(zf: zipfile.ZipFile, e: _Entry, budget: _Budget) -> Iterator[bytes]:
    """Decompressed and counted as they come.  Only the reading is wrapped: the caller's
    own errors (a full disk) are raised in its frame, never into this one."""
    with _reading(e.name), zf.open(e.info) as src:
        while chunk := src.read(CHUNK):
            budget.take(len(chunk))
            yield chunk


def _write_file(zf: zipfile.ZipFile, e: _Entry, path: Path, budget: _Budget) -> None:
    # O_EXCL|O_NOFOLLOW: belt and braces under the checks; never write through a link
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with open(os.open(path, flags, 0o600), "wb") as out:
        for chunk in _chunks(zf, e, budget):
            out.write(chunk)
        out.flush()
        # the rename that names the tree must not outrun its data to disk
        os.fsync(out.fileno())
        os.fchmod(out.fileno(), 0o555 if e.executable else 0o444)


def _unpack(zf: zipfile.ZipFile, entries: list[_Entry], dest: Path, budget: _Budget) -> None:
    for e in entries:
        path = dest.joinpath(*e.parts)
        if e.kind == "dir":
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if e.kind == "link":
            os.symlink(e.target, path)
        else:
            _write_file(zf, e, path, budget)


def _seal(entries: list[_Entry], dest: Path) -> None:
    """Dirs last: every dir an entry named or implied (never a link: _check_prefixes)."""
    dirs = {e.parts for e in entries if e.kind == "dir"}
    dirs.update(e.parts[:i] for e in entries for i in range(1, len(e.parts)))
    for parts in dirs:
        os.chmod(dest.joinpath(*parts), 0o555)
    os.chmod(dest, 0o555)


def _rmtree(path: Path) -> None:
    """Our dirs are 0o555; without write on a dir nobody but root may unlink in it."""
    for dirpath, _, _ in os.walk(path):  # never follows links: only our own dirs change
        os.chmod(dirpath, 0o700)
    shutil.rmtree(path, ignore_errors=True)


# --- zipping a directory -------------------------------------------------------------


def _tree(top: Path, rel: str = "") -> Iterator[tuple[str, os.stat_result]]:
    for name in sorted(os.listdir(top / rel)):
        st = os.lstat(top / rel / name)
        yield rel + name, st
        if stat.S_ISDIR(st.st_mode):
            yield from _tree(top, f"{rel}{name}/")


def _zinfo(name: str, mode: int) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, date_time=FIXED_TIME)
    zi.create_system = 3  # unix: the mode bits below mean what they say
    zi.external_attr = mode << 16 | (0x10 if stat.S_ISDIR(mode) else 0)
    if stat.S_ISREG(mode):
        zi.compress_type = zipfile.ZIP_DEFLATED
    return zi


def _add(zf: zipfile.ZipFile, path: Path, rel: str, st: os.stat_result, budget: _Budget) -> None:
    mode = st.st_mode
    if stat.S_ISDIR(mode):  # kept, so an empty dir survives
        zf.writestr(_zinfo(rel + "/", stat.S_IFDIR | 0o755), b"")
    elif stat.S_ISLNK(mode):  # kept as a link; put_zip judges where it points
        target = os.fsencode(os.readlink(path))
        budget.take(len(target))
        zf.writestr(_zinfo(rel, stat.S_IFLNK | 0o777), target)
    elif stat.S_ISREG(mode):  # only the exec bit is code; owner and group bits are noise
        zi = _zinfo(rel, stat.S_IFREG | (0o755 if mode & 0o111 else 0o644))
        zi.file_size = st.st_size
        with open(path, "rb") as src, zf.open(zi, "w") as dst:
            while chunk := src.read(CHUNK):
                budget.take(len(chunk))
                dst.write(chunk)
    else:
        raise CodeError(f"code directory holds {_show(rel)}, a device, fifo or socket")


def _zip_dir(top: Path, max_zipped: int, max_unpacked: int) -> bytes:
    buf = io.BytesIO()
    budget = _Budget(max_unpacked)
    count = 0
    with zipfile.ZipFile(buf, "w") as zf:
        for rel, st in _tree(top):
            count += 1
            if count > MAX_ENTRIES:
                raise CodeError(f"code directory has more than {MAX_ENTRIES} entries")
            try:
                _add(zf, top / rel, rel, st, budget)
            except UnicodeEncodeError:
                raise CodeError(
                    f"code directory has a name that is not UTF-8: {_show(rel)}"
                ) from None
            if buf.tell() > max_zipped:
                raise CodeError(f"code zips to more than {_size(max_zipped)}")
    return buf.getvalue()


# --- the store -----------------------------------------------------------------------


def zip_tree(top: Path, max_zipped: int = MAX_ZIPPED, max_unpacked: int = MAX_UNPACKED) -> bytes:
    """A directory as the zip the store would make of it (fixed times: same tree, same
    digest), for a client uploading code."""
    return _zip_dir(Path(top), max_zipped, max_unpacked)


def check_zip(data: bytes, max_zipped: int = MAX_ZIPPED, max_unpacked: int = MAX_UNPACKED) -> None:
    """Every check a node makes before it unpacks, without writing a byte: what a gateway
    runs on CreateFunction so that bad code is refused there, where the user is. Blocking
    (it decompresses everything to count it): call it from a worker thread."""
    if len(data) > max_zipped:
        raise CodeError(
            f"code is {_size(len(data))} zipped, more than the {_size(max_zipped)} limit"
        )
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except _ZIP_ERRORS as e:
        raise CodeError(f"code is not a zip file: {e}") from None
    with zf:
        entries = _entries(zf)
        budget = _Budget(max_unpacked)
        _read_links(zf, entries, budget)
        for e in entries:
            if e.kind == "file":
                for _ in _chunks(zf, e, budget):
                    pass


class CodeStore:
    """One per root, made before any put: construction clears what a crash left."""

    def __init__(self, root: Path, max_zipped: int = MAX_ZIPPED, max_unpacked: int = MAX_UNPACKED):
        self.root = Path(root)
        self.max_zipped = max_zipped
        self.max_unpacked = max_unpacked
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean()

    def _clean(self) -> None:
        """Half-done work and zips whose tree never got named (a crash between the two)."""
        for p in self.root.iterdir():
            if p.name.startswith(TMP):
                if p.is_dir() and not p.is_symlink():
                    _rmtree(p)
                else:
                    p.unlink(missing_ok=True)
            elif p.suffix == ".zip" and DIGEST_RE.fullmatch(f"sha256:{p.stem}"):
                if not (self.root / p.stem).is_dir():
                    p.unlink(missing_ok=True)

    def put_zip(self, data: bytes) -> str:
        if len(data) > self.max_zipped:
            raise CodeError(
                f"code is {_size(len(data))} zipped, more than the {_size(self.max_zipped)} limit"
            )
        hexd = hashlib.sha256(data).hexdigest()
        digest = f"sha256:{hexd}"
        if self.has(digest):
            return digest
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
        except _ZIP_ERRORS as e:
            raise CodeError(f"code is not a zip file: {e}") from None
        with zf:
            entries = _entries(zf)
            budget = _Budget(self.max_unpacked)
            _read_links(zf, entries, budget)
            self._unpack_and_commit(zf, entries, budget, hexd, data)
        return digest

    def _unpack_and_commit(
        self, zf: zipfile.ZipFile, entries: list[_Entry], budget: _Budget, hexd: str, data: bytes
    ) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=TMP, dir=self.root))
        try:
            try:
                _unpack(zf, entries, tmp, budget)
            except OSError as e:  # a name too long and the like: the code's fault
                if e.errno in _STORE_ERRNOS:
                    raise
                where = os.path.relpath(e.filename, tmp) if e.filename else "?"
                raise CodeError(f"code cannot be unpacked: {_show(where)}: {e.strerror}") from None
            _seal(entries, tmp)
            self._write_zip(hexd, data)  # before the tree: a named tree always has its zip
            try:
                os.rename(tmp, self.root / hexd)
            except OSError as e:
                # a concurrent put of the same bytes named it first: the same tree
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            self._sync_root()
        finally:
            if tmp.exists():
                _rmtree(tmp)

    def _write_zip(self, hexd: str, data: bytes) -> None:
        fd, name = tempfile.mkstemp(prefix=TMP, suffix=".zip", dir=self.root)
        try:
            with open(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), 0o444)
            os.replace(name, self.root / f"{hexd}.zip")
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise

    def _sync_root(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def put_path(self, path: Path) -> str:
        path = Path(path)
        try:
            if path.is_dir():
                data = _zip_dir(path, self.max_zipped, self.max_unpacked)
            elif path.is_file():
                size = path.stat().st_size
                if size > self.max_zipped:  # refused before a byte is read
                    raise CodeError(
                        f"code is {_size(size)} zipped, more than the {_size(self.max_zipped)} limit"
                    )
                data = path.read_bytes()
            else:
                raise CodeError(f"code path {path} is neither a zip file nor a directory")
        except OSError as e:  # the user's path: unreadable is theirs to mend
            raise CodeError(f"code path {path}: {e.strerror}: {e.filename}") from None
        return self.put_zip(data)

    def path(self, digest: str) -> Path:
        hexd = _hex(digest)
        if not self.has(digest):
            raise CodeError(f"code {digest} is not on this node")
        return self.root / hexd

    def has(self, digest: str) -> bool:
        try:
            hexd = _hex(digest)
        except CodeError:
            return False
        return (self.root / hexd).is_dir() and (self.root / f"{hexd}.zip").is_file()

    def zip_bytes(self, digest: str) -> bytes:
        return (self.path(digest).parent / f"{_hex(digest)}.zip").read_bytes()

    def remove(self, digest: str) -> None:
        """Gone from the namespace at once (one rename), then deleted at leisure; removing
        what is not there is not an error, so a retry is safe."""
        hexd = _hex(digest)
        doomed = self.root / f"{TMP}rm-{hexd[:16]}-{os.urandom(4).hex()}"
        try:
            os.rename(self.root / hexd, doomed)
        except FileNotFoundError:
            pass
        else:
            _rmtree(doomed)
        (self.root / f"{hexd}.zip").unlink(missing_ok=True)

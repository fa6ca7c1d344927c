"""XX's UDP protocol: message formats, authentication, replay defence, retransmission and
large-payload transfer.  See docs/cluster.md for the layout and the guarantees.

Datagram (big-endian)::

    0   'X' 'X'          magic
    2   u8  version      VERSION; anything else is dropped (BadVersion)
    3   u8  type         message type (TYPES)
    4   u64 sender       random per process incarnation
    12  u64 seq          per-sender, new for every datagram (retransmits too)
    20  u64 ts_ms        sender's wall clock
    28  u64 rid          request id (0: not a request)
    36  u64 reply_to     rid this answers (0: not a reply)
    44  body             the type's fields, packed by its schema; no trailing bytes
    -16 mac              HMAC-SHA256(cluster key, everything before)[:16]

Why each defence: the MAC (checked first, before any state is touched) makes forged or
bit-flipped datagrams harmless; ``seq`` + ``ts_ms`` make replays harmless -- a receiver
keeps, per sender, the seqs seen inside the acceptance window, and anything older than
the window is refused by its timestamp, so the per-sender memory can be forgotten.  A
retransmission is therefore a *new* datagram carrying the same ``rid``; receivers dedupe
requests by (sender, rid) and answer a repeat with the cached reply (idempotent).

Every failure to decode is a subclass of ``WireError``, counted by reason in
``Codec.dropped``; nothing else escapes ``Codec.decode``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import random
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

MAGIC = b"XX"
VERSION = 1
HEADER = struct.Struct(">2sBBQQQQQ")
MAC_LEN = 16
MAX_DATAGRAM = 9216  # largest datagram accepted; bigger inputs go as fragments
CHUNK = 1200  # fragment data per datagram: fits a 1500-byte MTU path with our headers
INLINE_MAX = 1024  # payloads up to this ride inside SUBMIT/PLACE
MAX_PAYLOAD = 6 * 1024 * 1024  # a job's input, as AWS Lambda allows
WINDOW_S = 30.0  # replay window: datagrams older/newer than this are refused
REPLAY_SEQS = 8192  # per sender: seqs remembered behind the highest seen
MAX_SENDERS = 65536
SOCKET_BUF = 8 << 20


class WireError(Exception):
    """A datagram we refuse; ``reason`` names the counter it is counted under."""

    reason = "malformed"


class Truncated(WireError):
    reason = "truncated"


class Oversized(WireError):
    reason = "oversized"


class BadMagic(WireError):
    reason = "bad_magic"


class BadVersion(WireError):
    reason = "bad_version"


class BadMac(WireError):
    reason = "bad_mac"


class Replayed(WireError):
    reason = "replayed"


class Stale(WireError):
    reason = "stale"


class UnknownType(WireError):
    reason = "unknown_type"


class Malformed(WireError):
    reason = "malformed"


# --- message schemas -------------------------------------------------------------------
# Field codes: B u8, i i32, I u32, Q u64, J 16-byte job id, D 32-byte sha256 digest,
# s str (u16 length), y bytes (u32 length), j JSON object (u32 length).

JOB = "J"
_SCHEMAS: dict[str, tuple[int, tuple[tuple[str, str], ...]]] = {
    # client -> shard: a new job; payload inline or fetched from the sender by digest
    "submit": (
        1,
        (
            ("job", "J"),
            ("cls", "s"),
            ("arbiter", "s"),
            ("spec", "j"),
            ("size", "Q"),
            ("digest", "D"),
            ("inline", "y"),
        ),
    ),
    "submit_ack": (2, (("job", "J"), ("ok", "B"), ("reason", "s"))),
    # shard -> node; ``arbiter`` "" means the shard itself grants the claim
    "place": (
        3,
        (
            ("job", "J"),
            ("cls", "s"),
            ("arbiter", "s"),
            ("spec", "j"),
            ("size", "Q"),
            ("digest", "D"),
            ("inline", "y"),
        ),
    ),
    "accept": (4, (("job", "J"),)),
    "refuse": (5, (("job", "J"), ("reason", "s"))),
    "probe": (6, ()),
    "probe_reply": (7, (("running", "I"), ("free", "Q"))),
    "idle_join": (8, (("node", "s"), ("free", "Q"), ("total", "Q"), ("jobs", "I"))),
    "idle_update": (9, (("node", "s"), ("free", "Q"), ("total", "Q"), ("jobs", "I"))),
    "idle_leave": (10, (("node", "s"),)),
    "len_query": (11, ()),
    "len_reply": (12, (("length", "I"),)),
    "done": (13, (("job", "J"), ("node", "s"), ("status", "i"), ("result", "j"))),
    "ack": (14, ()),
    "fetch": (15, (("digest", "D"), ("first", "I"), ("count", "I"))),
    "frag": (16, (("digest", "D"), ("index", "I"), ("size", "Q"), ("data", "y"))),
    "hello": (17, (("node", "s"), ("free", "Q"), ("total", "Q"), ("jobs", "I"))),
    "claim": (18, (("job", "J"), ("node", "s"))),
    "grant": (19, (("job", "J"), ("ok", "B"))),
    "status": (20, (("what", "s"),)),
    "status_reply": (21, (("data", "j"),)),
    "node_lost": (22, (("job", "J"), ("node", "s"))),
    "error": (23, (("reason", "s"),)),
}
TYPES: dict[int, str] = {code: name for name, (code, _) in _SCHEMAS.items()}

# Status codes carried in DONE besides a process exit status.
NODE_LOST = -1000  # the node running it died (declared policy: report, do not retry)
DENIED = -1001  # the arbiter gave the job to another node; nothing ran here
FAILED_START = -1002  # the executor could not run it


@dataclass(slots=True)
class Message:
    kind: str
    f: dict = field(default_factory=dict)

    def __new__(cls, kind: str, f: dict | None = None):
        # each schema kind has a subclass whose fields are properties: ``m.job`` is then
        # a plain attribute lookup instead of a failed one (an AttributeError built and
        # caught) followed by __getattr__ -- measurable at ~10 field reads per message
        return object.__new__(_MESSAGE_CLASSES.get(kind, cls))

    def __getattr__(self, name: str):
        try:
            return self.f[name]
        except KeyError:
            raise AttributeError(name) from None


def _field(name: str) -> property:
    def get(self):
        try:
            return self.f[name]
        except KeyError:
            raise AttributeError(name) from None

    return property(get)


_MESSAGE_CLASSES: dict[str, type] = {}
for _kind, (_, _schema) in _SCHEMAS.items():
    _ns: dict = {"__slots__": (), "__qualname__": "Message", "__module__": __name__}
    _ns.update({name: _field(name) for name, _ in _schema})
    _MESSAGE_CLASSES[_kind] = type("Message", (Message,), _ns)


class Header(NamedTuple):
    sender: int
    seq: int
    ts_ms: int
    rid: int
    reply_to: int


def _pack_body(kind: str, f: dict) -> bytes:
    try:
        code, schema = _SCHEMAS[kind]
    except KeyError:
        raise ValueError(f"unknown message kind {kind!r}") from None
    out = bytearray()
    for name, t in schema:
        v = f[name]
        if t == "B":
            out += struct.pack(">B", v)
        elif t == "i":
            out += struct.pack(">i", v)
        elif t == "I":
            out += struct.pack(">I", v)
        elif t == "Q":
            out += struct.pack(">Q", v)
        elif t in "JD":
            n = 16 if t == "J" else 32
            if len(v) != n:
                raise ValueError(f"{kind}.{name}: need {n} bytes")
            out += v
        elif t == "s":
            b = v.encode()
            out += struct.pack(">H", len(b)) + b
        elif t in "yj":
            b = json.dumps(v, separators=(",", ":")).encode() if t == "j" else bytes(v)
            out += struct.pack(">I", len(b)) + b
    return bytes(out)


def _unpack_body(kind: str, body: bytes) -> dict:
    schema = _SCHEMAS[kind][1]
    f: dict = {}
    p = 0
    n = len(body)
    try:
        for name, t in schema:
            if t in "BiIQ":
                size = {"B": 1, "i": 4, "I": 4, "Q": 8}[t]
                if p + size > n:
                    raise Truncated(f"{kind}.{name}")
                (f[name],) = struct.unpack_from(">" + t, body, p)
                p += size
            elif t in "JD":
                size = 16 if t == "J" else 32
                if p + size > n:
                    raise Truncated(f"{kind}.{name}")
                f[name] = body[p : p + size]
                p += size
            else:
                lsize = 2 if t == "s" else 4
                if p + lsize > n:
                    raise Truncated(f"{kind}.{name}")
                (ln,) = struct.unpack_from(">H" if t == "s" else ">I", body, p)
                p += lsize
                if p + ln > n:
                    raise Truncated(f"{kind}.{name}")
                raw = body[p : p + ln]
                p += ln
                if t == "s":
                    f[name] = raw.decode()
                elif t == "y":
                    f[name] = raw
                else:
                    v = json.loads(raw)
                    if not isinstance(v, dict):
                        raise Malformed(f"{kind}.{name}: not a JSON object")
                    f[name] = v
    except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        if isinstance(e, WireError):
            raise
        raise Malformed(f"{kind}: {e}") from None
    except RecursionError:
        raise Malformed(f"{kind}: JSON nested too deep") from None
    if p != n:
        raise Malformed(f"{kind}: {n - p} trailing bytes")
    return f


# --- compiled codecs --------------------------------------------------------------------
# The schemas are fixed, so each type gets a generated pack and unpack function: no
# per-field dispatch, precompiled struct.Struct objects, the body read in place (no
# copy of it).  Same wire format and the same refusals as _pack_body/_unpack_body, which
# stay as the reference ("legacy") codec: tests check the two agree, and
# XX_WIRE_CODEC=legacy selects them (tools/bench_shard --compare).

_FIXED = {"B": struct.Struct(">B"), "i": struct.Struct(">i"), "I": struct.Struct(">I")}
_FIXED["Q"] = struct.Struct(">Q")
_LEN = {"s": struct.Struct(">H"), "y": struct.Struct(">I"), "j": struct.Struct(">I")}
_json_compact = json.JSONEncoder(separators=(",", ":")).encode


def _json_bytes(v) -> bytes:
    if type(v) is dict and not v:
        return b"{}"
    return _json_compact(v).encode()


def _json_obj(raw, kind: str, name: str) -> dict:
    if raw == b"{}":
        return {}
    v = json.loads(bytes(raw))
    if not isinstance(v, dict):
        raise Malformed(f"{kind}.{name}: not a JSON object")
    return v


def _compile(kind: str, schema: tuple[tuple[str, str], ...]) -> tuple[Callable, Callable]:
    g = {"_json_bytes": _json_bytes, "_json_obj": _json_obj, "Truncated": Truncated}
    g["Malformed"] = Malformed
    for t, st in _FIXED.items():
        g[f"_p{t}"], g[f"_u{t}"] = st.pack, st.unpack_from
    for t, st in _LEN.items():
        g[f"_pl{t}"], g[f"_ul{t}"] = st.pack, st.unpack_from
    enc = ["def enc(f):"]
    parts = []
    dec = ["def dec(b, p, n):", "    f = {}"]
    for i, (name, t) in enumerate(schema):
        v = f"v{i}"
        enc.append(f"    {v} = f[{name!r}]")
        if t in _FIXED:
            parts.append(f"_p{t}({v})")
            size = _FIXED[t].size
            dec += [
                f"    if p + {size} > n: raise Truncated('{kind}.{name}')",
                f"    f[{name!r}] = _u{t}(b, p)[0]",
                f"    p += {size}",
            ]
        elif t in "JD":
            size = 16 if t == "J" else 32
            enc += [
                f"    if len({v}) != {size}:",
                f"        raise ValueError('{kind}.{name}: need {size} bytes')",
            ]
            parts.append(v)
            dec += [
                f"    if p + {size} > n: raise Truncated('{kind}.{name}')",
                f"    f[{name!r}] = b[p : p + {size}]",
                f"    p += {size}",
            ]
        else:
            conv = {"s": f"{v}.encode()", "y": f"bytes({v})", "j": f"_json_bytes({v})"}[t]
            enc.append(f"    {v} = {conv}")
            parts += [f"_pl{t}(len({v}))", v]
            lsize = _LEN[t].size
            dec += [
                f"    if p + {lsize} > n: raise Truncated('{kind}.{name}')",
                f"    q = p + {lsize} + _ul{t}(b, p)[0]",
                f"    if q > n: raise Truncated('{kind}.{name}')",
            ]
            if t == "s":
                dec.append(f"    f[{name!r}] = b[p + {lsize} : q].decode()")
            elif t == "y":
                dec.append(f"    f[{name!r}] = b[p + {lsize} : q]")
            else:
                dec.append(f"    f[{name!r}] = _json_obj(b[p + {lsize} : q], {kind!r}, {name!r})")
            dec.append("    p = q")
    enc.append(f"    return b''.join(({', '.join(parts)}{',' if parts else ''}))")
    dec += [
        "    if p != n:",
        f"        raise Malformed('{kind}: ' + str(n - p) + ' trailing bytes')",
        "    return f",
    ]
    exec("\n".join(enc) + "\n\n" + "\n".join(dec), g)  # noqa: S102 -- our own schemas
    return g["enc"], g["dec"]


# kind -> (code, pack(fields) -> body, unpack(datagram, start, end) -> fields)
_CODECS: dict[str, tuple[int, Callable, Callable]] = {
    kind: (code, *_compile(kind, schema)) for kind, (code, schema) in _SCHEMAS.items()
}
_BY_CODE: dict[int, tuple[str, Callable]] = {c: (k, d) for k, (c, _, d) in _CODECS.items()}
_HEAD5 = struct.Struct(">QQQQQ")  # the header after magic, version, type
_MIN_DATAGRAM = HEADER.size + MAC_LEN
_compare_digest = hmac.compare_digest
_new_header = Header._make

# --- batches ----------------------------------------------------------------------------
# BATCH (type 24): several messages for one peer in one datagram, under one header and
# one MAC.  Body: repeated [u8 type][u64 rid][u64 reply_to][u32 length][body].  The outer
# header's rid and reply_to are 0; each inner message carries its own, and is then
# handled exactly as if it had come alone (dedupe by (sender, rid), replies by
# reply_to).  The datagram is parsed whole before anything is handled: a truncated,
# malformed or nested inner message refuses the whole batch (one count).  Replay
# defence is the outer seq's.  A peer from before batches drops one as unknown_type.
BATCH = 24
BATCH_MAX = 1400  # bytes per batch datagram: one frame on a 1500-byte MTU path
_INNER = struct.Struct(">BQQI")


def _dec_batch(b, p: int, n: int) -> dict:
    items = []
    unpack = _INNER.unpack_from
    while p < n:
        if p + _INNER.size > n:
            raise Truncated("batch: inner header")
        code, rid, reply_to, ln = unpack(b, p)
        p += _INNER.size
        q = p + ln
        if q > n:
            raise Truncated("batch: inner body")
        ent = _BY_CODE.get(code)
        if ent is None or code == BATCH:
            raise UnknownType(f"batch: inner type {code}")
        items.append((rid, reply_to, Message(ent[0], ent[1](b, p, q))))
        p = q
    if not items:
        raise Malformed("batch: empty")
    return {"items": items}


def batch_item(msg: Message, rid: int = 0, reply_to: int = 0) -> bytes:
    """One message framed for a batch body (Codec.encode_batch joins them)."""
    code, pack, _ = _CODECS[msg.kind]
    body = pack(msg.f)
    return _INNER.pack(code, rid, reply_to, len(body)) + body


_BY_CODE[BATCH] = ("batch", _dec_batch)


def load_key(path: str | Path) -> bytes:
    """The cluster key: a file holding >= 32 hex digits (or >= 16 raw bytes)."""
    raw = Path(path).read_bytes().strip()
    try:
        key = bytes.fromhex(raw.decode())
    except (UnicodeDecodeError, ValueError):
        key = raw
    if len(key) < 16:
        raise ValueError(f"{path}: cluster key must be at least 16 bytes")
    return key


class Codec:
    """Encode and authenticate datagrams; decode, verify and replay-check them."""

    def __init__(
        self,
        key: bytes,
        sender: int | None = None,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.time,
        fast: bool | None = None,
    ) -> None:
        self._key = key
        self._mac_proto = hmac.new(key, digestmod=hashlib.sha256)
        if fast is None:
            fast = os.environ.get("XX_WIRE_CODEC", "") != "legacy"
        self.fast = fast
        if not fast:  # the reference codec: same bytes, same refusals, slower
            self.encode = self._encode_legacy  # type: ignore[method-assign]
            self._decode = self._decode_legacy  # type: ignore[method-assign]
        self.sender = sender if sender is not None else random.getrandbits(64) or 1
        self._seq = 0
        self.window_ms = int(window_s * 1000)
        self.clock = clock
        # sender -> [highest seq, set of seqs within REPLAY_SEQS behind it, last ts_ms]
        self._seen: OrderedDict[int, list] = OrderedDict()
        self.dropped: Counter[str] = Counter()

    def _mac(self, data: bytes) -> bytes:
        # the keyed state is computed once: copying it is cheaper here than the one-shot
        # hmac.digest(), which re-derives the key pads on every call (3.7 vs 4.7 us)
        m = self._mac_proto.copy()
        m.update(data)
        return m.digest()[:MAC_LEN]

    def _mac_legacy(self, data: bytes) -> bytes:
        m = self._mac_proto.copy()
        m.update(data)
        return m.digest()[:MAC_LEN]

    def encode(self, msg: Message, rid: int = 0, reply_to: int = 0) -> bytes:
        code, pack, _ = _CODECS[msg.kind]
        self._seq += 1
        ts = int(self.clock() * 1000)
        data = HEADER.pack(MAGIC, VERSION, code, self.sender, self._seq, ts, rid, reply_to)
        data += pack(msg.f)
        if len(data) + MAC_LEN > MAX_DATAGRAM:
            raise ValueError(f"{msg.kind}: {len(data) + MAC_LEN} bytes exceeds {MAX_DATAGRAM}")
        return data + self._mac(data)

    def encode_batch(self, items: list[bytes]) -> bytes:
        """One BATCH datagram of messages framed by ``batch_item``."""
        self._seq += 1
        ts = int(self.clock() * 1000)
        data = HEADER.pack(MAGIC, VERSION, BATCH, self.sender, self._seq, ts, 0, 0)
        data += b"".join(items)
        if len(data) + MAC_LEN > MAX_DATAGRAM:
            raise ValueError(f"batch: {len(data) + MAC_LEN} bytes exceeds {MAX_DATAGRAM}")
        return data + self._mac(data)

    def _encode_legacy(self, msg: Message, rid: int = 0, reply_to: int = 0) -> bytes:
        code = _SCHEMAS[msg.kind][0]
        self._seq += 1
        ts = int(self.clock() * 1000)
        head = HEADER.pack(MAGIC, VERSION, code, self.sender, self._seq, ts, rid, reply_to)
        data = head + _pack_body(msg.kind, msg.f)
        if len(data) + MAC_LEN > MAX_DATAGRAM:
            raise ValueError(f"{msg.kind}: {len(data) + MAC_LEN} bytes exceeds {MAX_DATAGRAM}")
        return data + self._mac_legacy(data)

    def decode(self, data: bytes) -> tuple[Header, Message]:
        """Verify and parse one datagram; raises a WireError (and counts it) if refused."""
        try:
            return self._decode(data)
        except WireError as e:
            self.dropped[e.reason] += 1
            raise

    def _decode(self, data: bytes) -> tuple[Header, Message]:
        n = len(data)
        if n > MAX_DATAGRAM:
            raise Oversized(f"{n} bytes")
        if n < _MIN_DATAGRAM:
            raise Truncated(f"{n} bytes")
        if data[:2] != MAGIC:
            raise BadMagic("not an XX datagram")
        if data[2] != VERSION:
            raise BadVersion(f"version {data[2]}")
        body_end = n - MAC_LEN
        if not _compare_digest(self._mac(data[:body_end]), data[body_end:]):
            raise BadMac("authentication failed")
        ent = _BY_CODE.get(data[3])
        if ent is None:
            raise UnknownType(f"type {data[3]}")
        hdr = _new_header(_HEAD5.unpack_from(data, 4))
        now = int(self.clock() * 1000)
        if abs(now - hdr[2]) > self.window_ms:
            raise Stale(f"timestamp {hdr[2]} outside window at {now}")
        kind = ent[0]
        try:
            f = ent[1](data, HEADER.size, body_end)
        except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
            if isinstance(e, WireError):
                raise
            raise Malformed(f"{kind}: {e}") from None
        except RecursionError:
            raise Malformed(f"{kind}: JSON nested too deep") from None
        self._check_replay(hdr[0], hdr[1], now)
        return hdr, Message(kind, f)

    def _decode_legacy(self, data: bytes) -> tuple[Header, Message]:
        n = len(data)
        if n > MAX_DATAGRAM:
            raise Oversized(f"{n} bytes")
        if n < HEADER.size + MAC_LEN:
            raise Truncated(f"{n} bytes")
        if data[:2] != MAGIC:
            raise BadMagic("not an XX datagram")
        if data[2] != VERSION:
            raise BadVersion(f"version {data[2]}")
        body_end = n - MAC_LEN
        if not hmac.compare_digest(self._mac_legacy(data[:body_end]), data[body_end:]):
            raise BadMac("authentication failed")
        _, _, code, sender, seq, ts, rid, reply_to = HEADER.unpack_from(data)
        kind = TYPES.get(code)
        if kind is None:
            raise UnknownType(f"type {code}")
        now = int(self.clock() * 1000)
        if abs(now - ts) > self.window_ms:
            raise Stale(f"timestamp {ts} outside window at {now}")
        f = _unpack_body(kind, data[HEADER.size : body_end])
        self._check_replay(sender, seq, now)
        return Header(sender, seq, ts, rid, reply_to), Message(kind, f)

    def _check_replay(self, sender: int, seq: int, now: int) -> None:
        st = self._seen.get(sender)
        if st is None:
            self._expire(now)
            if len(self._seen) >= MAX_SENDERS:
                raise Replayed("too many senders inside the window")
            self._seen[sender] = [seq, {seq}, now]
            return
        top, seqs, _ = st
        if seq in seqs or seq <= top - REPLAY_SEQS:
            raise Replayed(f"seq {seq} from {sender:#x}")
        seqs.add(seq)
        if seq > top:
            st[0] = seq
            if len(seqs) > 2 * REPLAY_SEQS:
                floor = seq - REPLAY_SEQS
                st[1] = {s for s in seqs if s > floor}
        st[2] = now
        self._seen.move_to_end(sender)

    def _expire(self, now: int) -> None:
        """Forget senders silent for > 2 windows: their old datagrams are Stale anyway."""
        while self._seen:
            sender, st = next(iter(self._seen.items()))
            if now - st[2] <= 2 * self.window_ms:
                break
            del self._seen[sender]


# --- large payloads --------------------------------------------------------------------


def digest(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()


def fragment_count(size: int, chunk: int = CHUNK) -> int:
    return (size + chunk - 1) // chunk


class Reassembly:
    """Receiver side of a pulled transfer: fragments in any order, duplicates ignored,
    the result verified against the digest the job was announced with."""

    def __init__(self, dig: bytes, size: int, chunk: int = CHUNK) -> None:
        if size > MAX_PAYLOAD:
            raise Oversized(f"payload of {size} bytes exceeds {MAX_PAYLOAD}")
        self.digest = dig
        self.size = size
        self.chunk = chunk
        self.count = fragment_count(size, chunk)
        self._parts: dict[int, bytes] = {}
        self._low = 0  # every index below this has arrived

    def add(self, m: Message) -> None:
        """Take one FRAG; a fragment that cannot belong to this payload is a WireError."""
        if m.digest != self.digest or m.size != self.size:
            raise Malformed("fragment of another payload")
        if not 0 <= m.index < self.count:
            raise Malformed(f"fragment index {m.index} of {self.count}")
        want = min(self.chunk, self.size - m.index * self.chunk)
        if len(m.data) != want:
            raise Malformed(f"fragment {m.index}: {len(m.data)} bytes, expected {want}")
        self._parts.setdefault(m.index, m.data)

    @property
    def have(self) -> int:
        return len(self._parts)

    def missing(self, limit: int) -> list[int]:
        while self._low < self.count and self._low in self._parts:
            self._low += 1
        out = []
        for i in range(self._low, self.count):
            if i not in self._parts:
                out.append(i)
                if len(out) >= limit:
                    break
        return out

    @property
    def complete(self) -> bool:
        return len(self._parts) == self.count

    def result(self) -> bytes:
        data = b"".join(self._parts[i] for i in range(self.count))
        if hashlib.sha256(data).digest() != self.digest:
            self._parts.clear()  # start over rather than run a job on corrupt input
            raise Malformed("payload digest mismatch")
        return data


def frag_message(payload: bytes, dig: bytes, index: int, chunk: int = CHUNK) -> Message:
    return Message(
        "frag",
        {
            "digest": dig,
            "index": index,
            "size": len(payload),
            "data": payload[index * chunk : (index + 1) * chunk],
        },
    )


# --- the asyncio endpoint --------------------------------------------------------------

Addr = tuple[str, int]


def parse_addr(text: str) -> Addr:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    return host, int(port)


def fmt_addr(addr: Addr) -> str:
    return f"{addr[0]}:{addr[1]}"


class _Call:
    """One outstanding request of an Endpoint: retransmitted by a timer (not a task per
    request: cheap at 10k requests/s) until answered, timed out or cancelled."""

    __slots__ = ("ep", "addr", "msg", "rid", "cb", "deadline", "rto", "max_rto")
    __slots__ += ("sends", "t_first", "timer", "finished")

    def __init__(self, ep, addr, msg, rid, cb, timeout, first_rto, max_rto) -> None:
        self.ep, self.addr, self.msg, self.rid, self.cb = ep, addr, msg, rid, cb
        self.t_first = asyncio.get_running_loop().time()
        self.deadline = self.t_first + timeout
        # TCP-style: never retransmit sooner than the measured round trip allows, or a
        # busy receiver is buried under copies of what it has not yet read (collapse)
        self.rto = min(max(first_rto, ep.srtt + 4 * ep.rttvar), max_rto)
        self.max_rto = max_rto
        self.sends = 0
        self.timer: asyncio.TimerHandle | None = None
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def fire(self) -> None:
        if self.finished:
            return
        loop = asyncio.get_running_loop()
        left = self.deadline - loop.time()
        if left <= 0:
            self._end(None, TimeoutError(f"{self.msg.kind} to {fmt_addr(self.addr)}: no answer"))
            return
        if self.sends:
            self.ep.stats["retransmits"] += 1
        self.ep._post(self.addr, self.msg, self.rid, 0)
        self.sends += 1
        self.timer = loop.call_later(min(self.rto, left), self.fire)
        self.rto = min(self.rto * 2, self.max_rto)

    def set_result(self, rep: Message) -> None:
        if self.sends == 1:  # Karn: sample only unambiguous round trips
            self.ep._rtt_sample(asyncio.get_running_loop().time() - self.t_first)
        self._end(rep, None)

    def cancel(self) -> None:
        if not self.finished:
            self._end(None, asyncio.CancelledError())

    def _end(self, rep: Message | None, exc: BaseException | None) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        self.ep._pending.pop(self.rid, None)
        try:
            self.cb(rep, exc)
        except Exception:  # a caller's bug must not take the endpoint down with it
            self.ep.stats["handler_errors"] += 1


class Endpoint:
    """One UDP socket: requests retransmitted with backoff until answered, incoming
    requests deduped by (sender, rid) with their replies cached, payloads served and
    fetched by digest.  ``handler(hdr, msg, addr)`` returns the reply Message (or None,
    or a coroutine resolving to one) for each new request or one-way message.

    ``drop`` (0..1) with ``seed`` drops that share of outgoing datagrams: the tests'
    loss injection.
    """

    def __init__(
        self,
        codec: Codec,
        handler: Callable | None = None,
        drop: float = 0.0,
        seed: int | None = None,
        batch: bool | None = None,
    ) -> None:
        self.codec = codec
        self.handler = handler
        self.sock = None
        self._rid = random.getrandbits(40)
        self._pending: dict[int, _Call] = {}
        self._replies: OrderedDict[tuple[int, int], tuple[float, Message | None]] = OrderedDict()
        self.reply_ttl = 2 * WINDOW_S
        self.drop = drop
        self._drop_rng = random.Random(seed)
        self.payloads: dict[bytes, bytes] = {}  # digest -> payload we serve to FETCH
        self._fetches: dict[bytes, tuple[Reassembly, asyncio.Event]] = {}
        self.stats: Counter[str] = Counter()
        self.srtt, self.rttvar = 0.0, 0.0  # smoothed round trip of our requests (s)
        # natural batching: messages for one peer produced in one pass of the event loop
        # leave together, as a BATCH, at the end of it (call_soon, never a timer)
        if batch is None:
            batch = codec.fast and os.environ.get("XX_WIRE_BATCH", "1") != "0"
        self.batch = batch
        self._outq: dict[Addr, list[tuple[Message, int, int]]] = {}

    # socket plumbing: a raw non-blocking socket under loop.add_reader.  asyncio's own
    # datagram transport reads one datagram per loop iteration; draining the socket per
    # wakeup costs one select() per burst instead of one per datagram.
    def attach(self, sock) -> None:
        self.sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._drain)

    def _drain(self) -> None:
        for _ in range(256):  # bounded, so timers and other sockets get their turn
            try:
                data, addr = self.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.stats["socket_errors"] += 1
                return
            self.datagram_received(data, addr)

    @property
    def addr(self) -> Addr:
        return self.sock.getsockname()[:2]

    def close(self) -> None:
        if self.sock is not None and self.sock.fileno() >= 0:
            try:
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            except RuntimeError:
                pass  # no loop running any more
            self.sock.close()
        for c in list(self._pending.values()):
            c.cancel()

    def _send(self, data: bytes, addr: Addr) -> None:
        if self.drop and self._drop_rng.random() < self.drop:
            self.stats["dropped_out"] += 1
            return
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.stats["send_full"] += 1  # like a loss: retransmission covers it
        except OSError:
            self.stats["socket_errors"] += 1

    def send(self, addr: Addr, msg: Message, reply_to: int = 0) -> None:
        """Fire and forget (heartbeats, replies, fragments)."""
        self._post(addr, msg, 0, reply_to)

    def _post(self, addr: Addr, msg: Message, rid: int, reply_to: int) -> None:
        """Send ``msg`` now, or with the other messages for ``addr`` of this loop pass."""
        if not self.batch:
            self._send(self.codec.encode(msg, rid, reply_to), addr)
            return
        q = self._outq.get(addr)
        if q is None:
            if not self._outq:
                asyncio.get_running_loop().call_soon(self._flush)
            q = self._outq[addr] = []
        q.append((msg, rid, reply_to))

    def _flush(self) -> None:
        outq, self._outq = self._outq, {}
        room = BATCH_MAX - HEADER.size - MAC_LEN
        for addr, items in outq.items():
            if len(items) == 1:
                self._send(self.codec.encode(*items[0]), addr)
                continue
            run: list[tuple[Message, int, int]] = []
            framed: list[bytes] = []
            size = 0
            for it in items:
                b = batch_item(*it)
                if run and size + len(b) > room:
                    self._send_run(run, framed, addr)
                    run, framed, size = [], [], 0
                run.append(it)
                framed.append(b)
                size += len(b)
            self._send_run(run, framed, addr)

    def _send_run(self, run: list, framed: list[bytes], addr: Addr) -> None:
        if len(run) == 1:  # alone (or too big to share a datagram): a plain datagram
            self._send(self.codec.encode(*run[0]), addr)
        else:
            self.stats["batches"] += 1
            self._send(self.codec.encode_batch(framed), addr)

    async def request(
        self,
        addr: Addr,
        msg: Message,
        timeout: float = 5.0,
        first_rto: float = 0.2,
        max_rto: float = 1.0,
    ) -> Message:
        """Send until a reply arrives (rto doubling up to max_rto); TimeoutError after
        ``timeout`` seconds.  The reply is the answering Message."""
        fut = asyncio.get_running_loop().create_future()

        def done(rep: Message | None, exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(rep)
            elif isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)

        call = self.call(addr, msg, done, timeout, first_rto, max_rto)
        try:
            return await fut
        finally:
            call.cancel()  # no-op once answered; stops the timer if we were cancelled

    def call(
        self,
        addr: Addr,
        msg: Message,
        done: Callable[[Message | None, BaseException | None], None],
        timeout: float = 5.0,
        first_rto: float = 0.2,
        max_rto: float = 1.0,
    ) -> _Call:
        """``request`` without a task: ``done(reply, None)`` when the reply arrives, or
        ``done(None, TimeoutError)`` after ``timeout``, or ``done(None, CancelledError)``
        if the call is cancelled or the endpoint closed -- exactly one of them."""
        self._rid += 1
        c = _Call(self, addr, msg, self._rid, done, timeout, first_rto, max_rto)
        self._pending[c.rid] = c
        c.fire()
        return c

    def _rtt_sample(self, r: float) -> None:
        self.rttvar += 0.25 * (abs(self.srtt - r) - self.rttvar)
        self.srtt += 0.125 * (r - self.srtt)

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            hdr, msg = self.codec.decode(data)
        except WireError:
            return  # counted in codec.dropped
        addr = addr[:2]
        if msg.kind == "batch":
            self.stats["batches_in"] += 1
            sender, seq, ts = hdr[0], hdr[1], hdr[2]
            for rid, reply_to, m in msg.f["items"]:
                self._dispatch(Header(sender, seq, ts, rid, reply_to), m, addr)
            return
        self._dispatch(hdr, msg, addr)

    def _dispatch(self, hdr: Header, msg: Message, addr: Addr) -> None:
        if hdr.reply_to:
            fut = self._pending.get(hdr.reply_to)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            elif msg.kind == "frag":
                self._on_frag(msg)
            return
        if msg.kind == "fetch":
            self._serve_fetch(hdr, msg, addr)
            return
        if hdr.rid:
            key = (hdr.sender, hdr.rid)
            cached = self._replies.get(key)
            if cached is not None:
                self.stats["dup_requests"] += 1
                if cached[1] is not None:  # same answer, new datagram (else: a replay)
                    self._post(addr, cached[1], 0, hdr.rid)
                return
            self._expire_replies()
            self._replies[key] = (time.monotonic(), None)  # in progress
        if self.handler is None:
            return
        try:
            out = self.handler(hdr, msg, addr)
        except Exception:  # a handler bug must not take the daemon down with it
            self.stats["handler_errors"] += 1
            self._replies.pop((hdr.sender, hdr.rid), None)
            return
        if asyncio.iscoroutine(out):
            task = asyncio.ensure_future(out)
            task.add_done_callback(lambda t: self._finish(hdr, addr, t))
        else:
            self._reply(hdr, addr, out)

    def _finish(self, hdr: Header, addr: Addr, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            self.stats["handler_errors"] += 1
            self._replies.pop((hdr.sender, hdr.rid), None)
            return
        self._reply(hdr, addr, task.result())

    def _reply(self, hdr: Header, addr: Addr, out: Message | None) -> None:
        if not hdr.rid:
            return
        if out is None:
            out = Message("ack")
        self._replies[(hdr.sender, hdr.rid)] = (time.monotonic(), out)
        self._post(addr, out, 0, hdr.rid)

    def _expire_replies(self) -> None:
        cutoff = time.monotonic() - self.reply_ttl
        while self._replies:
            key, (t, _) = next(iter(self._replies.items()))
            if t > cutoff:
                break
            del self._replies[key]

    # payload transfer: the receiver pulls ranges it lacks (selective repeat)
    def _serve_fetch(self, hdr: Header, msg: Message, addr: Addr) -> None:
        payload = self.payloads.get(msg.digest)
        if payload is None:
            self._send(
                self.codec.encode(Message("error", {"reason": "no such payload"}), 0, hdr.rid), addr
            )
            return
        n = fragment_count(len(payload))
        for i in range(msg.first, min(msg.first + min(msg.count, 256), n)):
            self._send(self.codec.encode(frag_message(payload, msg.digest, i), 0, hdr.rid), addr)

    def _on_frag(self, msg: Message) -> None:
        entry = self._fetches.get(msg.digest)
        if entry is None:
            return
        try:
            entry[0].add(msg)
        except WireError as e:
            self.codec.dropped[e.reason] += 1
            return
        entry[1].set()

    async def fetch(
        self, addr: Addr, dig: bytes, size: int, timeout: float = 30.0, window: int = 64
    ) -> bytes:
        """Pull a payload of ``size`` bytes by digest from ``addr``: ask for up to
        ``window`` missing fragments, re-ask for what is still missing after a quiet rto."""
        r = Reassembly(dig, size)
        ev = asyncio.Event()
        self._fetches[dig] = (r, ev)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while not r.complete:
                if loop.time() > deadline:
                    raise TimeoutError(f"payload from {fmt_addr(addr)}: transfer stalled")
                miss = r.missing(window)
                runs: list[list[int]] = []  # contiguous runs of the missing fragments
                for i in miss:
                    if runs and runs[-1][0] + runs[-1][1] == i:
                        runs[-1][1] += 1
                    else:
                        runs.append([i, 1])
                for first, count in runs:
                    self._rid += 1
                    req = Message("fetch", {"digest": dig, "first": first, "count": count})
                    self._send(self.codec.encode(req, self._rid), addr)
                target = r.have + len(miss)
                try:
                    while r.have < target and not r.complete:  # collect while they arrive
                        ev.clear()
                        await asyncio.wait_for(ev.wait(), 0.05)
                except TimeoutError:
                    self.stats["fetch_retries"] += 1
            return r.result()
        finally:
            self._fetches.pop(dig, None)


async def open_endpoint(
    bind: Addr,
    codec: Codec,
    handler=None,
    drop: float = 0.0,
    seed: int | None = None,
    batch: bool | None = None,
) -> Endpoint:
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in bind[0] else socket.AF_INET, socket.SOCK_DGRAM)
    # asyncio reads one datagram per wakeup, so a burst waits in the kernel: give it room
    # (the default ~200 KiB holds only a few hundred small datagrams; FORCE needs root)
    for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUF)  # SO_*BUFFORCE
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUF)
    sock.bind(bind)
    sock.setblocking(False)
    ep = Endpoint(codec, handler, drop, seed, batch)
    ep.attach(sock)
    return ep


def drop_from_env() -> tuple[float, int | None]:
    """XX_WIRE_DROP=P[:SEED]: drop P of outgoing datagrams (tests' loss injection)."""
    v = os.environ.get("XX_WIRE_DROP", "")
    if not v:
        return 0.0, None
    p, _, s = v.partition(":")
    return float(p), (int(s) if s else None)


class Service:
    """A daemon on one endpoint with background tasks (the shard, the node's dispatcher):
    what they share of starting and stopping."""

    ep: Endpoint | None = None

    def _spawn(self, coro) -> asyncio.Task:
        tasks = self.__dict__.setdefault("_tasks", set())
        t = asyncio.ensure_future(coro)
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        return t

    def close(self) -> None:
        for t in list(self.__dict__.get("_tasks", ())):
            t.cancel()
        if self.ep is not None:
            self.ep.close()

    async def serve_until_signal(self) -> None:
        """Run until SIGINT or SIGTERM, then close: the standalone daemons' main loop."""
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        self.close()

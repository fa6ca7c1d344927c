"""Datagrams: the header, the body (MessagePack through msgspec), the keyed MAC, the
replay defence; every failure to decode one is a WireError subclass, counted by reason
(see the package docstring for the layout and why each defence)."""

from __future__ import annotations

import hashlib
import random
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from hmac import compare_digest
from pathlib import Path
from typing import Union

import msgspec

from xxnode.wire.messages import MESSAGES, U64, Message

MAGIC = b"XX"
VERSION = 2  # 1: schema-packed bodies, HMAC-SHA256
HEADER = struct.Struct(">2sBQQQ")
MAC_LEN = 16
MAX_DATAGRAM = 9216  # largest datagram accepted; bigger inputs go as fragments
BATCH_MAX = 1400  # messages share a datagram up to this size: one 1500-byte MTU frame
WINDOW_S = 30.0  # replay window: datagrams older/newer than this are refused
REPLAY_SEQS = 8192  # per sender: seqs remembered behind the highest seen
MAX_SENDERS = 65536


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


# --- the codec --------------------------------------------------------------------------

Envelope = tuple[int, int, Message]  # (rid, reply_to, message)
_BODY = msgspec.msgpack.Decoder(list[tuple[U64, U64, Union[MESSAGES]]])  # noqa: UP007
_encode = msgspec.msgpack.Encoder().encode
_MIN_DATAGRAM = HEADER.size + 1 + MAC_LEN
_MAGIC_VERSION = MAGIC + bytes((VERSION,))
_SEQ_TS = struct.Struct(">QQ")  # the header after magic, version and sender


def _array_head(n: int) -> bytes:
    """MessagePack array header for ``n`` items (the frame around pre-encoded ones)."""
    return bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big")


def _decode_body(data: bytes, end: int) -> list[Envelope]:
    try:
        items = _BODY.decode(memoryview(data)[HEADER.size : end])
    except msgspec.ValidationError as e:
        if "Invalid value" in str(e) and "][2][0]" in str(e):
            raise UnknownType(str(e)) from None
        raise Malformed(str(e)) from None
    except msgspec.DecodeError as e:
        if "truncated" in str(e):
            raise Truncated(str(e)) from None
        raise Malformed(str(e)) from None
    except RecursionError:
        raise Malformed("nested too deep") from None
    if not items:
        raise Malformed("no messages")
    return items


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
    ) -> None:
        if len(key) > 64:  # BLAKE2b keys are at most 64 bytes
            key = hashlib.blake2b(key).digest()
        # the keyed state is set up once; copying it is cheaper than re-keying per datagram
        self._mac_proto = hashlib.blake2b(key=key, digest_size=MAC_LEN)
        self.sender = sender if sender is not None else random.getrandbits(64) or 1
        self._prefix = _MAGIC_VERSION + self.sender.to_bytes(8, "big")
        self._seq = 0
        self.window_ms = int(window_s * 1000)
        self.clock = clock
        # sender -> [highest seq, set of seqs within REPLAY_SEQS behind it, last ts_ms]
        self._seen: OrderedDict[int, list] = OrderedDict()
        self.dropped: Counter[str] = Counter()

    def seal(self, body: bytes) -> bytes:
        """One datagram around an encoded body (a MessagePack array of envelopes)."""
        self._seq += 1
        data = self._prefix + _SEQ_TS.pack(self._seq, int(self.clock() * 1000)) + body
        if len(data) + MAC_LEN > MAX_DATAGRAM:
            raise ValueError(f"datagram of {len(data) + MAC_LEN} bytes exceeds {MAX_DATAGRAM}")
        m = self._mac_proto.copy()
        m.update(data)
        return data + m.digest()

    def encode(self, msg: Message, rid: int = 0, reply_to: int = 0) -> bytes:
        """One message alone in a datagram."""
        return self.seal(_encode(((rid, reply_to, msg),)))

    def pack(self, framed: list[bytes]) -> bytes:
        """One datagram of messages encoded by ``frame``."""
        return self.seal(_array_head(len(framed)) + b"".join(framed))

    def decode(self, data: bytes) -> tuple[int, list[Envelope]]:
        """Verify and parse one datagram into (sender, [(rid, reply_to, msg), ...]);
        raises a WireError (and counts it) if refused -- the whole datagram, then.
        (One function on purpose: it runs for every datagram a shard receives.)"""
        try:
            n = len(data)
            if n > MAX_DATAGRAM:
                raise Oversized(f"{n} bytes")
            if n < _MIN_DATAGRAM:
                raise Truncated(f"{n} bytes")
            if data[:3] != _MAGIC_VERSION:
                if data[:2] != MAGIC:
                    raise BadMagic("not an XX datagram")
                raise BadVersion(f"version {data[2]}")
            body_end = n - MAC_LEN
            m = self._mac_proto.copy()
            m.update(data[:body_end])
            if not compare_digest(m.digest(), data[body_end:]):
                raise BadMac("authentication failed")
            _, _, sender, seq, ts = HEADER.unpack_from(data)
            now = int(self.clock() * 1000)
            if abs(now - ts) > self.window_ms:
                raise Stale(f"timestamp {ts} outside window at {now}")
            items = _decode_body(data, body_end)
            self._check_replay(sender, seq, now)
            return sender, items
        except WireError as e:
            self.dropped[e.reason] += 1
            raise

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


_MAX_FRAMED = MAX_DATAGRAM - HEADER.size - MAC_LEN - 3  # one message, alone in a datagram


def frame(msg: Message, rid: int, reply_to: int) -> bytes:
    """One envelope, encoded; refused here, in the sender's context, if it cannot fit."""
    b = _encode((rid, reply_to, msg))
    if len(b) > _MAX_FRAMED:
        raise ValueError(f"{msg.kind}: {len(b)} bytes does not fit a datagram")
    return b


def check(msg: Message) -> Message:
    """``msg`` as a peer will decode it, or ValueError: for messages built from outside
    data (a user's spec, an executor's accounting).  The encoder does not apply the
    field bounds; a message that broke them would make its whole datagram refused."""
    try:
        msgspec.msgpack.decode(frame(msg, 0, 0), type=tuple[int, int, type(msg)])
    except msgspec.ValidationError as e:
        raise ValueError(f"{msg.kind}: {e}") from None
    return msg

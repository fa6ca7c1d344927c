"""Payloads larger than a datagram (a job's input, a result's output): addressed by
digest, sent as numbered fragments the receiver asks for (FETCH) and reassembles."""

from __future__ import annotations

import hashlib

from xxnode.wire.codec import Malformed, Oversized
from xxnode.wire.messages import MAX_PAYLOAD, Frag

CHUNK = 1200  # fragment data per datagram: fits a 1500-byte MTU path with our headers


def digest(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()


def fragment_count(size: int, chunk: int = CHUNK) -> int:
    return (size + chunk - 1) // chunk


class Reassembly:
    """Receiver side of a pulled transfer: fragments in any order, duplicates ignored,
    the result verified against the digest the job was announced with."""

    def __init__(self, dig: bytes, size: int, chunk: int = CHUNK, limit: int = MAX_PAYLOAD):
        if size > limit:
            raise Oversized(f"payload of {size} bytes exceeds {limit}")
        self.digest = dig
        self.size = size
        self.chunk = chunk
        self.count = fragment_count(size, chunk)
        self._parts: dict[int, bytes] = {}
        self._low = 0  # every index below this has arrived

    def add(self, m: Frag) -> None:
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


def frag_message(payload: bytes, dig: bytes, index: int, chunk: int = CHUNK) -> Frag:
    data = payload[index * chunk : (index + 1) * chunk]
    return Frag(dig, index, len(payload), data)

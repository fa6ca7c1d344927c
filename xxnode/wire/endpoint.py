"""The asyncio endpoint: one UDP socket, requests retransmitted until answered (timer
wheel, adaptive RTO), replies cached for idempotent repeats, messages to one peer batched
into one datagram per loop pass, and payload transfer by digest.

Over 400 lines on purpose: the Endpoint is one object whose receive -> handle -> reply ->
batch path is the shard's hot loop; its parts share the same few dicts, and the order of
those steps (dedupe before the handler, reply cached before it is sent) is the protocol's
idempotence. Split, that order would be spread over modules."""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from collections.abc import Callable

from xxnode.wire.codec import BATCH_MAX, HEADER, MAC_LEN, Codec, WireError, frame
from xxnode.wire.messages import MAX_PAYLOAD, Ack, Error, Fetch, Frag, Message
from xxnode.wire.replies import _MISSING, ReplyCache
from xxnode.wire.transfer import Reassembly, frag_message, fragment_count

SOCKET_BUF = 8 << 20

Addr = tuple[str, int]


def parse_addr(text: str) -> Addr:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    return host, int(port)


def fmt_addr(addr: Addr) -> str:
    return f"{addr[0]}:{addr[1]}"


TICK = 0.005  # retransmission timers are bucketed: one loop timer per tick, not per request
_ROOM = BATCH_MAX - HEADER.size - MAC_LEN  # body bytes that still fit one frame


class _Call:
    """One outstanding request of an Endpoint: retransmitted from the endpoint's timer
    wheel until answered, timed out or cancelled."""

    __slots__ = ("ep", "addr", "kind", "framed", "rid", "cb", "deadline", "rto", "max_rto")
    __slots__ += ("sends", "t_first", "finished")

    def __init__(self, ep, addr, msg, rid, cb, timeout, first_rto, max_rto) -> None:
        self.ep, self.addr, self.kind, self.rid, self.cb = ep, addr, msg.kind, rid, cb
        self.framed = frame(msg, rid, 0)  # encoded once; retransmissions reuse it
        self.t_first = ep.loop.time()
        self.deadline = self.t_first + timeout
        # TCP-style: never retransmit sooner than the measured round trip allows, or a
        # busy receiver is buried under copies of what it has not yet read (collapse)
        self.rto = min(max(first_rto, ep.srtt + 4 * ep.rttvar), max_rto)
        self.max_rto = max_rto
        self.sends = 0
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def fire(self) -> None:
        if self.finished:
            return
        now = self.ep.loop.time()
        left = self.deadline - now
        if left <= 0:
            self._end(None, TimeoutError(f"{self.kind} to {fmt_addr(self.addr)}: no answer"))
            return
        if self.sends:
            self.ep.stats["retransmits"] += 1
        self.ep._post(self.addr, self.framed)
        self.sends += 1
        self.ep._wake_at(now + min(self.rto, left), self)
        self.rto = min(self.rto * 2, self.max_rto)

    def set_result(self, rep: Message) -> None:
        if self.sends == 1:  # Karn: sample only unambiguous round trips
            self.ep._rtt_sample(self.ep.loop.time() - self.t_first)
        self._end(rep, None)

    def cancel(self) -> None:
        if not self.finished:
            self._end(None, asyncio.CancelledError())

    def _end(self, rep: Message | None, exc: BaseException | None) -> None:
        self.finished = True  # its wheel entry is skipped when the tick comes
        self.ep._pending.pop(self.rid, None)
        try:
            self.cb(rep, exc)
        except Exception:  # a caller's bug must not take the endpoint down with it
            self.ep.stats["handler_errors"] += 1


class Endpoint:
    """One UDP socket: requests retransmitted with backoff until answered, incoming
    requests deduped by (sender, rid) with their replies cached, payloads served and
    fetched by digest.  ``handler(msg, addr)`` returns the reply Message (or None, or a
    coroutine resolving to one) for each new request or one-way message.

    Natural batching: messages for one peer produced in one pass of the event loop leave
    together at the end of it (call_soon, never a timer: nothing waits for company).

    ``drop`` (0..1) with ``seed`` drops that share of outgoing datagrams: the tests'
    loss injection.
    """

    def __init__(
        self, codec: Codec, handler: Callable | None = None, drop: float = 0.0, seed=None
    ) -> None:
        self.codec = codec
        self.handler = handler
        self.sock = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._rid = random.getrandbits(40)
        self._pending: dict[int, _Call] = {}
        # long enough for any retransmission of a request to find its answer; past it a
        # late duplicate is handled again, which every handler makes harmless (job ids)
        self._replies = ReplyCache(5.0)
        self.drop = drop
        self._drop_rng = random.Random(seed)
        self.payloads: dict[bytes, bytes] = {}  # digest -> payload we serve to FETCH
        self._fetches: dict[bytes, tuple[Reassembly, asyncio.Event]] = {}
        self.stats: Counter[str] = Counter()
        self.srtt, self.rttvar = 0.0, 0.0  # smoothed round trip of our requests (s)
        self._outq: dict[Addr, list[bytes]] = {}
        self._wheel: dict[int, tuple[asyncio.TimerHandle, list[_Call]]] = {}

    # socket plumbing: a raw non-blocking socket under loop.add_reader.  asyncio's own
    # datagram transport reads one datagram per loop iteration; draining the socket per
    # wakeup costs one select() per burst instead of one per datagram.
    def attach(self, sock) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._drain)

    def _drain(self) -> None:
        recv, received = self.sock.recvfrom, self.datagram_received
        for _ in range(256):  # bounded, so timers and other sockets get their turn
            try:
                data, addr = recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.stats["socket_errors"] += 1
                return
            received(data, addr)

    @property
    def addr(self) -> Addr:
        return self.sock.getsockname()[:2]

    def close(self) -> None:
        if self.sock is not None and self.sock.fileno() >= 0:
            if self._outq:
                self._flush()  # replies already given (a DONE's ack) still leave
            try:
                self.loop.remove_reader(self.sock.fileno())
            except RuntimeError:
                pass  # no loop running any more
            self.sock.close()
        for handle, _ in self._wheel.values():
            handle.cancel()
        self._wheel.clear()
        for c in list(self._pending.values()):
            c.cancel()

    # sending -------------------------------------------------------------------------
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
        """Fire and forget (heartbeats, replies)."""
        self._post(addr, frame(msg, 0, reply_to))

    def _post(self, addr: Addr, framed: bytes) -> None:
        q = self._outq.get(addr)
        if q is None:
            if not self._outq:
                self.loop.call_soon(self._flush)
            q = self._outq[addr] = []
        q.append(framed)

    def _flush(self) -> None:
        outq, self._outq = self._outq, {}
        for addr, framed in outq.items():
            if len(framed) == 1:
                self._send(self.codec.pack(framed), addr)
                continue
            run: list[bytes] = []
            size = 0
            for b in framed:
                if run and size + len(b) > _ROOM - 3:
                    self._send_run(run, addr)
                    run, size = [], 0
                run.append(b)
                size += len(b)
            self._send_run(run, addr)

    def _send_run(self, run: list[bytes], addr: Addr) -> None:
        if len(run) > 1:
            self.stats["batches"] += 1
        self._send(self.codec.pack(run), addr)

    # requests ------------------------------------------------------------------------
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
        fut = self.loop.create_future()

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
            call.cancel()  # no-op once answered; stops the retransmissions if we were cancelled

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
        if the call is cancelled or the endpoint closed -- exactly one of them.  A
        message too large for a datagram raises ValueError here."""
        self._rid += 1
        c = _Call(self, addr, msg, self._rid, done, timeout, first_rto, max_rto)
        self._pending[c.rid] = c
        c.fire()
        return c

    def _wake_at(self, t: float, call: _Call) -> None:
        tick = int(t / TICK) + 1
        slot = self._wheel.get(tick)
        if slot is None:
            handle = self.loop.call_at(tick * TICK, self._on_tick, tick)
            self._wheel[tick] = (handle, [call])
        else:
            slot[1].append(call)

    def _on_tick(self, tick: int) -> None:
        for c in self._wheel.pop(tick)[1]:
            c.fire()  # no-op for the answered ones

    def _rtt_sample(self, r: float) -> None:
        self.rttvar += 0.25 * (abs(self.srtt - r) - self.rttvar)
        self.srtt += 0.125 * (r - self.srtt)

    # receiving -----------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr) -> None:
        try:
            sender, items = self.codec.decode(data)
        except WireError:
            return  # counted in codec.dropped
        addr = addr[:2]
        if len(items) > 1:
            self.stats["batches_in"] += 1
        for rid, reply_to, msg in items:
            self._handle(sender, rid, reply_to, msg, addr)

    def _handle(self, sender: int, rid: int, reply_to: int, msg: Message, addr: Addr) -> None:
        if reply_to:
            call = self._pending.get(reply_to)
            if call is not None:
                call.set_result(msg)
            elif type(msg) is Frag:
                self._on_frag(msg)
            return
        if type(msg) is Fetch:
            self._serve_fetch(rid, msg, addr)
            return
        if rid:
            cached = self._replies.get(sender, rid, _MISSING)
            if cached is not _MISSING:
                self.stats["dup_requests"] += 1
                if cached is not None:  # same answer, new datagram (else: in progress)
                    self._post(addr, cached)
                return
            self._replies.put(sender, rid, None)
        if self.handler is None:
            return
        try:
            out = self.handler(msg, addr)
        except Exception:  # a handler bug must not take the daemon down with it
            self.stats["handler_errors"] += 1
            self._replies.pop(sender, rid)
            return
        if out is None or isinstance(out, Message):  # (asyncio.iscoroutine is an ABC check)
            if rid:
                self._reply(sender, rid, addr, out)
        else:  # a coroutine: the reply when it completes
            task = asyncio.ensure_future(out)
            task.add_done_callback(lambda t: self._finish(sender, rid, addr, t))

    def _finish(self, sender: int, rid: int, addr: Addr, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            self.stats["handler_errors"] += 1
            self._replies.pop(sender, rid)
            return
        if rid:
            self._reply(sender, rid, addr, task.result())

    def _reply(self, sender: int, rid: int, addr: Addr, out: Message | None) -> None:
        try:
            framed = frame(out if out is not None else Ack(), 0, rid)
        except ValueError as e:  # the requester gets a reason, not a timeout
            self.stats["oversized_replies"] += 1
            framed = frame(Error(str(e)), 0, rid)
        self._replies.put(sender, rid, framed)
        self._post(addr, framed)

    # payload transfer: the receiver pulls ranges it lacks (selective repeat)
    def _serve_fetch(self, rid: int, msg: Fetch, addr: Addr) -> None:
        payload = self.payloads.get(msg.digest)
        if payload is None:
            self._send(self.codec.encode(Error("no such payload"), 0, rid), addr)
            return
        n = fragment_count(len(payload))
        for i in range(msg.first, min(msg.first + min(msg.count, 256), n)):
            self._send(self.codec.encode(frag_message(payload, msg.digest, i), 0, rid), addr)

    def _on_frag(self, msg: Frag) -> None:
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
        self,
        addr: Addr,
        dig: bytes,
        size: int,
        timeout: float = 30.0,
        window: int = 64,
        limit: int = MAX_PAYLOAD,
    ) -> bytes:
        """Pull a payload of ``size`` bytes by digest from ``addr``: ask for up to
        ``window`` missing fragments, re-ask for what is still missing after a quiet rto."""
        r = Reassembly(dig, size, limit=limit)
        ev = asyncio.Event()
        self._fetches[dig] = (r, ev)
        deadline = self.loop.time() + timeout
        try:
            while not r.complete:
                if self.loop.time() > deadline:
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
                    self._send(self.codec.encode(Fetch(dig, first, count), self._rid), addr)
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
    ep = Endpoint(codec, handler, drop, seed)
    ep.attach(sock)
    return ep


def drop_from_env() -> tuple[float, int | None]:
    """XX_WIRE_DROP=P[:SEED]: drop P of outgoing datagrams (tests' loss injection)."""
    v = os.environ.get("XX_WIRE_DROP", "")
    if not v:
        return 0.0, None
    p, _, s = v.partition(":")
    return float(p), (int(s) if s else None)

"""xxnode.wire: every message type round-trips; every bad datagram is one counted WireError."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xxnode import wire
from xxnode.wire import Codec, Message, WireError

KEY = b"k" * 32

# one value per field name that appears in a message type (bounds at their extremes)
_SAMPLE = {
    "job": bytes(range(16)),
    "digest": bytes(range(32)),
    "cls": "hé-llo",
    "arbiter": "127.0.0.1:7100",
    "spec": {"argv": ["true"], "timeout": 1.5, "env": {"A": "b"}, "n": None},
    "size": 2**63 - 1,
    "inline": b"\x00\xff payload",
    "ok": True,
    "reason": "no room",
    "running": 2**32 - 1,
    "free": 8 << 30,
    "node": "n1",
    "total": 16 << 30,
    "jobs": 3,
    "length": 4,
    "status": -(2**31),
    "result": {"cpu_s": 0.25, "peak": 1 << 40},
    "first": 0,
    "count": 64,
    "index": 7,
    "data": b"x" * 1200,
    "what": "nodes",
    "start": 40,
}


def sample(cls: type[Message]) -> Message:
    if cls is wire.StatusReply:  # its "data" is a map, FRAG's is bytes
        return cls({"nodes": [{"node": "n1", "age": 0.5}]})
    return cls(*(_SAMPLE[name] for name in cls.__struct_fields__))


def _seal_raw(tx: Codec, body: bytes, ts_ms: int | None = None) -> bytes:
    """A datagram around any body, authenticated with tx's key: an insider's garbage."""
    tx._seq += 1
    ts = int(tx.clock() * 1000) if ts_ms is None else ts_ms
    data = wire.HEADER.pack(wire.MAGIC, wire.VERSION, tx.sender, tx._seq, ts) + body
    return data + hashlib.blake2b(data, key=KEY, digest_size=wire.MAC_LEN).digest()


@pytest.mark.parametrize("cls", wire.MESSAGES, ids=lambda c: c.kind)
def test_round_trip_every_type(cls):
    tx, rx = Codec(KEY), Codec(KEY)
    m = sample(cls)
    sender, items = rx.decode(tx.encode(m, rid=9, reply_to=3))
    assert (sender, items) == (tx.sender, [(9, 3, m)])
    assert type(items[0][2]) is cls and m.kind == cls.kind


def test_type_codes_unique_and_named():
    assert len(wire.TYPES) == len(wire.MESSAGES)
    assert wire.SubmitAck.kind == "submit_ack" and wire.Place.kind == "place"


def test_a_trailing_field_with_a_default_may_be_left_out():
    """STATUS grew ``start``: a STATUS without it (the first page) still decodes."""
    tx, rx = Codec(KEY), Codec(KEY)
    old = _seal_raw(tx, msgspec.msgpack.encode([[1, 0, [20, "nodes"]]]))
    assert rx.decode(old)[1] == [(1, 0, wire.Status("nodes", 0))]


def test_several_messages_share_one_datagram():
    tx, rx = Codec(KEY), Codec(KEY)
    items = [(7, 0, sample(wire.Place)), (0, 7, sample(wire.Accept)), (0, 0, wire.Ack())]
    data = tx.pack([wire.frame(m, r, t) for r, t, m in items])
    assert rx.decode(data) == (tx.sender, items)


def test_retransmission_is_a_new_datagram_but_a_replay_is_dropped():
    tx, rx = Codec(KEY), Codec(KEY)
    m = sample(wire.Place)
    a, b = tx.encode(m, rid=5), tx.encode(m, rid=5)
    assert a != b  # new seq each time
    assert rx.decode(a)[1][0][0] == rx.decode(b)[1][0][0] == 5
    with pytest.raises(wire.Replayed):
        rx.decode(a)
    assert rx.dropped["replayed"] == 1


def test_forged_with_other_key_dropped():
    with pytest.raises(wire.BadMac):
        Codec(KEY).decode(Codec(b"x" * 32).encode(sample(wire.Submit)))


def test_long_keys_are_hashed_to_blake2b_size():
    long_key = os.urandom(200)
    tx, rx = Codec(long_key), Codec(long_key)
    assert rx.decode(tx.encode(wire.Ack()))[1][0][2] == wire.Ack()
    with pytest.raises(wire.BadMac):
        Codec(long_key[:64]).decode(tx.encode(wire.Ack()))


def test_stale_and_future_timestamps_dropped():
    tx = Codec(KEY, clock=lambda: 1000.0)
    rx = Codec(KEY, clock=lambda: 1000.0 + wire.WINDOW_S + 1)
    with pytest.raises(wire.Stale):
        rx.decode(tx.encode(wire.Ack()))
    rx2 = Codec(KEY, clock=lambda: 1000.0 - wire.WINDOW_S - 1)
    with pytest.raises(wire.Stale):
        rx2.decode(tx.encode(wire.Ack()))


def test_old_seq_outside_replay_window_dropped():
    tx, rx = Codec(KEY), Codec(KEY)
    first = tx.encode(wire.Ack())
    for _ in range(wire.REPLAY_SEQS + 1):
        rx.decode(tx.encode(wire.Ack()))
    with pytest.raises(wire.Replayed):
        rx.decode(first)  # never seen, but too far behind to tell: refused


def test_oversized_refused_both_ways():
    big = wire.Frag(bytes(32), 0, 1, b"x" * wire.MAX_DATAGRAM)
    with pytest.raises(ValueError):
        Codec(KEY).encode(big)
    with pytest.raises(ValueError):
        wire.frame(big, 1, 0)
    with pytest.raises(wire.Oversized):
        Codec(KEY).decode(b"XX" + b"\0" * wire.MAX_DATAGRAM)


def test_old_version_dropped_as_bad_version():
    data = bytearray(Codec(KEY).encode(wire.Ack()))
    data[2] = 1
    rx = Codec(KEY)
    with pytest.raises(wire.BadVersion):
        rx.decode(bytes(data))
    assert rx.dropped == {"bad_version": 1}


@pytest.mark.parametrize(
    "body,reason",
    [
        (b"", "truncated"),
        (b"\x90", "malformed"),  # no messages
        (b"\x91\x93\x01\x00", "truncated"),  # cut inside the envelope
        (b"\x91\x93\x01\x00\x91\x06\x00", "malformed"),  # trailing byte
        (b"\x91\x93\x01\x00\x91\xcc\xc8", "unknown_type"),  # type 200
        (b"\x91\x93\x01\x00\x92\x04\xc4\x03abc", "malformed"),  # job id of 3 bytes
        (b"\x91\x93\xff\x00\x91\x0e", "malformed"),  # negative rid
        (b"\x91\x92\x01\x00", "malformed"),  # envelope of 2
        (b"\x91\x93\x01\x00\x92\x0c\xa1x", "malformed"),  # length is a string
        (b"\x91\x93\x01\x00\x92\x15\x81\x01\x02", "malformed"),  # status data: int key
        (b"\x91\x93\x01\x00\x92\x15" + b"\x91" * 5000 + b"\x80", "malformed"),  # deep
    ],
)
def test_authenticated_garbage_is_one_counted_refusal(body, reason):
    """An insider (right key) sending a bad body: one WireError, counted, no state."""
    tx, rx = Codec(KEY), Codec(KEY)
    with pytest.raises(WireError) as ei:
        rx.decode(_seal_raw(tx, body))
    assert ei.value.reason == reason
    assert rx.dropped == {reason: 1}
    assert rx._seen == {}  # a refused datagram leaves no replay state behind


def test_check_refuses_out_of_bounds_fields_at_the_sender():
    """The encoder does not apply the bounds; check() does, before a peer would refuse
    the whole datagram."""
    good = sample(wire.Done)
    assert wire.check(good) is good
    for bad in (
        wire.Done(bytes(16), "n", 2**40, {}),
        wire.Done(bytes(16), "n", 0, {1: "int key"}),
        wire.Submit(b"short", "c", "", {}, 0, bytes(32), b""),
        wire.Submit(bytes(16), "c" * 2000, "", {}, 0, bytes(32), b""),
        wire.Done(bytes(16), "n", 0, {"log": "x" * 10_000}),
    ):
        with pytest.raises(ValueError):
            wire.check(bad)


# --- fuzzing ---------------------------------------------------------------------------

_GOOD = [Codec(KEY, sender=77).encode(sample(m), rid=1) for m in wire.MESSAGES]
_GOOD.append(
    Codec(KEY, sender=78).pack(
        [wire.frame(sample(wire.Place), 7, 0), wire.frame(sample(wire.Accept), 0, 7)]
    )
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=12000))
def test_fuzz_random_bytes(data):
    rx = Codec(KEY)
    with pytest.raises(WireError):
        rx.decode(data)
    assert sum(rx.dropped.values()) == 1


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(_GOOD), st.data())
def test_fuzz_truncated_and_bitflipped(good, data):
    rx = Codec(KEY)
    how = data.draw(st.sampled_from(["truncate", "flip", "extend"]))
    if how == "truncate":
        bad = good[: data.draw(st.integers(0, len(good) - 1))]
    elif how == "flip":
        i = data.draw(st.integers(0, len(good) - 1))
        bit = data.draw(st.integers(0, 7))
        bad = good[:i] + bytes([good[i] ^ (1 << bit)]) + good[i + 1 :]
    else:
        bad = good + data.draw(st.binary(min_size=1, max_size=64))
    with pytest.raises(WireError):
        rx.decode(bad)
    assert sum(rx.dropped.values()) == 1
    assert rx._seen == {}


_INTS = st.integers(-(2**63), 2**64 - 1)
_VALUES = st.recursive(
    st.none() | st.booleans() | _INTS | st.floats() | st.text(max_size=8) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)
# envelopes of the right outer shape: [rid, reply_to, [type, fields...]] with random fields
_ENVELOPES = st.lists(
    st.tuples(_INTS, _INTS, st.tuples(st.integers(0, 30), st.lists(_VALUES, max_size=8))).map(
        lambda e: [e[0], e[1], [e[2][0], *e[2][1]]]
    ),
    max_size=3,
)


@settings(max_examples=400, deadline=None)
@given(
    st.binary(max_size=400)
    | st.builds(msgspec.msgpack.encode, _VALUES)
    | st.builds(msgspec.msgpack.encode, _ENVELOPES)
)
def test_fuzz_authenticated_bodies_never_escape(body):
    """With the right key (worst case: a buggy insider), any body -- random bytes or
    well-formed MessagePack of the wrong shape -- is parsed or refused as one WireError,
    never another exception."""
    tx, rx = Codec(KEY), Codec(KEY)
    try:
        _, items = rx.decode(_seal_raw(tx, body))
    except WireError:
        assert sum(rx.dropped.values()) == 1
    else:
        assert items and all(isinstance(m, Message) for _, _, m in items)


# --- large payloads --------------------------------------------------------------------


def test_reassembly_6mb_with_loss_reordering_duplicates():
    rng = random.Random(1)
    payload = os.urandom(wire.MAX_PAYLOAD)
    dig = wire.digest(payload)
    tx, rx = Codec(KEY), Codec(KEY)
    r = wire.Reassembly(dig, len(payload))
    rounds = 0
    while not r.complete:
        rounds += 1
        want = r.missing(10_000)
        frags = [tx.encode(wire.frag_message(payload, dig, i)) for i in want]
        frags += rng.sample(frags, len(frags) // 10)  # network duplicates: replays
        frags += [tx.encode(wire.frag_message(payload, dig, i)) for i in want[:50]]  # resent
        rng.shuffle(frags)  # reordering
        for d in frags:
            if rng.random() < 0.2:  # loss
                continue
            try:
                r.add(rx.decode(d)[1][0][2])
            except wire.Replayed:
                pass
    assert rounds > 1 and rx.dropped["replayed"] > 0
    assert r.result() == payload


def test_reassembly_rejects_foreign_and_corrupt():
    payload = b"a" * 3000
    dig = wire.digest(payload)
    r = wire.Reassembly(dig, len(payload))
    with pytest.raises(wire.Malformed):
        r.add(wire.frag_message(b"b" * 3000, wire.digest(b"b" * 3000), 0))
    good = wire.frag_message(payload, dig, 1)
    bad = wire.Frag(good.digest, good.index, good.size, b"x" * len(good.data))  # wrong content
    for i in range(r.count):
        r.add(bad if i == 1 else wire.frag_message(payload, dig, i))
    with pytest.raises(wire.Malformed):
        r.result()
    assert not r.complete  # starts over
    with pytest.raises(wire.Oversized):
        wire.Reassembly(dig, wire.MAX_PAYLOAD + 1)


# --- the endpoint ------------------------------------------------------------------------


def test_endpoint_request_retransmits_and_fetch_over_lossy_loopback():
    async def go():
        served = []

        def handler(msg, addr):
            served.append(msg.kind)
            return wire.LenReply(3)

        a = await wire.open_endpoint(("127.0.0.1", 0), Codec(KEY), drop=0.3, seed=2)
        b = await wire.open_endpoint(("127.0.0.1", 0), Codec(KEY), handler, drop=0.3, seed=3)
        try:
            for _ in range(20):
                rep = await a.request(b.addr, wire.LenQuery(), timeout=10, first_rto=0.01)
                assert rep.length == 3
            assert served.count("len_query") == 20  # duplicates answered from the cache
            payload = os.urandom(2 * 1024 * 1024 + 17)
            dig = wire.digest(payload)
            b.payloads[dig] = payload
            got = await a.fetch(b.addr, dig, len(payload), timeout=60)
            assert got == payload
            assert a.stats["retransmits"] > 0 and a.stats["fetch_retries"] > 0
        finally:
            a.close()
            b.close()

    asyncio.run(go())


def test_request_times_out_and_a_too_large_message_fails_at_the_caller():
    async def go():
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        a = await wire.open_endpoint(("127.0.0.1", 0), Codec(KEY))
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(TimeoutError):
                await a.request(silent.getsockname(), wire.Probe(), timeout=0.3, first_rto=0.05)
            assert 0.3 <= loop.time() - t0 < 1.0
            assert a.stats["retransmits"] >= 2 and not a._pending
            with pytest.raises(ValueError):
                await a.request(silent.getsockname(), wire.Error("x" * wire.MAX_DATAGRAM))
        finally:
            a.close()
            silent.close()

    asyncio.run(go())


def test_an_oversized_reply_becomes_an_error_reply():
    async def go():
        def handler(msg, addr):
            return wire.StatusReply({"blob": "x" * wire.MAX_DATAGRAM})

        a = await wire.open_endpoint(("127.0.0.1", 0), Codec(KEY))
        b = await wire.open_endpoint(("127.0.0.1", 0), Codec(KEY), handler)
        try:
            rep = await a.request(b.addr, wire.Status("nodes"), timeout=5)
            assert type(rep) is wire.Error and "does not fit" in rep.reason
            assert b.stats["oversized_replies"] == 1
        finally:
            a.close()
            b.close()

    asyncio.run(go())


def test_batching_endpoints_exactly_once_over_lossy_loopback():
    """Many concurrent requests between two endpoints, 20 % loss each way: every request
    is handled once (dedupe by (sender, rid) inside shared datagrams) and answered."""

    async def main():
        handled = []

        def handler(msg, addr):
            handled.append(msg.job)
            return wire.Accept(msg.job)

        srv = await wire.open_endpoint(("127.0.0.1", 0), Codec(KEY), handler, 0.2, 1)
        cli = await wire.open_endpoint(("127.0.0.1", 0), Codec(KEY), None, 0.2, 2)
        try:
            jobs = [os.urandom(16) for _ in range(300)]
            reps = await asyncio.gather(
                *(cli.request(srv.addr, wire.Accept(j), timeout=10.0) for j in jobs)
            )
            assert [r.job for r in reps] == jobs
            assert sorted(handled) == sorted(jobs)
            assert cli.stats["batches"] > 0 and srv.stats["batches_in"] > 0
        finally:
            srv.close()
            cli.close()

    asyncio.run(main())


def test_endpoint_drops_broken_datagram_whole_and_dedupes_inside_one():
    """Against a live endpoint: a datagram whose last message is cut short is refused
    whole (its intact first message is not handled either) and counted; a datagram
    carrying the same request twice is handled once and answered twice."""

    async def main():
        handled = []

        def handler(msg, addr):
            handled.append(msg.job)
            return wire.Accept(msg.job)

        codec = Codec(KEY)
        ep = await wire.open_endpoint(("127.0.0.1", 0), codec, handler)
        tx = Codec(KEY)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        try:
            a, b = os.urandom(16), os.urandom(16)
            ok = wire.frame(wire.Accept(a), 11, 0)
            cut = wire.frame(wire.Accept(b), 12, 0)[:-1]
            s.sendto(_seal_raw(tx, b"\x92" + ok + cut), ep.addr)
            s.sendto(tx.pack([ok, ok]), ep.addr)  # same rid twice
            loop = asyncio.get_running_loop()
            replies = []
            rx = Codec(KEY)
            while len(replies) < 2:
                data = await asyncio.wait_for(loop.sock_recv(s, 65536), 5.0)
                replies += [(reply_to, m.job) for _, reply_to, m in rx.decode(data)[1]]
            return handled, replies, dict(codec.dropped), dict(ep.stats), a
        finally:
            s.close()
            ep.close()

    s_handled, replies, dropped, stats, a = asyncio.run(main())
    assert dropped == {"truncated": 1}
    assert s_handled == [a]  # only the second datagram's, once
    assert stats["dup_requests"] == 1
    assert replies == [(11, a), (11, a)]


def test_timer_wheel_keeps_one_loop_timer_per_tick():
    """Retransmission timers share loop timers: 500 requests in flight, a handful of
    wheel slots; answered requests leave nothing behind."""

    async def go():
        srv_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        srv_sock.bind(("127.0.0.1", 0))
        a = await wire.open_endpoint(("127.0.0.1", 0), Codec(KEY))
        try:
            calls = [
                a.call(srv_sock.getsockname(), wire.Probe(), lambda r, e: None, 5.0)
                for _ in range(500)
            ]
            assert len(a._wheel) <= 3
            for c in calls:
                c.cancel()
            assert not a._pending
        finally:
            a.close()
            srv_sock.close()
        assert not a._wheel

    asyncio.run(go())


def test_reply_cache_keeps_answers_a_ttl_and_forgets_them_by_two():
    now = [100.0]
    c = wire.ReplyCache(5.0, clock=lambda: now[0])
    c.put(7, 1, None)  # in progress
    c.put(7, 1, b"answer")
    assert c.get(7, 1) == b"answer" and c.get(7, 2, "missing") == "missing"
    now[0] += 4.9
    c.put(7, 2, b"later")
    assert c.get(7, 1) == b"answer"  # at ttl - 0.1 s: still there
    now[0] += 0.2
    c.put(7, 3, b"x")  # the turn: 1 and 2 move to the old generation, still answered
    assert c.get(7, 1) == b"answer" and c.get(7, 2) == b"later"
    now[0] += 5.0
    c.put(7, 4, b"y")  # the next turn drops them
    assert c.get(7, 1) is None and c.get(7, 2) is None and c.get(7, 3) == b"x"
    c.pop(7, 3)
    assert c.get(7, 3) is None and len(c) == 1


def test_the_hot_path_leaves_nothing_for_the_garbage_collector():
    """What a busy shard keeps per request or job is invisible to the collector: its
    collections were the shard's longest stalls (see ReplyCache)."""
    import gc

    c = wire.ReplyCache(5.0)
    for k in range(1000):
        c.put(k, k, None if k % 2 else b"framed reply")
    assert not gc.is_tracked(c._new)
    place = wire.Place(os.urandom(16), "high", "", {"argv": ["true"]}, 0, bytes(32), b"")
    assert not gc.is_tracked(place)
    _, [(_, _, decoded)] = Codec(KEY).decode(Codec(KEY).encode(place, 1))
    assert decoded == place and not gc.is_tracked(decoded)

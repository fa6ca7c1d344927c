"""xxnode.wire: every message type round-trips; every bad datagram is one counted WireError."""

from __future__ import annotations

import asyncio
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xxnode import wire
from xxnode.wire import Codec, Message, WireError

KEY = b"k" * 32

_SAMPLE = {
    "B": 1,
    "i": -7,
    "I": 4_000_000_000,
    "Q": 2**63 + 5,
    "J": bytes(range(16)),
    "D": bytes(range(32)),
    "s": "hé-llo",
    "y": b"\x00\xff payload",
    "j": {"cmd": ["true"], "timeout": 1.5, "env": {"A": "b"}},
}


def sample(kind: str) -> Message:
    return Message(kind, {name: _SAMPLE[t] for name, t in wire._SCHEMAS[kind][1]})


@pytest.mark.parametrize("kind", sorted(wire._SCHEMAS))
def test_round_trip_every_type(kind):
    tx, rx = Codec(KEY), Codec(KEY)
    m = sample(kind)
    hdr, got = rx.decode(tx.encode(m, rid=9, reply_to=3))
    assert got == m
    assert (hdr.sender, hdr.rid, hdr.reply_to) == (tx.sender, 9, 3)


def test_type_codes_unique():
    codes = [c for c, _ in wire._SCHEMAS.values()]
    assert len(codes) == len(set(codes))


def test_retransmission_is_a_new_datagram_but_a_replay_is_dropped():
    tx, rx = Codec(KEY), Codec(KEY)
    m = sample("place")
    a, b = tx.encode(m, rid=5), tx.encode(m, rid=5)
    assert a != b  # new seq each time
    assert rx.decode(a)[0].rid == rx.decode(b)[0].rid == 5
    with pytest.raises(wire.Replayed):
        rx.decode(a)
    assert rx.dropped["replayed"] == 1


def test_forged_with_other_key_dropped():
    with pytest.raises(wire.BadMac):
        Codec(KEY).decode(Codec(b"x" * 32).encode(sample("submit")))


def test_stale_and_future_timestamps_dropped():
    t = [1000.0]
    tx = Codec(KEY, clock=lambda: t[0])
    rx = Codec(KEY, clock=lambda: 1000.0 + wire.WINDOW_S + 1)
    with pytest.raises(wire.Stale):
        rx.decode(tx.encode(sample("ack")))
    rx2 = Codec(KEY, clock=lambda: 1000.0 - wire.WINDOW_S - 1)
    with pytest.raises(wire.Stale):
        rx2.decode(tx.encode(sample("ack")))


def test_old_seq_outside_replay_window_dropped():
    tx, rx = Codec(KEY), Codec(KEY)
    first = tx.encode(sample("ack"))
    for _ in range(wire.REPLAY_SEQS + 1):
        rx.decode(tx.encode(sample("ack")))
    with pytest.raises(wire.Replayed):
        rx.decode(first)  # never seen, but too far behind to tell: refused


def test_oversized_refused_both_ways():
    with pytest.raises(ValueError):
        Codec(KEY).encode(Message("frag", {**sample("frag").f, "data": b"x" * wire.MAX_DATAGRAM}))
    with pytest.raises(wire.Oversized):
        Codec(KEY).decode(b"XX" + b"\0" * wire.MAX_DATAGRAM)


def test_valid_mac_over_bad_body_is_malformed_not_a_crash():
    """An insider (right key) sending garbage: still one WireError, counted."""
    tx, rx = Codec(KEY), Codec(KEY)
    good = tx.encode(sample("submit"))
    body = good[wire.HEADER.size : -wire.MAC_LEN]
    for bad_body in (body[:-1], body + b"\0", b"\xff" * 40, b""):
        head = good[: wire.HEADER.size]
        tx._seq += 1  # fresh seq so replay defence is not what catches it
        head = wire.HEADER.pack(
            b"XX", wire.VERSION, head[3], tx.sender, tx._seq, *wire.HEADER.unpack(head)[5:]
        )
        data = head + bad_body
        with pytest.raises(WireError) as ei:
            rx.decode(data + tx._mac(data))
        assert ei.value.reason in ("truncated", "malformed")


def test_json_must_be_object():
    tx, rx = Codec(KEY), Codec(KEY)
    m = sample("status_reply")
    data = tx.encode(m)
    # replace the JSON with a list, re-MAC
    body = b"\x00\x00\x00\x02[]"
    head = data[: wire.HEADER.size]
    raw = head + body
    with pytest.raises(wire.Malformed):
        rx.decode(raw + tx._mac(raw))


# --- fuzzing ---------------------------------------------------------------------------

_GOOD = [Codec(KEY, sender=77).encode(sample(k), rid=1) for k in sorted(wire._SCHEMAS)]


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
    assert rx._seen == {}  # a refused datagram leaves no replay state behind


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.integers(0, 255))
def test_fuzz_forged_bodies_with_key_never_escape(body, code):
    """With the right key (worst case: a buggy insider), any body for any type code is
    parsed or refused as WireError -- never another exception."""
    tx, rx = Codec(KEY), Codec(KEY)
    tx._seq += 1
    head = wire.HEADER.pack(b"XX", wire.VERSION, code, tx.sender, tx._seq, 0, 1, 0)
    head = head[:20] + int(tx.clock() * 1000).to_bytes(8, "big") + head[28:]
    data = head + body
    try:
        rx.decode(data + tx._mac(data))
    except WireError:
        assert sum(rx.dropped.values()) == 1


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
                r.add(rx.decode(d)[1])
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
    bad = wire.frag_message(payload, dig, 1)
    bad.f["data"] = b"x" * len(bad.data)  # right shape, wrong content
    for i in range(r.count):
        r.add(bad if i == 1 else wire.frag_message(payload, dig, i))
    with pytest.raises(wire.Malformed):
        r.result()
    assert not r.complete  # starts over
    with pytest.raises(wire.Oversized):
        wire.Reassembly(dig, wire.MAX_PAYLOAD + 1)


def test_endpoint_request_retransmits_and_fetch_over_lossy_loopback():
    async def go():
        served = []

        def handler(hdr, msg, addr):
            served.append(msg.kind)
            return Message("len_reply", {"length": 3})

        a = await wire.open_endpoint(("127.0.0.1", 0), Codec(KEY), drop=0.3, seed=2)
        b = await wire.open_endpoint(("127.0.0.1", 0), Codec(KEY), handler, drop=0.3, seed=3)
        try:
            for _ in range(20):
                rep = await a.request(b.addr, Message("len_query"), timeout=10, first_rto=0.01)
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


# --- the compiled codec agrees with the reference one -----------------------------------


def _pair(**kw) -> tuple[Codec, Codec]:
    clock = lambda: 1_700_000_000.0  # noqa: E731
    return Codec(KEY, sender=5, clock=clock, fast=True, **kw), Codec(
        KEY, sender=5, clock=clock, fast=False, **kw
    )


@pytest.mark.parametrize("kind", sorted(wire._SCHEMAS))
def test_compiled_codec_same_bytes_as_reference(kind):
    fast, ref = _pair()
    for m in (sample(kind), Message(kind, {n: _EMPTY[t] for n, t in wire._SCHEMAS[kind][1]})):
        a, b = fast.encode(m, rid=3, reply_to=4), ref.encode(m, rid=3, reply_to=4)
        assert a == b
        assert _pair()[0].decode(a) == _pair()[1].decode(b)


_EMPTY = {
    "B": 0,
    "i": 0,
    "I": 0,
    "Q": 0,
    "J": bytes(16),
    "D": bytes(32),
    "s": "",
    "y": b"",
    "j": {},
}


def test_env_selects_reference_codec(monkeypatch):
    monkeypatch.setenv("XX_WIRE_CODEC", "legacy")
    assert not Codec(KEY).fast
    monkeypatch.delenv("XX_WIRE_CODEC")
    assert Codec(KEY).fast


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=300), st.integers(0, 255))
def test_fuzz_compiled_and_reference_refuse_alike(body, code):
    """Any authenticated body for any type: both decoders accept it with equal fields,
    or both refuse it under the same reason."""
    fast, ref = _pair()
    head = wire.HEADER.pack(b"XX", wire.VERSION, code, 9, 1, 1_700_000_000_000, 1, 0)
    data = head + body
    data += fast._mac(data)
    out = []
    for c in _pair():
        try:
            out.append(c.decode(data))
        except WireError as e:
            out.append(e.reason)
    if code == wire.BATCH:  # the reference codec is a peer from before batches
        assert out[1] == "unknown_type"
    else:
        assert out[0] == out[1]


# --- batches ----------------------------------------------------------------------------


def _batch_items() -> list[tuple[Message, int, int]]:
    return [(sample("place"), 7, 0), (sample("accept"), 0, 7), (sample("ack"), 0, 0)]


def _remac(tx: Codec, head: bytes, body: bytes) -> bytes:
    tx._seq += 1
    head = wire.HEADER.pack(b"XX", wire.VERSION, wire.BATCH, tx.sender, tx._seq, *head)
    return head + body + tx._mac(head + body)


def test_batch_round_trip():
    tx, rx = Codec(KEY), Codec(KEY)
    items = _batch_items()
    hdr, m = rx.decode(tx.encode_batch([wire.batch_item(*it) for it in items]))
    assert m.kind == "batch" and (hdr.rid, hdr.reply_to) == (0, 0)
    assert [(x, r, t) for r, t, x in m.items] == items


def test_old_peer_drops_batch_counted():
    tx, old = Codec(KEY), Codec(KEY, fast=False)
    with pytest.raises(wire.UnknownType):
        old.decode(tx.encode_batch([wire.batch_item(*it) for it in _batch_items()]))
    assert old.dropped["unknown_type"] == 1


@pytest.mark.parametrize("how", ["truncate", "extend", "nested", "empty", "unknown", "inner"])
def test_forged_batch_dropped_whole_and_counted(how):
    """Right MAC, broken framing: the whole batch is refused, nothing in it handled."""
    tx, rx = Codec(KEY), Codec(KEY)
    good = tx.encode_batch([wire.batch_item(*it) for it in _batch_items()])
    body = good[wire.HEADER.size : -wire.MAC_LEN]
    if how == "truncate":
        body = body[:-3]
    elif how == "extend":
        body += b"\0\0"
    elif how == "nested":
        body += wire._INNER.pack(wire.BATCH, 0, 0, len(body)) + body
    elif how == "empty":
        body = b""
    elif how == "unknown":
        body += wire._INNER.pack(200, 0, 0, 0)
    else:  # an inner message whose own body is short by one byte
        inner = wire.batch_item(sample("accept"))[wire._INNER.size + 1 :]
        body += wire._INNER.pack(4, 0, 0, len(inner)) + inner
    ts = int(tx.clock() * 1000)
    with pytest.raises(WireError):
        rx.decode(_remac(tx, (ts, 0, 0), body))
    assert sum(rx.dropped.values()) == 1
    assert rx._seen == {}


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_batch_cut_anywhere(data):
    tx, rx = Codec(KEY), Codec(KEY)
    framed = [wire.batch_item(*it) for it in _batch_items()]
    body = b"".join(framed)
    bounds = {sum(map(len, framed[:i])) for i in range(1, len(framed))}  # valid shorter
    cut = data.draw(st.integers(0, len(body) - 1).filter(lambda c: c not in bounds))
    with pytest.raises(WireError):
        rx.decode(_remac(tx, (int(tx.clock() * 1000), 0, 0), body[:cut]))
    assert sum(rx.dropped.values()) == 1


def test_batching_endpoints_exactly_once_over_lossy_loopback():
    """Many concurrent requests between two batching endpoints, 20 % loss each way: every
    request is handled once (dedupe by (sender, rid) inside batches) and answered."""

    async def main():
        handled = []

        def handler(hdr, msg, addr):
            handled.append(msg.job)
            return Message("accept", {"job": msg.job})

        srv = await wire.open_endpoint(("127.0.0.1", 0), Codec(KEY), handler, 0.2, 1, True)
        cli = await wire.open_endpoint(("127.0.0.1", 0), Codec(KEY), None, 0.2, 2, True)
        try:
            jobs = [os.urandom(16) for _ in range(300)]
            reps = await asyncio.gather(
                *(cli.request(srv.addr, Message("accept", {"job": j}), timeout=10.0) for j in jobs)
            )
            assert [r.job for r in reps] == jobs
            assert sorted(handled) == sorted(jobs)
            assert cli.stats["batches"] > 0 and srv.stats["batches_in"] > 0
        finally:
            srv.close()
            cli.close()

    asyncio.run(main())


def test_endpoint_drops_broken_batch_whole_and_dedupes_inside_one():
    """Against a live endpoint: a batch whose last message is cut short is refused whole
    (its intact first message is not handled either) and counted; a batch carrying the
    same request twice is handled once and answered twice."""
    import socket

    async def main():
        handled = []

        def handler(hdr, msg, addr):
            handled.append((hdr.rid, msg.job))
            return Message("accept", {"job": msg.job})

        codec = Codec(KEY)
        ep = await wire.open_endpoint(("127.0.0.1", 0), codec, handler, batch=True)
        tx = Codec(KEY)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        try:
            a, b = os.urandom(16), os.urandom(16)
            ok = wire.batch_item(Message("accept", {"job": a}), 11)
            cut = wire.batch_item(Message("accept", {"job": b}), 12)[:-1]
            head = (int(tx.clock() * 1000), 0, 0)
            s.sendto(_remac(tx, head, ok + cut), ep.addr)
            s.sendto(tx.encode_batch([ok, ok]), ep.addr)  # same rid twice
            await asyncio.sleep(0.2)  # the endpoint runs on this loop: let it answer
            s.setblocking(False)
            rx, replies = Codec(KEY), []
            while True:
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    break
                hdr, got = rx.decode(data)
                items = got.items if got.kind == "batch" else [(0, hdr.reply_to, got)]
                replies += [(reply_to, m.job) for _, reply_to, m in items]
            return handled, replies, dict(codec.dropped), dict(ep.stats)
        finally:
            s.close()
            ep.close()

    handled, replies, dropped, stats = asyncio.run(main())
    assert sum(dropped.values()) == 1 and dropped.get("truncated") == 1
    assert len(handled) == 1 and handled[0][0] == 11  # only the second batch, once
    assert stats["dup_requests"] == 1
    assert [r for r in replies if r[0] == 11] == [(11, handled[0][1])] * 2

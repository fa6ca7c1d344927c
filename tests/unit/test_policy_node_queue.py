import random

import pytest

from xxnode.policy.node_queue import NodeQueue

RANKS = {"low": 0, "mid": 1, "high": 2}


def test_highest_class_first_fifo_within():
    q = NodeQueue(RANKS)
    q.push("a", "low", 0.0)
    q.push("b", "high", 1.0)
    q.push("c", "mid", 2.0)
    q.push("d", "high", 3.0)
    assert q.peek_next() == ("b", "high")
    assert [q.pop_next() for _ in range(5)] == [
        ("b", "high"),
        ("d", "high"),
        ("c", "mid"),
        ("a", "low"),
        None,
    ]
    assert len(q) == 0


def test_unknown_class_and_duplicate_rejected():
    q = NodeQueue(RANKS)
    with pytest.raises(ValueError):
        q.push("a", "gold", 0.0)
    q.push("a", "low", 0.0)
    with pytest.raises(ValueError):
        q.push("a", "high", 0.0)
    assert len(q) == 1


def test_remove_and_counts():
    q = NodeQueue(RANKS)
    for i, cls in enumerate(["low", "high", "low", "mid"]):
        q.push(f"j{i}", cls, float(i))
    assert q.by_class() == {"high": 1, "mid": 1, "low": 2}
    assert q.remove("j1") is True
    assert q.remove("j1") is False
    assert "j1" not in q and "j0" in q
    assert q.enqueued_at("j2") == 2.0
    assert q.by_class() == {"high": 0, "mid": 1, "low": 2}
    assert q.pop_next() == ("j3", "mid")
    assert q.pop_next() == ("j0", "low")


def test_matches_reference_order_on_random_ops():
    rng = random.Random(7)
    q = NodeQueue(RANKS)
    ref = []  # (rank, seq, job_id, cls)
    seq = 0
    for _ in range(2000):
        op = rng.random()
        if op < 0.5:
            cls = rng.choice(list(RANKS))
            jid = f"j{seq}"
            q.push(jid, cls, float(seq))
            ref.append((-RANKS[cls], seq, jid, cls))
            seq += 1
        elif op < 0.8:
            ref.sort()
            want = (ref.pop(0)[2:]) if ref else None
            got = q.pop_next()
            assert got == (tuple(want) if want else None)
        elif ref:
            victim = rng.choice(ref)
            ref.remove(victim)
            assert q.remove(victim[2])
        assert len(q) == len(ref)

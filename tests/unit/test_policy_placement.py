import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xxnode.policy.dispatcher import (
    JOIN,
    LEAVE,
    UPDATE,
    IdleParams,
    Listing,
    choose_shard,
    idle_action,
)
from xxnode.policy.idle_list import IdleList
from xxnode.policy.multiqueue import MultiQueue, select_head
from xxnode.policy.probe import least_loaded, sample

RANKS = {"lo": 0, "mid": 1, "hi": 2}
PRICES = {"lo": 0.5, "mid": 1.0, "hi": 2.0}


def test_multiqueue_strict_serves_highest_class_fifo_within():
    q = MultiQueue(RANKS)
    assert q.policy == "strict"
    for i, c in enumerate(["lo", "hi", "mid", "hi"]):
        q.push(f"j{i}", c, float(i))
    order = [q.pop_next(100.0) for _ in range(5)]
    assert order == [("j1", "hi"), ("j3", "hi"), ("j2", "mid"), ("j0", "lo"), None]


def test_multiqueue_aging_lets_a_long_waiting_low_job_through():
    q = MultiQueue(RANKS, "aging", PRICES)
    q.push("old-lo", "lo", 0.0)
    q.push("new-hi", "hi", 9.0)
    # at t=10: lo scores 0.5*10=5, hi scores 2*1=2 -> the old low job goes first
    assert q.peek_next(10.0) == ("old-lo", "lo")
    # had it waited less (t=9.5: 4.75 vs 1.0 still lo); a fresher low job loses:
    q2 = MultiQueue(RANKS, "aging", PRICES)
    q2.push("lo", "lo", 9.0)
    q2.push("hi", "hi", 9.0)
    assert q2.pop_next(10.0) == ("hi", "hi")


def test_select_head_ties_go_to_higher_class_and_bad_policy_rejected():
    heads = [("lo", 5.0), ("hi", 5.0)]
    assert select_head(heads, 5.0, "aging", RANKS, PRICES) == 1
    with pytest.raises(ValueError):
        select_head(heads, 5.0, "lottery", RANKS)
    with pytest.raises(ValueError):
        MultiQueue(RANKS, "lottery")
    with pytest.raises(ValueError):
        MultiQueue(RANKS).push("x", "gold", 0.0)


def test_idle_list_shortest_queue_then_free_memory_and_local_count():
    il = IdleList()
    assert il.choose() is None
    il.upsert("a", 10, 3)
    il.upsert("b", 5, 1)
    il.upsert("c", 8, 1)
    assert il.choose() == "c"  # 1 job, more free than b
    il.note_placed("c")
    il.note_placed("c")
    assert il.choose() == "b"
    assert il.remove("b") and not il.remove("b")
    assert len(il) == 2 and "b" not in il
    assert il.entry("c") == (8, 3)


class _ScanIdleList:
    """The reference: a scan in listing order (what IdleList did before its heap)."""

    def __init__(self):
        self.e = {}

    def choose(self):
        best = None
        for m, (free, jobs) in self.e.items():
            if best is None or jobs < best[2] or (jobs == best[2] and free > best[1]):
                best = (m, free, jobs)
        return None if best is None else best[0]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["upsert", "remove", "placed", "choose"]),
            st.integers(0, 12),  # machine
            st.integers(0, 4),  # free (coarse, so ties happen)
            st.integers(0, 3),  # jobs
        ),
        max_size=300,
    )
)
def test_idle_list_heap_agrees_with_a_scan(ops):
    il, ref = IdleList(), _ScanIdleList()
    for op, m, free, jobs in ops:
        if op == "upsert":
            il.upsert(m, free, jobs)
            ref.e.setdefault(m, [0, 0])[:] = [free, jobs]
        elif op == "remove":
            assert il.remove(m) == (ref.e.pop(m, None) is not None)
        elif op == "placed":
            il.note_placed(m, free)
            if m in ref.e:
                ref.e[m][0] -= free
                ref.e[m][1] += 1
        assert il.choose() == ref.choose()
        assert len(il) == len(ref.e) and il.machines() == list(ref.e)
        assert len(il._heap) <= 2 * len(il) + 64  # stale entries do not pile up


def test_probe_sample_distinct_and_uniform():
    rng = random.Random(3)
    counts = Counter()
    for _ in range(20000):
        s = sample(10, 3, rng)
        assert len(set(s)) == 3 and all(0 <= i < 10 for i in s)
        counts.update(s)
    assert max(counts.values()) / min(counts.values()) < 1.1
    assert sorted(sample(4, 9, rng)) == [0, 1, 2, 3]
    assert len(set(sample(100, 20, rng))) == 20


def test_least_loaded_and_choose_shard():
    loads = {"m1": 4, "m2": 2, "m3": 2}
    assert least_loaded(["m1", "m3", "m2"], loads.__getitem__) == "m3"
    assert choose_shard([(0, 7), (2, 3), (3, 5)]) == 2


def test_dispatcher_hysteresis_and_updates():
    p = IdleParams(join_free_frac=0.5, leave_free_frac=0.3, update_free_frac=0.1, update_jobs=4)
    total = 100
    assert idle_action(None, 49, total, 0, p) is None
    assert idle_action(None, 50, total, 0, p) == JOIN
    lst = Listing(0, 60, 2)
    # between the thresholds a listed machine stays listed: no flapping
    assert idle_action(lst, 40, total, 2, p) == UPDATE  # moved 20 >= 10
    assert idle_action(Listing(0, 40, 2), 35, total, 2, p) is None
    assert idle_action(lst, 29, total, 2, p) == LEAVE
    assert idle_action(lst, 60, total, 6, p) == UPDATE  # job count drifted by 4
    assert idle_action(lst, 55, total, 5, p) is None
    with pytest.raises(ValueError):
        IdleParams(join_free_frac=0.3, leave_free_frac=0.5)

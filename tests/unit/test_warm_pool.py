import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xxnode.policy.warm_pool import (
    IdleEnv,
    PoolPolicy,
    expired,
    next_deadline,
    pick_idle,
    value,
    victim_key,
    victims,
)

MB = 1 << 20


def E(eid, fn, since, mb=128, init_ms=100.0, swapped=False):
    return IdleEnv(eid, fn, since, mb * MB, init_ms, swapped)


# --- strategies -------------------------------------------------------------

FUNCS = ["f", "g", "h"]


@st.composite
def env_lists(draw, max_size=12):
    n = draw(st.integers(0, max_size))
    return [
        IdleEnv(
            env_id=f"e{i}",
            function=draw(st.sampled_from(FUNCS)),
            # coarse values so that ties in age, size and value happen
            idle_since=float(draw(st.integers(0, 20))),
            memory_bytes=draw(st.integers(0, 4)) * MB,
            init_ms=float(draw(st.sampled_from([0, 50, 100, 400]))),
            swapped=draw(st.booleans()),
        )
        for i in range(n)
    ]


policies = st.builds(
    PoolPolicy,
    keep_alive_s=st.sampled_from([0.0, 0.1, 3.0, 7.5, 10.0, math.inf]),
    max_idle_per_function=st.integers(0, 4),
)
rate_maps = st.dictionaries(st.sampled_from(FUNCS), st.sampled_from([0.0, 0.5, 1.0, 20.0]))


# --- expired ----------------------------------------------------------------


def test_keep_alive_boundary_is_inclusive():
    p = PoolPolicy(keep_alive_s=600.0, max_idle_per_function=10)
    envs = [E("a", "f", 100.0)]
    assert expired(envs, 699.999, p) == []
    assert expired(envs, 700.0, p) == ["a"]
    assert expired(envs, 1e6, p) == ["a"]


def test_cap_keeps_most_recently_used():
    p = PoolPolicy(keep_alive_s=600.0, max_idle_per_function=2)
    envs = [E("old", "f", 1.0), E("new", "f", 3.0), E("mid", "f", 2.0), E("g", "g", 0.0)]
    assert expired(envs, 10.0, p) == ["old"]


def test_cap_counts_only_survivors_of_keep_alive_and_output_is_oldest_first():
    p = PoolPolicy(keep_alive_s=10.0, max_idle_per_function=1)
    envs = [E("dead", "f", 0.0), E("b", "f", 5.0), E("c", "f", 6.0), E("g", "g", 1.0)]
    # at 10.0: "dead" ran out; of b and c only the newer (c) stays; "g" is alone
    assert expired(envs, 10.0, p) == ["dead", "b"]


def test_cap_tie_evicts_swapped_first():
    p = PoolPolicy(max_idle_per_function=1)
    envs = [E("res", "f", 5.0), E("sw", "f", 5.0, swapped=True)]
    assert expired(envs, 6.0, p) == ["sw"]


def test_zero_cap_keeps_nothing():
    p = PoolPolicy(max_idle_per_function=0)
    assert sorted(expired([E("a", "f", 5.0), E("b", "g", 5.0)], 5.0, p)) == ["a", "b"]


def test_policy_validation():
    with pytest.raises(ValueError):
        PoolPolicy(keep_alive_s=-1.0)
    with pytest.raises(ValueError):
        PoolPolicy(keep_alive_s=math.nan)
    with pytest.raises(ValueError):
        PoolPolicy(max_idle_per_function=-1)


@settings(max_examples=300, deadline=None)
@given(env_lists(), policies, st.floats(0, 40, allow_nan=False))
def test_after_evicting_expired_cap_and_keep_alive_hold(envs, p, now):
    gone = expired(envs, now, p)
    assert len(gone) == len(set(gone))
    left = [e for e in envs if e.env_id not in gone]
    counts = Counter(e.function for e in left)
    assert all(c <= p.max_idle_per_function for c in counts.values())
    assert all(now < e.idle_since + p.keep_alive_s for e in left)
    # nothing evicted needlessly: a function is cut only down to the cap, not below
    for fn in FUNCS:
        fresh = [e for e in envs if e.function == fn and now < e.idle_since + p.keep_alive_s]
        assert counts[fn] == min(len(fresh), p.max_idle_per_function)
        # and the ones kept are the most recently used
        kept = [e for e in left if e.function == fn]
        dropped = [e for e in fresh if e.env_id in gone]
        if kept and dropped:
            assert min(e.idle_since for e in kept) >= max(e.idle_since for e in dropped)
    assert expired(left, now, p) == []  # idempotent


# --- next_deadline ----------------------------------------------------------


def test_next_deadline_exact():
    p = PoolPolicy(keep_alive_s=600.0, max_idle_per_function=4)
    envs = [E("a", "f", 100.0), E("b", "g", 50.25), E("c", "f", 300.0)]
    d = next_deadline(envs, 120.0, p)
    assert d == 650.25
    assert expired(envs, math.nextafter(d, -math.inf), p) == []
    assert expired(envs, d, p) == ["b"]


def test_next_deadline_due_now_none_and_infinite():
    p = PoolPolicy(keep_alive_s=10.0, max_idle_per_function=1)
    assert next_deadline([], 5.0, p) is None
    # already past keep-alive -> due now
    assert next_deadline([E("a", "f", 0.0)], 11.0, p) == 11.0
    # over the cap -> due now even though nothing timed out
    assert next_deadline([E("a", "f", 0.0), E("b", "f", 1.0)], 2.0, p) == 2.0
    assert next_deadline([E("a", "f", 0.0)], 2.0, PoolPolicy(keep_alive_s=math.inf)) is None


def test_next_deadline_float_sum_is_not_rounded_away():
    # (a + b) - a < b in floating point; the deadline must still find the env due.
    p = PoolPolicy(keep_alive_s=0.1)
    env = E("a", "f", 0.7)
    assert (0.7 + 0.1) - 0.7 < 0.1  # an "idle age >= keep_alive" test would miss it
    d = next_deadline([env], 0.7, p)
    assert expired([env], d, p) == ["a"]


@settings(max_examples=300, deadline=None)
@given(env_lists(), policies, st.floats(0, 40, allow_nan=False), st.floats(0, 1))
def test_next_deadline_is_the_first_time_something_expires(envs, p, now, frac):
    left = [e for e in envs if e.env_id not in expired(envs, now, p)]
    d = next_deadline(left, now, p)
    if d is None:
        assert not left or p.keep_alive_s == math.inf
        return
    assert d > now or (d == now and expired(left, now, p))
    assert expired(left, d, p)
    before = now + frac * (d - now)
    if before < d:
        assert expired(left, before, p) == []


# --- pick_idle --------------------------------------------------------------


def test_pick_idle_most_recent_resident():
    envs = [E("old", "f", 1.0), E("new", "f", 5.0), E("other", "g", 9.0)]
    assert pick_idle(envs, "f").env_id == "new"
    assert pick_idle(envs, "g").env_id == "other"
    assert pick_idle(envs, "nope") is None
    assert pick_idle([], "f") is None


def test_pick_idle_prefers_resident_over_newer_swapped():
    envs = [E("old-res", "f", 1.0), E("new-sw", "f", 5.0, swapped=True)]
    assert pick_idle(envs, "f").env_id == "old-res"
    # only swapped ones: still reused (faster than a cold start), newest first
    envs = [E("sw1", "f", 1.0, swapped=True), E("sw2", "f", 2.0, swapped=True)]
    assert pick_idle(envs, "f").env_id == "sw2"


@settings(max_examples=300, deadline=None)
@given(env_lists(), st.sampled_from(FUNCS + ["absent"]))
def test_pick_idle_only_that_function_and_best(envs, fn):
    got = pick_idle(envs, fn)
    mine = [e for e in envs if e.function == fn]
    if not mine:
        assert got is None
        return
    assert got in mine
    if not got.swapped:
        assert all(got.idle_since >= e.idle_since for e in mine if not e.swapped)
    else:
        assert all(e.swapped for e in mine)
        assert all(got.idle_since >= e.idle_since for e in mine)


# --- victims ----------------------------------------------------------------


def test_frequent_expensive_function_survives():
    rates = {"hot": 50.0, "rare": 0.01}
    envs = [
        E("hot-1", "hot", 0.0, mb=256, init_ms=800.0),  # idle longer, but valuable
        E("rare-1", "rare", 90.0, mb=256, init_ms=800.0),
        E("cheap-1", "hot", 95.0, mb=256, init_ms=1.0),
    ]
    assert victims(envs, 256 * MB, rates) == ["rare-1"]
    assert victims(envs, 300 * MB, rates) == ["rare-1", "cheap-1"]
    assert victims(envs, 10_000 * MB, rates) == ["rare-1", "cheap-1", "hot-1"]


def test_value_is_per_byte_and_unknown_rate_is_zero():
    rates = {"f": 2.0}
    small, big = E("s", "f", 0.0, mb=64), E("b", "f", 0.0, mb=1024)
    assert value(small, rates) > value(big, rates)
    assert value(E("x", "unknown", 0.0), rates) == 0.0
    assert value(E("z", "f", 0.0, mb=0), rates) == math.inf
    # the big one is worth less per byte held, so it goes first although the small one
    # alone would have covered the need
    assert victims([small, big], 64 * MB, rates) == ["b"]


def test_ties_go_to_longest_idle_and_empty_envs_skipped():
    envs = [E("new", "f", 9.0), E("old", "f", 1.0), E("zero", "f", 0.0, mb=0)]
    assert victims(envs, 1, {}) == ["old"]
    assert victims(envs, 0, {}) == []
    assert victims([E("zero", "f", 0.0, mb=0)], 1, {}) == []


@settings(max_examples=300, deadline=None)
@given(env_lists(), st.integers(-MB, 30 * MB), rate_maps)
def test_victims_cover_need_ordered_and_minimal(envs, need, rates):
    got = victims(envs, need, rates)
    by_id = {e.env_id: e for e in envs}
    assert len(got) == len(set(got))
    chosen = [by_id[i] for i in got]
    freed = sum(e.memory_bytes for e in chosen)
    total = sum(e.memory_bytes for e in envs)
    if need <= 0:
        assert got == []
        return
    assert all(e.memory_bytes > 0 for e in chosen)
    if total >= need:
        assert freed >= need
        assert freed - chosen[-1].memory_bytes < need  # the last one was needed
    else:
        assert set(got) == {e.env_id for e in envs if e.memory_bytes > 0}
    keys = [victim_key(e, rates) for e in chosen]
    assert keys == sorted(keys)  # least valuable first
    # nothing left behind is less valuable than something taken
    rest = [e for e in envs if e.env_id not in got and e.memory_bytes > 0]
    if chosen and rest:
        assert min(victim_key(e, rates) for e in rest) > keys[-1]

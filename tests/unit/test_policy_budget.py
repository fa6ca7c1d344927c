"""xxnode.policy.budget: the monthly budget as a pace line (paper §3.1)."""

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xxnode.policy.budget import (
    DEGRADE,
    NORMAL,
    RULE,
    THROTTLE,
    BudgetRule,
    Decision,
    decide,
    month_bounds,
    month_fraction,
    month_of,
)

B = 1000.0
M = 30 * 86400.0
SEVERITY = {NORMAL: 0, DEGRADE: 1, THROTTLE: 2}


def ts(*args) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def run_month(spend_at, steps=1000, budget=B, rule=RULE):
    """States of a tenant whose cumulative spend at month fraction f is spend_at(f)."""
    prev, states = NORMAL, []
    for i in range(steps + 1):
        f = i / steps
        d = decide(spend_at(f), budget, f, prev, rule)
        prev = d.state
        states.append(d.state)
    return states


# -- the lines ---------------------------------------------------------------------------


def test_steady_spend_at_pace_stays_normal_all_month():
    assert set(run_month(lambda f: B * f)) == {NORMAL}
    # and a bit ahead of pace, inside the burst allowance
    assert set(run_month(lambda f: B * (f + 0.9 * RULE.burst))) == {NORMAL}


def test_spend_over_the_degrade_line_degrades_further_over_throttles():
    f = 0.4
    degrade_line = B * (f + RULE.burst)
    throttle_line = degrade_line + B * RULE.throttle_margin
    assert decide(degrade_line, B, f).state == NORMAL  # on the line is still fine
    assert decide(degrade_line + 1e-6, B, f).state == DEGRADE
    assert decide(throttle_line, B, f).state == DEGRADE
    assert decide(throttle_line + 1e-6, B, f).state == THROTTLE
    d = decide(degrade_line + 1, B, f)
    assert d.pace == pytest.approx(degrade_line) and d.retry_after == 0.0
    assert decide(throttle_line + 1, B, f).pace == pytest.approx(degrade_line)


def test_state_is_monotone_in_spend():
    for prev in (NORMAL, DEGRADE, THROTTLE):
        states = [SEVERITY[decide(s, B, 0.5, prev).state] for s in range(0, 1200, 5)]
        assert states == sorted(states)


def test_a_burst_early_in_the_month_is_caught_when_pace_is_low():
    # on day 1 the lines are at 8.3% and 13.3% of the month's budget ...
    assert decide(0.10 * B, B, 1 / 30).state == DEGRADE
    assert decide(0.15 * B, B, 1 / 30).state == THROTTLE
    # ... the same spend in week 3 is nothing
    assert decide(0.15 * B, B, 0.7).state == NORMAL


# -- hysteresis --------------------------------------------------------------------------


def test_no_flapping_on_the_degrade_line():
    f = 0.5
    line = B * (f + RULE.burst)
    h = RULE.hysteresis * B
    assert decide(line + 1, B, f, NORMAL).state == DEGRADE
    # back just under the line: still degraded (it would flap otherwise)
    assert decide(line - 1, B, f, DEGRADE).state == DEGRADE
    assert decide(line - h + 1, B, f, DEGRADE).state == DEGRADE
    assert decide(line - h, B, f, DEGRADE).state == NORMAL
    # from normal, the same spend just under the line is normal
    assert decide(line - 1, B, f, NORMAL).state == NORMAL


def test_no_flapping_on_the_throttle_line_and_leaving_throttle_goes_to_degrade():
    f = 0.5
    tline = B * (f + RULE.burst + RULE.throttle_margin)
    h = RULE.hysteresis * B
    assert decide(tline - 1, B, f, THROTTLE).state == THROTTLE
    assert decide(tline - h + 1, B, f, THROTTLE).state == THROTTLE
    # out of throttle but still above the degrade line: degraded, not normal
    assert decide(tline - h, B, f, THROTTLE).state == DEGRADE
    # from degrade, just under the throttle line is not throttled
    assert decide(tline - 1, B, f, DEGRADE).state == DEGRADE
    # far under every line: straight back to normal
    assert decide(0.0, B, f, THROTTLE).state == NORMAL


def test_spend_oscillating_around_a_line_changes_state_rarely():
    # spend wobbling +-1% of B around the degrade line, as in-flight work lands and the pace
    # line moves: one transition into degrade, none back
    import math

    states = run_month(lambda f: B * (f + RULE.burst + 0.01 * math.sin(f * 400)), steps=4000)
    changes = sum(a != b for a, b in zip(states, states[1:], strict=False))
    assert changes == 1 and states[-1] == DEGRADE


# -- warnings ----------------------------------------------------------------------------


def test_warnings_at_75_and_90_percent_of_the_budget():
    assert RULE.warn_at == (0.75, 0.90)
    f = 0.99  # late in the month: spend near B is on pace, so only the warnings move
    assert decide(0.74 * B, B, f).warnings == ()
    assert decide(0.75 * B, B, f).warnings == (0.75,)
    assert decide(0.899 * B, B, f).warnings == (0.75,)
    assert decide(0.90 * B, B, f).warnings == (0.75, 0.90)
    assert decide(1.2 * B, B, f).warnings == (0.75, 0.90)
    # warnings are of the budget, not of the pace: the state is independent of them
    assert decide(0.75 * B, B, f).state == NORMAL
    assert decide(0.30 * B, B, 0.1).warnings == ()


# -- Retry-After -------------------------------------------------------------------------


def test_retry_after_at_least_one_second_and_bounded():
    f = 0.5
    tline = f + RULE.burst + RULE.throttle_margin
    just_over = decide(B * tline + 1e-9, B, f)
    assert just_over.state == THROTTLE and just_over.retry_after >= 1.0
    # the pace must catch up the hysteresis too: 2% of a 30-day month is 14.4 h
    # (capped at max_retry_after)
    assert just_over.retry_after == RULE.max_retry_after
    way_over = decide(100 * B, B, f)
    assert way_over.retry_after == RULE.max_retry_after
    # a short (simulated) month: the wait is what the line needs to pass spend
    short = decide(B * (tline + 0.01), B, f, month_seconds=3600.0)
    assert short.retry_after == pytest.approx((0.01 + RULE.hysteresis) * 3600.0, abs=1.0)
    assert decide(B * 0.3, B, f).retry_after == 0.0


def test_retry_after_shrinks_as_the_month_goes_on():
    spend = 0.8 * B
    waits = []
    for i in range(0, 70):
        f = i / 100
        d = decide(spend, B, f, THROTTLE, month_seconds=3600.0)
        if d.state != THROTTLE:
            break
        waits.append(d.retry_after)
    assert len(waits) > 10
    assert all(a >= b for a, b in zip(waits, waits[1:], strict=False))
    assert waits[0] > waits[-1] >= 1.0
    # and the spend plus pace after waiting Retry-After lets the tenant in
    f = 0.5
    d = decide(spend, B, f, THROTTLE, month_seconds=3600.0)
    later = f + d.retry_after / 3600.0
    assert decide(spend, B, later, THROTTLE, month_seconds=3600.0).state != THROTTLE


def test_retry_after_does_not_reach_past_the_month_end():
    # 10 minutes before a 30-day month ends, far over budget: spend restarts at 0 in 10 min
    f = 1.0 - 600.0 / M
    d = decide(3 * B, B, f)
    assert d.state == THROTTLE and 1.0 <= d.retry_after <= 600.0
    assert decide(3 * B, B, 1.0).retry_after == 1.0


# -- no budget ---------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [None, 0, 0.0, -5.0, float("inf"), float("nan")])
def test_no_budget_is_always_normal(budget):
    for spend in (0.0, 1.0, 1e12):
        for prev in (NORMAL, DEGRADE, THROTTLE):
            d = decide(spend, budget, 0.01, prev)
            assert d == Decision(NORMAL, (), float("inf"), 0.0)


def test_negative_spend_counts_as_none():
    assert decide(-50.0, B, 0.0, THROTTLE).state == NORMAL


def test_rule_parameters_are_used():
    strict = BudgetRule(burst=0.0, throttle_margin=0.01, hysteresis=0.0, warn_at=(0.5,))
    assert decide(0.41 * B, B, 0.4, rule=strict).state == DEGRADE
    assert decide(0.42 * B, B, 0.4, rule=strict).state == THROTTLE
    assert decide(0.5 * B, B, 0.9, rule=strict).warnings == (0.5,)
    capped = BudgetRule(max_retry_after=5.0)
    assert decide(10 * B, B, 0.1, rule=capped).retry_after == 5.0


# -- months ------------------------------------------------------------------------------


def test_month_bounds_and_of_on_month_edges():
    assert month_bounds(ts(2025, 3, 15, 12)) == (ts(2025, 3, 1), ts(2025, 4, 1))
    # first and last second of a month
    assert month_of(ts(2025, 3, 1)) == "2025-03"
    assert month_of(ts(2025, 4, 1) - 1e-3) == "2025-03"
    assert month_of(ts(2025, 4, 1)) == "2025-04"
    assert month_bounds(ts(2025, 4, 1))[0] == ts(2025, 4, 1)
    assert month_bounds(ts(2025, 4, 1) - 1)[1] == ts(2025, 4, 1)


def test_february_of_a_leap_year_and_not():
    s, e = month_bounds(ts(2024, 2, 29, 23, 59, 59))
    assert (s, e) == (ts(2024, 2, 1), ts(2024, 3, 1)) and e - s == 29 * 86400
    assert month_of(ts(2024, 2, 29, 23, 59, 59)) == "2024-02"
    s, e = month_bounds(ts(2025, 2, 10))
    assert e - s == 28 * 86400
    assert month_of(ts(2025, 2, 28, 23)) == "2025-02" and month_of(ts(2025, 3, 1)) == "2025-03"
    # 1900 and 2100 are not leap years, 2000 is
    assert month_bounds(ts(2100, 2, 2))[1] - month_bounds(ts(2100, 2, 2))[0] == 28 * 86400
    assert month_bounds(ts(2000, 2, 2))[1] - month_bounds(ts(2000, 2, 2))[0] == 29 * 86400


def test_december_to_january():
    s, e = month_bounds(ts(2025, 12, 31, 23, 59, 59))
    assert (s, e) == (ts(2025, 12, 1), ts(2026, 1, 1))
    assert month_of(ts(2025, 12, 31, 23, 59, 59)) == "2025-12"
    assert month_of(ts(2026, 1, 1)) == "2026-01"
    assert month_fraction(ts(2026, 1, 1)) == 0.0
    assert month_fraction(ts(2026, 1, 1) - 1) == pytest.approx(1.0 - 1 / (31 * 86400))


def test_month_fraction():
    assert month_fraction(ts(2025, 6, 1)) == 0.0
    assert month_fraction(ts(2025, 6, 16)) == pytest.approx(0.5)  # June has 30 days
    assert month_fraction(ts(2024, 2, 15, 12)) == pytest.approx(14.5 / 29)
    assert month_fraction(ts(2025, 1, 31, 12)) == pytest.approx(30.5 / 31)
    # the pace a tenant gets at the same wall time depends on the month's length
    assert month_fraction(ts(2025, 2, 15)) > month_fraction(ts(2025, 3, 15))


# -- properties --------------------------------------------------------------------------

steps_st = st.lists(st.floats(0.0, 0.05 * B), min_size=10, max_size=300)


@settings(max_examples=300, deadline=None)
@given(steps_st, st.integers(0, 3), st.floats(0.01, 4.0))
def test_an_obedient_tenant_never_ends_above_the_bound(wants, lag, cheap):
    """A tenant that spends nothing while throttled (and `cheap` x its wish while degraded)
    never ends the month above B*(1+burst+throttle_margin) plus what was in flight: one
    step's spend, and `lag` more while the ledger has not seen them yet."""
    n = len(wants)
    billed, pending, prev = 0.0, [], NORMAL
    peak_over = 0.0
    for i, want in enumerate(wants):
        f = (i + 1) / n
        d = decide(billed, B, f, prev)
        prev = d.state
        spent = {NORMAL: want, DEGRADE: want * cheap, THROTTLE: 0.0}[d.state]
        pending.append(spent)
        if len(pending) > lag:  # the ledger sees spend `lag` steps late
            billed += pending.pop(0)
        line = B * (f + RULE.burst + RULE.throttle_margin)
        peak_over = max(peak_over, billed - line)
    total = billed + sum(pending)
    step_max = max(wants) * max(1.0, cheap)
    assert total <= B * (1 + RULE.burst + RULE.throttle_margin) + (lag + 1) * step_max + 1e-6
    assert peak_over <= (lag + 1) * step_max + 1e-6


@settings(max_examples=200, deadline=None)
@given(st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.sampled_from([NORMAL, DEGRADE, THROTTLE]))
def test_at_or_under_pace_is_normal_from_any_state(f, share, prev):
    # spending at most the pace minus the hysteresis: never held, whatever came before
    spend = B * max(0.0, f + RULE.burst - RULE.hysteresis) * share
    assert decide(spend, B, f, prev).state == NORMAL


@settings(max_examples=300, deadline=None)
@given(
    st.floats(0.0, 3 * B),
    st.floats(0.0, 3 * B),
    st.floats(0.0, 1.0),
    st.sampled_from([NORMAL, DEGRADE, THROTTLE]),
)
def test_decision_invariants(s1, s2, f, prev):
    a, b = sorted((s1, s2))
    da, db = decide(a, B, f, prev), decide(b, B, f, prev)
    assert SEVERITY[da.state] <= SEVERITY[db.state]
    assert set(da.warnings) <= set(db.warnings)
    for d in (da, db):
        assert d.pace == pytest.approx(B * (f + RULE.burst))
        if d.state == THROTTLE:
            assert 1.0 <= d.retry_after <= RULE.max_retry_after
        else:
            assert d.retry_after == 0.0

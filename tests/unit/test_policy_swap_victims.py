from xxnode.policy.swap_victims import (
    JobMemory,
    choose_precleans,
    choose_victims,
    class_ceilings,
    clean_release_order,
)

GB = 1 << 30
MiB = 1 << 20


def J(jid, rank, running, gb, t):
    return JobMemory(jid, rank, running, int(gb * GB), t)


def test_lowest_class_then_waiting_before_running():
    jobs = [
        J("low-run", 0, True, 4, 0.0),
        J("low-wait", 0, False, 1, 1.0),
        J("mid-wait", 1, False, 8, 2.0),
    ]
    got = choose_victims(jobs, 3 * GB, top_rank=2)
    assert got == [("low-wait", 1 * GB), ("low-run", 2 * GB)]


def test_top_class_never_victim_and_shortfall_visible():
    jobs = [J("top", 2, False, 20, 0.0), J("low", 0, False, 1, 0.0)]
    got = choose_victims(jobs, 10 * GB, top_rank=2)
    assert got == [("low", 1 * GB)]
    assert sum(b for _, b in got) < 10 * GB


def test_size_then_age_within_class_and_partial_last():
    jobs = [
        J("small", 0, False, 1, 5.0),
        J("big-old", 0, False, 3, 1.0),
        J("big-new", 0, False, 3, 2.0),
    ]
    got = choose_victims(jobs, 4 * GB, top_rank=3)
    assert got == [("big-new", 3 * GB), ("big-old", 1 * GB)]


def test_nothing_needed_or_nothing_resident():
    jobs = [J("a", 0, False, 0, 0.0)]
    assert choose_victims(jobs, 0, top_rank=1) == []
    assert choose_victims(jobs, GB, top_rank=1) == []


def test_precleans_take_what_reclaim_would_take_first_but_never_a_running_job():
    jobs = [
        JobMemory("img-run", 0, True, 500 * MiB, 0.0),
        JobMemory("img-wait", 0, False, 300 * MiB, 1.0),
        JobMemory("prof", 1, False, 400 * MiB, 2.0),
        JobMemory("home", 2, False, 900 * MiB, 3.0),
    ]
    # 100 MiB of img-wait are clean already: only the rest counts as still to clean
    plan = choose_precleans(jobs, {"img-wait": 100 * MiB}, 350 * MiB, top_rank=2)
    assert plan == [("img-wait", 200 * MiB), ("prof", 150 * MiB)]
    assert choose_precleans(jobs, {}, 2000 * MiB, top_rank=2)[-1][0] == "prof"  # not home


def test_clean_memory_is_released_in_reclaim_order_over_what_each_job_holds_clean():
    jobs = [
        JobMemory("prof", 1, False, 0, 0.0),
        JobMemory("img", 0, False, 0, 1.0),
        JobMemory("home", 2, False, 0, 2.0),
    ]
    clean = {"prof": 64 * MiB, "img": 32 * MiB, "home": 16 * MiB}
    assert clean_release_order(jobs, clean, 80 * MiB, top_rank=2) == [
        ("img", 32 * MiB),
        ("prof", 48 * MiB),
    ]
    assert clean_release_order(jobs, {}, 80 * MiB, top_rank=2) == []


RANKS = {"low": 0, "mid": 1, "top": 2}


def test_ceilings_share_the_slack_above_target_and_spare_the_top_class():
    got = class_ceilings({"low": 500 * MiB, "mid": 100 * MiB}, RANKS, 300 * MiB, 100 * MiB)
    assert got == {"low": 600 * MiB, "mid": 200 * MiB}
    assert "top" not in got


def test_ceilings_hold_lower_classes_where_they_are_under_the_target():
    got = class_ceilings({"low": 500 * MiB}, RANKS, 40 * MiB, 100 * MiB)
    assert got == {"low": 500 * MiB, "mid": 0}


def test_a_class_filling_alone_converges_on_the_target_without_overshoot():
    """Re-computed after each growth step, the class may take its share of what is left
    above the target each time, never more: free memory approaches the target from above."""
    total, target, cur = 1000 * MiB, 100 * MiB, {"low": 0, "mid": 0}
    for _ in range(30):
        ceiling = class_ceilings(cur, RANKS, total - sum(cur.values()), target)["low"]
        cur["low"] = ceiling  # it grows as far as it is let
        assert total - sum(cur.values()) >= target
    assert total - sum(cur.values()) < target + MiB


def test_a_single_class_below_the_top_takes_all_the_slack():
    got = class_ceilings({"low": 0}, {"low": 0, "top": 1}, 300 * MiB, 100 * MiB)
    assert got == {"low": 200 * MiB}

"""MultiQueue.remove: a cancelled job leaves its class queue, the rest keep their order."""

from xxnode.policy.multiqueue import MultiQueue


def test_remove_takes_one_queued_job_out_and_keeps_the_order():
    mq = MultiQueue({"high": 2, "low": 1})
    for i, cls in enumerate(["low", "high", "low", "low"]):
        mq.push(i, cls, float(i))
    assert mq.remove(2, "low") and not mq.remove(2, "low") and not mq.remove(1, "low")
    assert len(mq) == 3
    assert [mq.pop_next(9.0) for _ in range(3)] == [(1, "high"), (0, "low"), (3, "low")]

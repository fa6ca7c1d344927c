"""The memory manager's decisions, on samples built by hand (no kernel)."""

from pathlib import Path

import pytest

from xxnode.classes import ConfigError
from xxnode.kernel.cgroup import Cgroup
from xxnode.node.memory import JobSample, MemoryConfig, MemoryManager, Sample

MiB = 1 << 20
GiB = 1 << 30
RANKS = {"image": 0, "profile": 1, "home": 2}


def manager(**cfg) -> MemoryManager:
    return MemoryManager(
        Cgroup(Path("/nonexistent")), RANKS, MemoryConfig(**cfg), jobs=list,
        memory_controller=True,
    )  # fmt: skip


def job(jid, cls, anon_mib, running=False, started=0.0):
    return JobSample(jid, cls, RANKS[cls], anon_mib * MiB, 0, 0, anon_mib * MiB, 0, running,
                     started)  # fmt: skip


def sample(available, jobs=()):
    return Sample(0.0, 10 * GiB, available, 0.0, 0.0, list(jobs))


def test_oom_order_follows_class_and_brackets_everything_else():
    m = manager()
    m.min_oom_adj = -999  # as with CAP_SYS_RESOURCE
    adj = {c: m.oom_adj(c) for c in RANKS}
    assert adj["image"] == 1000  # above any task at the default 0
    assert adj["home"] == -999  # below every default task, but still killable
    assert adj["image"] > adj["profile"] > adj["home"]


def test_without_cap_sys_resource_the_top_class_stays_at_zero():
    m = manager()
    m.min_oom_adj = 0
    assert [m.oom_adj(c) for c in ("image", "profile", "home")] == [1000, 500, 0]


def test_no_reclaim_while_memory_is_above_target():
    m = manager(target_free_fraction=0.10, low_free_fraction=0.05)
    assert m.need(sample(2 * GiB), psi_woke=True) == 0


def test_psi_below_target_restores_the_target():
    m = manager(target_free_fraction=0.10, low_free_fraction=0.05)
    need = m.need(sample(GiB - 200 * MiB), psi_woke=True)
    assert need == 200 * MiB


def test_below_target_without_psi_waits_until_the_low_watermark():
    m = manager(target_free_fraction=0.10, low_free_fraction=0.05)
    assert m.need(sample(800 * MiB), psi_woke=False) == 0
    assert m.need(sample(300 * MiB), psi_woke=False) == GiB - 300 * MiB


def test_small_shortfalls_are_rounded_up_to_a_chunk():
    m = manager(min_chunk=32 * MiB)
    assert m.need(sample(GiB - MiB), psi_woke=True) == 32 * MiB


def test_victims_are_lowest_class_idle_first_and_never_the_top_class():
    m = manager()
    s = sample(0, [
        job("h", "home", 4000),
        job("p", "profile", 500),
        job("i-run", "image", 300, running=True),
        job("i-idle", "image", 200),
    ])  # fmt: skip
    chosen = [(j.job_id, n // MiB) for j, n in m.victims(s, 600 * MiB)]
    assert chosen == [("i-idle", 200), ("i-run", 300), ("p", 100)]
    everything = m.victims(s, 100 * GiB)
    assert "h" not in {j.job_id for j, _ in everything}


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"target_free_fraction": 1.5}, "memory.target_free_fraction"),
        ({"low_free_fraction": 0.2, "target_free_fraction": 0.1}, "memory.low_free_fraction"),
        ({"swapiness": 3}, "memory.swapiness"),
    ],
)
def test_bad_memory_config_names_the_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        MemoryConfig.from_dict(raw)


def test_a_failing_tick_is_counted_and_the_loop_goes_on_with_a_snapshot_taken_on_the_loop():
    import asyncio
    import threading

    listed_on: list[int] = []
    stepped_with: list[tuple] = []

    def jobs():
        listed_on.append(threading.get_ident())
        return iter([])  # a generator-like view, as the daemon's would be

    m = MemoryManager(
        Cgroup(Path("/nonexistent")), RANKS, MemoryConfig(tick_s=0.01), jobs=jobs,
        memory_controller=True, psi_ok=False,
    )  # fmt: skip

    async def main():
        loop = asyncio.get_running_loop()
        second = asyncio.Event()

        def step(psi_woke, woke_at, refs):
            stepped_with.append(refs)
            if len(stepped_with) == 1:
                raise RuntimeError("injected: a tick that fails")
            loop.call_soon_threadsafe(second.set)
            return False

        m.step = step
        task = asyncio.create_task(m.run())
        await asyncio.wait_for(second.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert m.stats.tick_errors == 1
    assert len(stepped_with) >= 2
    assert all(isinstance(r, tuple) for r in stepped_with)  # immutable, not the live table
    assert set(listed_on) == {loop_thread}  # the job table is read on the loop only


def idle_env(jid, anon_mib, started=0.0):
    from xxnode.node.memory import IDLE, IDLE_RANK

    return JobSample(jid, IDLE, IDLE_RANK, anon_mib * MiB, 0, 0, anon_mib * MiB, 0, False,
                     started)  # fmt: skip


def test_idle_environments_are_reclaimed_before_any_class():
    m = manager()
    s = sample(GiB, [job("img", "image", 500), idle_env("e1", 100), job("prof", "profile", 300),
                     idle_env("e2", 200)])  # fmt: skip
    order = [j.job_id for j, _ in m.victims(s, 250 * MiB)]
    assert order == ["e2", "e1"]  # both idle ones, the bigger first, before the image job
    order = [j.job_id for j, _ in m.victims(s, 600 * MiB)]
    assert order[:2] == ["e2", "e1"] and order[2] == "img"


def test_when_reclaim_falls_short_idle_environments_are_evicted():
    asked = []
    m = manager()
    m.evict = asked.append
    s = sample(GiB - 500 * MiB, [])  # short, nothing to reclaim from
    m.last = None
    m.sample = lambda refs=None: s  # the decision only: no kernel
    m.step(psi_woke=True, woke_at=None)
    assert asked and asked[0] >= 500 * MiB
    assert m.stats.idle_evictions == 1

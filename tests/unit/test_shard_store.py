"""xxnode.shard.store: what was committed comes back after a crash, nothing else does."""

from __future__ import annotations

import asyncio
import os

from xxnode import wire
from xxnode.shard.records import QueuedJob
from xxnode.shard.store import JOURNAL, ShardStore


def _job(size: int = 0, arbiter: str = "") -> tuple[QueuedJob, bytes]:
    payload = os.urandom(size)
    inline = payload if size <= wire.INLINE_MAX else b""
    jid = os.urandom(16)
    dig = wire.digest(payload)
    place = wire.Place(jid, "high", arbiter, {"argv": ["true"]}, size, dig, inline)
    return QueuedJob(jid, "high", place, 0.0), payload


def test_committed_records_come_back_and_the_journal_is_compacted(tmp_path):
    a, pa = _job()
    b, pb = _job(size=5000)  # its input goes to payloads/
    c, pc = _job(arbiter="10.0.0.1:9")

    async def write():
        st = ShardStore(tmp_path)
        await asyncio.gather(st.submitted(a, pa), st.submitted(b, pb), st.submitted(c, pc))
        await st.granted(a.id, "n1")
        await st.finished(c.id, 0)
        syncs = st.syncs
        st.close()  # (a crash would leave the same bytes: every commit was fdatasync'd)
        return syncs

    syncs = asyncio.run(write())
    assert syncs <= 3  # the three submissions went in one group
    st = ShardStore(tmp_path)
    r = st.recovered
    assert set(r.jobs) == {a.id, b.id} and r.grants == {a.id: "n1"} and r.finished == {c.id: 0}
    assert st.payload(b.place.digest) == pb
    lines = (tmp_path / JOURNAL).read_bytes().splitlines()
    assert len(lines) == 4  # a, b submitted; a granted; c finished -- not c's submission
    st.close()


def test_torn_and_unusable_records_are_skipped_and_unsaved_inputs_dropped(tmp_path):
    a, pa = _job()
    big, pbig = _job(size=3000)

    async def write():
        st = ShardStore(tmp_path)
        await st.submitted(a, pa)
        await st.submitted(big, pbig)
        st.close()

    asyncio.run(write())
    (tmp_path / "payloads" / big.place.digest.hex()).unlink()  # as if never written
    with open(tmp_path / JOURNAL, "ab") as f:
        f.write(b'{"ev":"submitted","job":"zz","cls":1}\n')  # unusable
        f.write(b'{"ev":"finished","job":"' + a.id.hex().encode() + b'","sta')  # torn
    st = ShardStore(tmp_path)
    assert set(st.recovered.jobs) == {a.id}  # the torn finish never happened
    st.close()


def test_finished_ids_are_kept_to_a_bound(tmp_path):
    async def write():
        st = ShardStore(tmp_path, keep_finished=10)
        jobs = [_job()[0] for _ in range(25)]
        await asyncio.gather(*(st.finished(j.id, 0) for j in jobs))
        st.close()
        return jobs

    jobs = asyncio.run(write())
    st = ShardStore(tmp_path, keep_finished=10)
    assert list(st.recovered.finished) == [j.id for j in jobs[-10:]]  # the newest, in order
    st.close()


def test_state_dir_and_journal_are_owner_only_also_when_they_existed(tmp_path):
    d = tmp_path / "state"
    (d / "payloads").mkdir(parents=True)
    d.chmod(0o755)
    (d / "payloads").chmod(0o755)
    (d / JOURNAL).write_bytes(b"")
    (d / JOURNAL).chmod(0o644)
    st = ShardStore(d)
    st.close()
    assert (d.stat().st_mode & 0o777, (d / "payloads").stat().st_mode & 0o777) == (0o700, 0o700)
    assert (d / JOURNAL).stat().st_mode & 0o777 == 0o600
    fresh = tmp_path / "fresh"
    ShardStore(fresh).close()
    assert fresh.stat().st_mode & 0o777 == 0o700
    assert (fresh / JOURNAL).stat().st_mode & 0o777 == 0o600

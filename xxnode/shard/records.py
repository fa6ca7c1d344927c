"""A shard's two tables: the jobs it holds and the nodes it places on.

Not to be confused with the node daemon's own ``node.jobs.Job`` (a process it runs) or the
dispatcher's ``ClusterJob`` (a placement it accepted); docs/glossary.md lists them all."""

from __future__ import annotations

from dataclasses import dataclass, field

from xxnode import wire
from xxnode.wire import Addr


@dataclass(slots=True)
class QueuedJob:
    """A job as its shard holds it, from SUBMIT until DONE or NODE_LOST."""

    id: bytes
    cls: str
    place: wire.Place  # what every placement attempt sends; arbiter "" = this shard
    t_enq: float
    state: str = "queued"  # queued | placing | placed
    node: str | None = None


@dataclass(slots=True)
class NodeRecord:
    """What a shard knows of one node: its address, last load report and what it placed there."""

    id: str
    addr: Addr
    last_seen: float
    free: int = 0
    total: int = 0
    jobs: int = 0
    placed: set = field(default_factory=set)  # unfinished job ids placed here
    # job id -> arbiter, for PLACEs here that timed out: the node may have taken the job
    # all the same (its ACCEPT lost), claimed it and be running it; if the node dies,
    # the arbiter is told, and decides by its grant whether the job had started here
    unsure: dict = field(default_factory=dict)
    skip_until: float = 0.0

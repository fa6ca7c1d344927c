"""The message types: one msgspec Struct per kind, tagged with its type code; field
types carry their bounds, so a decoded message is already validated."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import msgspec

INLINE_MAX = 1024  # payloads up to this ride inside SUBMIT/PLACE
MAX_PAYLOAD = 6 * 1024 * 1024  # a job's input, as AWS Lambda allows
# A result's output pulled by digest: a 6 MiB function response beside its log (1 MiB by
# default), or both streams of a command
MAX_OUTPUT = MAX_PAYLOAD + 2 * 1024 * 1024
OUTPUT_FIELDS = ("stdout", "stderr", "response", "log")  # what a big DONE carries aside

# --- messages ---------------------------------------------------------------------------
# Field types carry their bounds, so a decoded message is already validated: a job id is
# 16 bytes, a digest 32, counters are unsigned.  spec/result/data are maps with string
# keys (what JSON would carry).

JobId = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
Digest = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
U32 = Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]
U64 = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]  # msgspec bounds stop at int64
I32 = Annotated[int, msgspec.Meta(ge=-(1 << 31), lt=1 << 31)]
Name = Annotated[str, msgspec.Meta(max_length=1024)]
Obj = dict[str, Any]


class Message(msgspec.Struct, array_like=True, gc=False):
    """Base of every message type; ``kind`` is the type's name in logs and errors.
    Untracked by the collector (``gc=False``): a message holds only plain data and is
    never part of a reference cycle, and the shard keeps one per queued job."""

    kind: ClassVar[str] = "message"


class _Job(Message):
    job: JobId
    cls: Name
    arbiter: Name  # "host:port" that grants the claim; "" = the shard; "@" = the submitter
    spec: Obj
    size: U64  # input size; > len(inline) means it is pulled by digest
    digest: Digest
    inline: bytes


class _Load(Message):
    node: Name
    free: U64
    total: U64
    jobs: U32


class Submit(_Job, tag=1):  # client -> shard
    pass


class SubmitAck(Message, tag=2):
    job: JobId
    ok: bool
    reason: str


class Place(_Job, tag=3):  # shard -> node
    pass


class Accept(Message, tag=4):
    job: JobId


class Refuse(Message, tag=5):
    job: JobId
    reason: str


class Probe(Message, tag=6):
    pass


class ProbeReply(Message, tag=7):
    running: U32
    free: U64


class IdleJoin(_Load, tag=8):
    pass


class IdleUpdate(_Load, tag=9):
    pass


class IdleLeave(Message, tag=10):
    node: Name


class LenQuery(Message, tag=11):
    pass


class LenReply(Message, tag=12):
    length: U32


class Done(Message, tag=13):  # node -> arbiter and shard
    job: JobId
    node: Name
    status: I32
    result: Obj  # the executor's accounting


class Ack(Message, tag=14):
    pass


class Fetch(Message, tag=15):
    digest: Digest
    first: U32
    count: U32


class Frag(Message, tag=16):
    digest: Digest
    index: U32
    size: U64
    data: bytes


class Hello(_Load, tag=17):  # node -> every shard: heartbeat
    pass


class Claim(Message, tag=18):
    job: JobId
    node: Name


class Grant(Message, tag=19):
    job: JobId
    ok: bool


class Status(Message, tag=20):
    what: Name
    start: U32 = 0  # lists come in pages that fit a datagram: the first row wanted


class StatusReply(Message, tag=21):
    data: Obj


class NodeLost(Message, tag=22):
    job: JobId
    node: Name


class Error(Message, tag=23):
    reason: str


class JobQuery(Message, tag=24):  # client -> shard -> node: where is it, how did it end
    job: JobId


class Cancel(Message, tag=25):  # client -> shard -> node
    job: JobId
    reason: Name


MESSAGES: tuple[type[Message], ...] = (
    Submit,
    SubmitAck,
    Place,
    Accept,
    Refuse,
    Probe,
    ProbeReply,
    IdleJoin,
    IdleUpdate,
    IdleLeave,
    LenQuery,
    LenReply,
    Done,
    Ack,
    Fetch,
    Frag,
    Hello,
    Claim,
    Grant,
    Status,
    StatusReply,
    NodeLost,
    Error,
    JobQuery,
    Cancel,
)
for _m in MESSAGES:  # SubmitAck -> "submit_ack"
    _m.kind = "".join("_" + c.lower() if c.isupper() else c for c in _m.__name__).lstrip("_")
TYPES: dict[int, type[Message]] = {m.__struct_config__.tag: m for m in MESSAGES}

# Status codes carried in DONE besides a process exit status.
NODE_LOST = -1000  # the node running it died (declared policy: report, do not retry)
DENIED = -1001  # the arbiter gave the job to another node; nothing ran here
FAILED_START = -1002  # the executor could not run it
CANCELLED = -1003  # cancelled while queued at its shard: nothing ran

"""A cluster job's spec, typed, and checked at the first hop -- the submitting client, then
the shard -- so a job no node could start is refused with its reason before it is queued,
placed and granted. The node checks again what only it can know (the command on its PATH,
its max_timeout, its user): node/jobs.validate.

    argv     the command and its arguments (required, unless a function or a test
             executor's keys are)
    function instead of argv, an invocation: the function version to run (below); the job's
             input is its event, its result the response, error, usage report and log
    env      extra environment: NAME -> value (a function's: its environment variables)
    cwd      an absolute directory on the node
    timeout  wall-clock seconds, > 0
    caller   an invocation's call chain (gateway/invocations.py plan): who pays a premium,
             the depth, the function's own class; the node bills by it
    sleep    SyntheticExecutor only (tests, benchmarks): hold a slot this long
    spin     SyntheticExecutor only: burn a CPU this long
"""

from __future__ import annotations

from typing import Annotated

import msgspec

_NO_NUL = r"^[^\x00]*$"
Arg = Annotated[str, msgspec.Meta(max_length=128 * 1024, pattern=_NO_NUL)]  # MAX_ARG_STRLEN
EnvName = Annotated[str, msgspec.Meta(max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
AbsPath = Annotated[str, msgspec.Meta(max_length=4096, pattern=r"^/[^\x00]*$")]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=7 * 86400)]
Held = Annotated[float, msgspec.Meta(ge=0, le=3600)]
Word = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=_NO_NUL)]


class FunctionRef(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A function version as a node finds it: its code, either by path on the node or by
    digest from the cluster's code store at ``code_url`` (cluster/code.py); how to run it;
    and whose it is. The node checks the rest (the runtime, the handler, the zip) as
    `xxctl fn run` does."""

    code: AbsPath | None = None
    digest: Annotated[str, msgspec.Meta(pattern=r"^sha256:[0-9a-f]{64}$")] | None = None
    code_url: Annotated[str, msgspec.Meta(max_length=2048, pattern=r"^https?://\S+$")] | None = None
    runtime: Word = ""
    handler: Word = "bootstrap"
    name: Word | None = None
    version: Word | None = None
    tenant: Word | None = None
    memory_mb: Annotated[int, msgspec.Meta(ge=128, le=10240)] | None = None


class Chain(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    payer: Word
    depth: Annotated[int, msgspec.Meta(ge=0, le=16)] = 0
    own_class: Word | None = None


class JobSpec(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    argv: Annotated[list[Arg], msgspec.Meta(max_length=4096)] = []
    function: FunctionRef | None = None
    env: Annotated[dict[EnvName, Arg], msgspec.Meta(max_length=1024)] = {}
    cwd: AbsPath | None = None
    timeout: Seconds | None = None
    sleep: Held | None = None
    spin: Held | None = None
    caller: Chain | None = None


def spec_error(spec: object) -> str | None:
    """Why ``spec`` cannot be a cluster job's spec, naming the field; None if it can."""
    try:
        s = msgspec.convert(spec, JobSpec)
    except msgspec.ValidationError as e:
        return _words(str(e))
    if s.function is not None and (s.argv or s.cwd or s.sleep is not None or s.spin is not None):
        return "spec.function: an invocation takes no argv, cwd, sleep or spin"
    if (f := s.function) is not None:
        if (f.code is None) == (f.digest is None):
            return "spec.function: give its code by path or by digest, one of the two"
        if f.digest is not None and f.code_url is None:
            return "spec.function.code_url: code by digest needs the store to fetch it from"
        if not f.runtime:
            return "spec.function.runtime: required"
    if s.function is None and not s.argv and s.sleep is None and s.spin is None:
        return "spec.argv: a command (or a function) is required"
    if s.argv and not s.argv[0]:
        return "spec.argv: the command is empty"
    return None


_PATTERNS = {  # msgspec names a failed pattern by its regex; say what it means
    _NO_NUL: "must not contain a NUL byte",
    r"^[A-Za-z_][A-Za-z0-9_]*$": "must be a variable name ([A-Za-z_][A-Za-z0-9_]*)",
    r"^/[^\x00]*$": "must be an absolute path",
    r"^sha256:[0-9a-f]{64}$": "must be sha256:<64 hex digits>",
    r"^https?://\S+$": "must be an http(s) URL",
}


def _words(msg: str) -> str:
    """msgspec's "Expected ... - at `$.argv[0]`" as "spec.argv[0]: ..."."""
    text, _, where = msg.partition(" - at `")
    where = where.rstrip("`").replace("$", "spec") or "spec"
    if where.startswith("key` in `"):  # a map's key: "spec.env (a name)"
        where = where.split("`")[-1] + " (a name)"
    if text.startswith("Object contains unknown field `"):
        name = text.split("`")[1]
        struct = FunctionRef if where.startswith("spec.function") else JobSpec
        known = ", ".join(struct.__struct_fields__)
        return f"{where}.{name}: unknown field (known: {known})"
    for pattern, words in _PATTERNS.items():
        if pattern.encode("unicode_escape").decode() in text or pattern in text:
            text = words
    return f"{where}: {text}"

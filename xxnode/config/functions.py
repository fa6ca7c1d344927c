"""[functions]: warm execution environments on a node (what each does: xxnode/node/env/)."""

from __future__ import annotations

from dataclasses import dataclass

from xxnode.schema import ConfigError, Key, check

MiB = 1 << 20

KEYS = (
    Key("uid_first", "int", 200_000, "first uid of the range environments run as: each environment gets a uid of its own (as systemd's DynamicUser), so no two tenants, nor two environments, ever share one", least=1000),
    Key("uid_count", "int", 10_000, "size of that range: the most environments alive at once", least=1),
    Key("tmp_size", "bytes", 512 * MiB, "size of each environment's private /tmp tmpfs (Lambda's default)", least=MiB),
    Key("max_processes", "int", 1024, "RLIMIT_NPROC of an environment's uid (and pids.max where the controller exists): a fork bomb stops here", least=8),
    Key("max_concurrency", "int", 8, "environments per function version at once; further invocations wait in the node's queue by class", least=1),
    Key("max_idle_per_function", "int", 4, "idle (frozen) environments kept per function version", least=0),
    Key("keep_alive", "seconds", 600.0, "an idle environment older than this is killed", least=0, above=True),
    Key("memory_price", "float", 0.0001, "µ¢ per GB-second of memory, the same in every class (the paper, §3.1)", least=0),
    Key("log_limit", "bytes", 1 * MiB, "bytes of one invocation's stdout+stderr kept; the rest is counted and said dropped", least=0),
    Key("response_limit", "bytes", 6 * MiB, "largest response an environment may post (Lambda: 6 MiB)", least=1),
    Key("zygote", "bool", True, "start python environments by forking a pre-initialised runtime (single-digit ms) instead of exec'ing a fresh interpreter"),
    Key("max_code_zipped", "bytes", 50 * MiB, "largest code zip accepted (Lambda: 50 MiB)", least=1),
    Key("max_code_unpacked", "bytes", 250 * MiB, "largest unpacked code tree (Lambda: 250 MiB); unpacking stops there", least=1),
)  # fmt: skip


@dataclass(frozen=True)
class FunctionsConfig:
    uid_first: int = 200_000
    uid_count: int = 10_000
    tmp_size: int = 512 * MiB
    max_processes: int = 1024
    max_concurrency: int = 8
    max_idle_per_function: int = 4
    keep_alive: float = 600.0
    memory_price: float = 0.0001
    log_limit: int = 1 * MiB
    response_limit: int = 6 * MiB
    zygote: bool = True
    max_code_zipped: int = 50 * MiB
    max_code_unpacked: int = 250 * MiB

    @classmethod
    def from_dict(cls, raw: object) -> FunctionsConfig:
        v = check("functions", KEYS, raw)
        if v["uid_first"] + v["uid_count"] > 1 << 31:
            raise ConfigError("functions.uid_count: the range passes 2^31")
        return cls(**v)

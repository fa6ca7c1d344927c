"""xxshard's file: [shard] settings and optional [[class]] tables."""

from __future__ import annotations

from dataclasses import dataclass, field

from xxnode.classes import ClassTable, parse_classes
from xxnode.config.defaults import builtin_classes, load_file
from xxnode.schema import ConfigError, Key, check
from xxnode.schema import _check_addr as check_addr

METRICS_DOC = "serve Prometheus metrics at http://HOST:PORT/metrics (docs/metrics.md); an address on the monitoring network, not a public one; empty: off (--metrics-listen overrides)"


def metrics_listen(key: str, raw: object) -> str:
    """`metrics_listen` (or its flag): empty (off), or HOST:PORT checked as every address is;
    `key` is what an error names (``shard.metrics_listen``, ``--metrics-listen``)."""
    if raw is None or raw == "":
        return ""
    if not isinstance(raw, str):
        raise ConfigError(f"{key}: must be HOST:PORT, got {raw!r}")
    check_addr(key, raw)
    return raw


KEYS = (
    Key("listen", "addr", "127.0.0.1:7100", "the shard's UDP address (--listen overrides)"),
    Key("key_file", "path", "", "the cluster key (--key-file or $XX_CLUSTER_KEY_FILE override); required by one of the three"),
    Key("state_dir", "path", "", "journal here: acknowledged jobs survive a restart (--state-dir overrides); empty: in memory only"),
    Key("probe_k", "int", 2, "machines probed when the idle list is empty (power of k choices)", least=1),
    Key("head_policy", "str", "strict", "which class's queue head goes next: strictly by class, or with aging (xxnode.policy.multiqueue)", choices=("strict", "aging")),
    Key("dead_after", "seconds", 3.0, "node silence before it is declared dead and its jobs placed again", least=0, above=True),
    Key("place_timeout", "seconds", 1.0, "a PLACE unanswered this long puts the job back in its queue", least=0, above=True),
    Key("metrics_listen", "str", "", METRICS_DOC),
)  # fmt: skip


@dataclass
class ShardParams:
    probe_k: int = 2
    head_policy: str = "strict"
    dead_after: float = 3.0  # seconds of silence before a node is declared dead
    place_timeout: float = 1.0  # PLACE unanswered this long: the job goes back in queue
    probe_timeout: float = 0.5
    refuse_backoff: float = 0.05


@dataclass(frozen=True)
class ShardConfig:
    listen: str = "127.0.0.1:7100"
    key_file: str = ""
    state_dir: str = ""
    metrics_listen: str = ""
    classes: ClassTable = field(default_factory=builtin_classes)
    params: ShardParams = field(default_factory=ShardParams)
    source: str = ""


def parse(data: object, source: str = "") -> ShardConfig:
    if not isinstance(data, dict):
        raise ConfigError("config: must be a table")
    unknown = set(data) - {"shard", "class"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown table (expected [shard], [[class]])")
    v = check("shard", KEYS, data.get("shard", {}))
    classes = parse_classes(data["class"]) if "class" in data else builtin_classes()
    params = ShardParams(
        probe_k=v["probe_k"],
        head_policy=v["head_policy"],
        dead_after=v["dead_after"],
        place_timeout=v["place_timeout"],
    )
    return ShardConfig(
        v["listen"], v["key_file"], v["state_dir"], metrics_listen("shard.metrics_listen", v["metrics_listen"]),
        classes, params, source,
    )  # fmt: skip


def load(path: str | None) -> ShardConfig:
    """No file: every default, the built-in classes."""
    return load_file(path, parse, ShardConfig)

"""Node configuration: one TOML file, [node] settings and [[class]] tables.

Every value is checked at load; a mistake is a ConfigError whose message starts with the key
(`node.max_running: ...`, `class[1](medium).priority: ...`), never a traceback.
"""

from __future__ import annotations

import os
import pwd
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from xxnode.classes import ClassTable, ConfigError, parse_classes
from xxnode.node.memory import MemoryConfig

DEFAULT_CONFIG = Path(__file__).with_name("default_config.toml")


def _builtin_tables() -> dict:
    with open(DEFAULT_CONFIG, "rb") as f:
        return tomllib.load(f)


ENV_CONFIG = "XX_CONFIG"


@dataclass(frozen=True)
class NodeConfig:
    classes: ClassTable
    max_running: int
    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    state_dir: Path
    socket: Path
    cgroup_root: str
    daemon_priority: int
    pids_max: int
    output_limit: int
    stdin_limit: int
    default_timeout: float
    max_timeout: float
    keep_finished: int
    memory: MemoryConfig = MemoryConfig()
    cluster: object = None  # node.cluster.ClusterConfig when [cluster] names shards
    source: str = ""


_INT_KEYS = {
    # key: (default, minimum)
    "max_running": (0, 0),
    "daemon_priority": (40, 2),
    "pids_max": (4096, 1),
    "output_limit": (1 << 20, 0),
    "stdin_limit": (1 << 20, 0),
    "keep_finished": (1000, 1),
}
_NUM_KEYS = {"default_timeout": 300.0, "max_timeout": 3600.0}
_STR_KEYS = {
    "user": "nobody",
    "state_dir": "/var/lib/xxnode",
    "socket": "/run/xxnode.sock",
    "cgroup_root": "xx",
}


def _int(node: Mapping, key: str) -> int:
    default, minimum = _INT_KEYS[key]
    v = node.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"node.{key}: must be an integer >= {minimum}, got {v!r}")
    return v


def parse(data: Mapping, source: str = "") -> NodeConfig:
    unknown = set(data) - {"node", "class", "memory", "cluster"}
    if unknown:
        raise ConfigError(
            f"{sorted(unknown)[0]}: unknown table (expected [node], [memory], [cluster], [[class]])"
        )
    cluster = None
    if "cluster" in data:
        from xxnode.node.cluster import ClusterConfig

        if not isinstance(data["cluster"], Mapping):
            raise ConfigError("cluster: must be a table")
        cluster = ClusterConfig.from_dict(dict(data["cluster"]))
    mem = data.get("memory", {})
    if not isinstance(mem, Mapping):
        raise ConfigError("memory: must be a table")
    try:
        memory = MemoryConfig.from_dict(dict(mem))
    except TypeError as e:
        raise ConfigError(f"memory: {e}") from None
    node = data.get("node", {})
    if not isinstance(node, Mapping):
        raise ConfigError("node: must be a table")
    unknown = set(node) - set(_INT_KEYS) - set(_NUM_KEYS) - set(_STR_KEYS)
    if unknown:
        raise ConfigError(f"node.{sorted(unknown)[0]}: unknown key")
    ints = {k: _int(node, k) for k in _INT_KEYS}
    if ints["daemon_priority"] > 98:
        raise ConfigError(f"node.daemon_priority: must be 2..98, got {ints['daemon_priority']}")
    nums = {}
    for k, default in _NUM_KEYS.items():
        v = node.get(k, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
            raise ConfigError(f"node.{k}: must be a positive number of seconds, got {v!r}")
        nums[k] = float(v)
    if nums["default_timeout"] > nums["max_timeout"]:
        raise ConfigError("node.default_timeout: must not exceed node.max_timeout")
    strs = {}
    for k, default in _STR_KEYS.items():
        v = node.get(k, default)
        if not isinstance(v, str) or not v:
            raise ConfigError(f"node.{k}: must be a non-empty string, got {v!r}")
        strs[k] = v
    try:
        pw = pwd.getpwnam(strs["user"])
    except KeyError:
        raise ConfigError(f"node.user: no such user {strs['user']!r}") from None
    if pw.pw_uid == 0:
        raise ConfigError("node.user: jobs must not run as root")
    groups = tuple(sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid))))
    # A partial file overrides the built-in defaults: no [[class]] tables means the built-in
    # classes, not "no classes" (`[node] max_running = 4` alone is a whole config).
    raw_classes = data["class"] if "class" in data else _builtin_tables().get("class")
    classes = parse_classes(raw_classes, "class", ints["daemon_priority"])
    max_running = ints["max_running"] or 2 * (os.cpu_count() or 1)
    return NodeConfig(
        classes=classes,
        max_running=max_running,
        user=pw.pw_name,
        uid=pw.pw_uid,
        gid=pw.pw_gid,
        groups=groups,
        state_dir=Path(strs["state_dir"]),
        socket=Path(strs["socket"]),
        cgroup_root=strs["cgroup_root"],
        daemon_priority=ints["daemon_priority"],
        pids_max=ints["pids_max"],
        output_limit=ints["output_limit"],
        stdin_limit=ints["stdin_limit"],
        default_timeout=nums["default_timeout"],
        max_timeout=nums["max_timeout"],
        keep_finished=ints["keep_finished"],
        memory=memory,
        cluster=cluster,
        source=source,
    )


def load(path: str | Path | None = None) -> NodeConfig:
    """--config FILE, else $XX_CONFIG, else the built-in default."""
    path = Path(path or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return parse(data, str(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def loads(text: str, source: str = "<string>") -> NodeConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    return parse(data, source)

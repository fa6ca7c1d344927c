"""xxnode's file: [node] settings, [memory], [cluster] and [[class]] tables.

A partial file overrides the built-in defaults (default.toml): `[node] max_running = 4` alone
is a whole config, with the built-in classes.
"""

from __future__ import annotations

import os
import pwd
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from xxnode.classes import ClassTable, parse_classes
from xxnode.config.cluster import ClusterConfig
from xxnode.config.defaults import DEFAULT_CONFIG, builtin_tables, read_toml
from xxnode.config.functions import FunctionsConfig
from xxnode.config.memory import MemoryConfig
from xxnode.config.shard import METRICS_DOC, metrics_listen
from xxnode.schema import ConfigError, Key, check

ENV_CONFIG = "XX_CONFIG"

KEYS = (
    Key("max_running", "int", 0, "jobs that may run at once (a job of class C counts against those of C and above; the rest queue, highest class first); 0: 2 x CPUs", least=0),
    Key("user", "str", "nobody", "the unprivileged user jobs run as (RLIMIT_RTPRIO 0, no_new_privs); never root", nonempty=True),
    Key("state_dir", "path", "/var/lib/xxnode", "journal, job directories and the lock", nonempty=True),
    Key("socket", "path", "/run/xxnode.sock", "the local API's Unix socket (xxctl)", nonempty=True),
    Key("cgroup_root", "str", "xx", "the cgroup v2 subtree the daemon owns: a path under the cgroup2 mount, or `@self` for the daemon's own delegated cgroup (systemd Delegate=yes)", nonempty=True),
    Key("daemon_priority", "int", 40, "the daemon's SCHED_FIFO priority: above every class and each job's shim (class + 1), below threaded IRQs (50)", least=2, most=98),
    Key("pids_max", "int", 4096, "pids.max per job, where the pids controller exists", least=1),
    Key("output_limit", "bytes", 1 << 20, "bytes of stdout, and of stderr, kept per job; the rest is counted and said dropped", least=0),
    Key("stdin_limit", "bytes", 1 << 20, "bytes of stdin payload accepted per job", least=0),
    Key("default_timeout", "seconds", 300.0, "a job's timeout when its spec names none (<= max_timeout)", least=0, above=True),
    Key("max_timeout", "seconds", 3600.0, "the longest timeout a job may ask for", least=0, above=True),
    Key("keep_finished", "int", 1000, "finished jobs kept in memory and on disk (the journal keeps all)", least=1),
    Key("metrics_listen", "str", "", METRICS_DOC),
)  # fmt: skip


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
    functions: FunctionsConfig = FunctionsConfig()
    cluster: ClusterConfig | None = None  # None: a node on its own
    source: str = ""
    metrics_listen: str = ""  # HOST:PORT of /metrics; "": off


def parse(data: Mapping, source: str = "") -> NodeConfig:
    unknown = set(data) - {"node", "class", "memory", "cluster", "functions"}
    if unknown:
        raise ConfigError(
            f"{sorted(unknown)[0]}: unknown table"
            " (expected [node], [memory], [functions], [cluster], [[class]])"
        )
    cluster = ClusterConfig.from_dict(data["cluster"]) if "cluster" in data else None
    memory = MemoryConfig.from_dict(data.get("memory", {}))
    functions = FunctionsConfig.from_dict(data.get("functions", {}))
    v = check("node", KEYS, data.get("node", {}))
    if v["default_timeout"] > v["max_timeout"]:
        raise ConfigError("node.default_timeout: must not exceed node.max_timeout")
    try:
        pw = pwd.getpwnam(v["user"])
    except KeyError:
        raise ConfigError(f"node.user: no such user {v['user']!r}") from None
    if pw.pw_uid == 0:
        raise ConfigError("node.user: jobs must not run as root")
    groups = tuple(sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid))))
    raw_classes = data["class"] if "class" in data else builtin_tables()["class"]
    classes = parse_classes(raw_classes, "class", v["daemon_priority"])
    return NodeConfig(
        classes=classes,
        max_running=v["max_running"] or 2 * (os.cpu_count() or 1),
        user=pw.pw_name,
        uid=pw.pw_uid,
        gid=pw.pw_gid,
        groups=groups,
        state_dir=Path(v["state_dir"]),
        socket=Path(v["socket"]),
        cgroup_root=v["cgroup_root"],
        daemon_priority=v["daemon_priority"],
        pids_max=v["pids_max"],
        output_limit=v["output_limit"],
        stdin_limit=v["stdin_limit"],
        default_timeout=v["default_timeout"],
        max_timeout=v["max_timeout"],
        keep_finished=v["keep_finished"],
        memory=memory,
        functions=functions,
        cluster=cluster,
        source=source,
        metrics_listen=metrics_listen("node.metrics_listen", v["metrics_listen"]),
    )


def load(path: str | Path | None = None) -> NodeConfig:
    """--config FILE, else $XX_CONFIG, else the built-in default."""
    path = Path(path or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG)
    data = read_toml(path)
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

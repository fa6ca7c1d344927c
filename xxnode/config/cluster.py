"""[cluster] on a node: the shards it joins, and the key they share."""

from __future__ import annotations

from dataclasses import dataclass

from xxnode import wire
from xxnode.schema import ConfigError, Key, check

KEYS = (
    Key("shards", "addrs", (), "the shards whose idle lists this node joins and whose placements it takes", required=True),
    Key("key_file", "path", "", "the cluster key (>= 16 bytes, hex or raw) that authenticates every datagram", required=True, nonempty=True),
    Key("listen", "addr", "0.0.0.0:0", "the node dispatcher's UDP address (port 0: any)"),
    Key("node_id", "str", "", "this node's name in the cluster; empty: hostname-cgroup"),
)  # fmt: skip


@dataclass(frozen=True)
class ClusterConfig:
    shards: tuple[str, ...]
    key_file: str
    listen: str = "0.0.0.0:0"
    node_id: str = ""

    @classmethod
    def from_dict(cls, raw: object, where: str = "cluster") -> ClusterConfig:
        cfg = cls(**check(where, KEYS, raw))
        try:
            wire.load_key(cfg.key_file)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}.key_file: {e}") from None
        return cfg

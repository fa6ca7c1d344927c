"""Configuration types and loaders, below everything that reads them.

One module per file a daemon reads (node.py for xxnode, shard.py for xxshard) and per
section they share (memory.py, cluster.py); every key is declared once as a `schema.Key`,
so one validator checks them all and docs/config.md is generated from the same tables
(`python -m xxnode.config.reference`).
"""

from xxnode.config.cluster import ClusterConfig
from xxnode.config.defaults import DEFAULT_CONFIG, builtin_classes
from xxnode.config.memory import MemoryConfig
from xxnode.config.node import ENV_CONFIG, NodeConfig, load, loads, parse
from xxnode.schema import ConfigError

__all__ = [
    "DEFAULT_CONFIG",
    "ENV_CONFIG",
    "ClusterConfig",
    "ConfigError",
    "MemoryConfig",
    "NodeConfig",
    "builtin_classes",
    "load",
    "loads",
    "parse",
]

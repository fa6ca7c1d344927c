"""xxgate's file: a [gateway] table and optional [[class]] tables (the cluster's classes:
what `xx:class` may name, and each one's price)."""

from __future__ import annotations

from dataclasses import dataclass, field

from xxnode.classes import ClassTable, parse_classes
from xxnode.config.defaults import builtin_classes, load_file
from xxnode.config.shard import METRICS_DOC, metrics_listen
from xxnode.schema import ConfigError, Key, check

KEYS = (
    Key("listen", "addr", "127.0.0.1:9000", "the HTTP address clients (boto3, the AWS CLI, curl) and nodes (code by digest) reach (--listen overrides)"),
    Key("store", "str", "sqlite:///var/lib/xx/gateway.db", "the state: sqlite:///PATH (one gateway) or postgresql://... (several gateways share it)", nonempty=True),
    Key("shards", "addrs", ["127.0.0.1:7100"], "the shards invocations are submitted to, tried in order"),
    Key("key_file", "path", "/etc/xx/cluster.key", "the cluster key (--key-file or $XX_CLUSTER_KEY_FILE override)"),
    Key("public_url", "str", "", "the URL nodes fetch code from (default: http://LISTEN)"),
    Key("region", "str", "us-east-1", "the region ARNs and SigV4 scopes carry", nonempty=True),
    Key("default_class", "str", "", "the class of a tenant created without one (default: the cheapest)"),
    Key("margin", "seconds", 5.0, "how long past a function's timeout an invocation may take before the gateway answers with an error (a dead shard or node)", least=0),
    Key("event_workers", "int", 4, "Event invocations run at once from the durable queue (0: this gateway only accepts them; others sharing the store run them)", least=0),
    Key("metrics_listen", "str", "", METRICS_DOC),
)  # fmt: skip


@dataclass(frozen=True)
class GatewayConfig:
    listen: str = "127.0.0.1:9000"
    store: str = "sqlite:///var/lib/xx/gateway.db"
    shards: tuple[str, ...] = ("127.0.0.1:7100",)
    key_file: str = "/etc/xx/cluster.key"
    public_url: str = ""
    region: str = "us-east-1"
    default_class: str = ""
    margin: float = 5.0
    event_workers: int = 4
    metrics_listen: str = ""
    classes: ClassTable = field(default_factory=builtin_classes)
    source: str = ""

    @property
    def code_url(self) -> str:
        return self.public_url or f"http://{self.listen}"

    @property
    def tenant_default_class(self) -> str:
        return self.default_class or min(self.classes, key=lambda c: c.price).name


def parse(data: object, source: str = "") -> GatewayConfig:
    if not isinstance(data, dict):
        raise ConfigError("config: must be a table")
    unknown = set(data) - {"gateway", "class"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown table (expected [gateway], [[class]])")
    v = check("gateway", KEYS, data.get("gateway", {}))
    classes = parse_classes(data["class"]) if "class" in data else builtin_classes()
    if v["default_class"] and classes.get(v["default_class"]) is None:
        raise ConfigError(f"gateway.default_class: no class {v['default_class']!r}")
    v["shards"] = tuple(v["shards"])
    v["metrics_listen"] = metrics_listen("gateway.metrics_listen", v["metrics_listen"])
    return GatewayConfig(**v, classes=classes, source=source)


def load(path: str | None) -> GatewayConfig:
    """No file: every default, the built-in classes."""
    return load_file(path, parse, GatewayConfig)

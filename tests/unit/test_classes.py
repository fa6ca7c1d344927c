"""Price classes and node config: the default follows the paper; every mistake names its key."""

from __future__ import annotations

import os

import pytest

from xxnode import config
from xxnode.classes import ConfigError, parse_classes


def test_default_config_is_the_papers_web_server():
    cfg = config.load(config.DEFAULT_CONFIG)
    assert [(c.name, c.price) for c in cfg.classes] == [
        ("high", 2.0),
        ("medium", 1.5),
        ("low", 0.5),
    ]
    high, medium, low = cfg.classes
    assert (high.sched_policy, high.priority) == (os.SCHED_FIFO, 30)
    assert (medium.sched_policy, medium.priority) == (os.SCHED_FIFO, 20)
    assert low.sched_policy == os.SCHED_BATCH
    assert cfg.classes.ranks() == {"high": 2, "medium": 1, "low": 0}
    assert high.shim_sched == (os.SCHED_FIFO, 31) and low.shim_sched == (os.SCHED_OTHER, 0)
    assert cfg.daemon_priority > high.priority + 1
    assert cfg.user == "nobody" and cfg.max_running == 2 * os.cpu_count()


def cls(name, price, policy="fifo", priority=None):
    d = {"name": name, "price": price, "policy": policy}
    if priority is not None:
        d["priority"] = priority
    return d


def test_ranks_follow_price_not_file_order():
    t = parse_classes([cls("b", 1, "batch"), cls("a", 3, priority=40), cls("c", 2, priority=10)])
    assert t.names() == ["a", "c", "b"]


@pytest.mark.parametrize(
    "classes, message",
    [
        ([], "class: need at least one"),
        ([{"price": 1}], "class[0].name: must match"),
        ([cls("Web", 1, priority=5)], "class[0].name: must match"),
        ([cls("a", 0, priority=5)], "class[0](a).price: must be a number > 0, got 0"),
        ([cls("a", "1", priority=5)], "class[0](a).price: must be a number, got '1'"),
        ([cls("a", 1, "rr", 5)], "class[0](a).policy: must be one of"),
        ([cls("a", 1)], "class[0](a).priority: fifo needs an integer priority"),
        ([cls("a", 1, priority=99)], "class[0](a).priority: must be an integer 1..98"),
        ([cls("a", 1, "batch", 3)], "class[0](a).priority: only fifo classes take a priority"),
        ([cls("a", 1, priority=5), cls("a", 2, priority=9)], "class[1].name: duplicate class 'a'"),
        ([cls("a", 1, priority=5), cls("b", 1, priority=9)], "class[1](b).price: same price"),
        (
            [cls("a", 1, priority=9), cls("b", 2, priority=5)],
            "class[1](b).policy: costs more than 'a'",
        ),
        ([cls("a", 1, "other"), cls("b", 2, "batch")], "class[1](b).policy: costs more than 'a'"),
        (
            [cls("a", 1, priority=5), cls("b", 2, priority=6)],
            "class[1](b).priority: must be at least 2 above",
        ),
        ([{"name": "a", "price": 1, "colour": "red"}], "class[0](a).colour: unknown key"),
    ],
)
def test_bad_classes_name_the_key(classes, message):
    with pytest.raises(ConfigError) as e:
        parse_classes(classes)
    assert str(e.value).startswith(message), str(e.value)


def test_daemon_must_outrank_every_class_and_its_shim():
    with pytest.raises(ConfigError, match=r"class\[0\]\(a\).priority: must be below the daemon"):
        parse_classes([cls("a", 1, priority=39)], daemon_priority=40)
    parse_classes([cls("a", 1, priority=38)], daemon_priority=40)


@pytest.mark.parametrize(
    "node, message",
    [
        ("max_running = -1", "node.max_running: must be an integer >= 0"),
        ("max_running = 'lots'", "node.max_running: must be an integer"),
        ("user = 'no-such-user-xx'", "node.user: no such user"),
        ("user = 'root'", "node.user: jobs must not run as root"),
        ("default_timeout = 0", "node.default_timeout: must be a number of seconds > 0"),
        ("default_timeout = 10\nmax_timeout = 5", "node.default_timeout: must not exceed"),
        ("daemon_priority = 99", "node.daemon_priority: must be an integer 2..98"),
        ("colour = 'red'", "node.colour: unknown key"),
    ],
)
def test_bad_node_settings_name_the_key(node, message):
    text = f'[node]\n{node}\n[[class]]\nname = "a"\nprice = 1\npolicy = "batch"\n'
    with pytest.raises(ConfigError) as e:
        config.loads(text)
    assert str(e.value).startswith(message), str(e.value)


def test_unreadable_and_malformed_files_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="No such file"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)

"""Config files as an operator writes them: partial files, and bad values named by key."""

import re

import pytest

from xxnode import config
from xxnode.classes import ConfigError
from xxnode.config import MemoryConfig
from xxnode.config import shard as shard_config


def test_a_partial_file_overrides_the_built_in_defaults():
    cfg = config.loads('[node]\nmax_running = 4\nuser = "nobody"\n')
    assert cfg.max_running == 4
    builtin = config.load(config.DEFAULT_CONFIG).classes
    assert [c.name for c in cfg.classes] == [c.name for c in builtin] and len(builtin) > 0


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"tick_s": "fast"}, "memory.tick_s"),
        ({"min_chunk": -5}, "memory.min_chunk"),
        ({"min_chunk": 128 << 20, "max_chunk": 64 << 20}, "memory.min_chunk"),
        ({"prefetch": "yes"}, "memory.prefetch"),
        ({"zswap_max_pool_percent": 150}, "memory.zswap_max_pool_percent"),
        ({"no_such": 1}, "memory.no_such"),
    ],
)
def test_bad_memory_values_are_refused_naming_their_key(raw, key):
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + ":"):
        MemoryConfig.from_dict(raw)


def test_good_memory_values_pass():
    cfg = MemoryConfig.from_dict({"tick_s": 2, "min_chunk": 1 << 20, "prefetch": False})
    assert cfg.tick_s == 2 and cfg.min_chunk == 1 << 20 and cfg.prefetch is False


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[shard]\ndead_after = -1\n", "shard.dead_after"),
        ("[shard]\nplace_timeout = 0\n", "shard.place_timeout"),
        ("[shard]\nprobe_k = 0\n", "shard.probe_k"),
        ("[shard]\nnope = 1\n", "shard.nope"),
    ],
)
def test_bad_shard_values_are_refused_naming_their_key(tmp_path, text, key):
    f = tmp_path / "shard.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(f))}: {re.escape(key)}:"):
        shard_config.load(str(f))


def test_the_reference_page_is_generated_from_the_validators_tables():
    from pathlib import Path

    from xxnode.config import reference

    page = Path(__file__).parents[2] / "docs" / "config.md"
    assert page.read_text() == reference.render(), (
        "run: python -m xxnode.config.reference > docs/config.md"
    )


@pytest.mark.parametrize(
    "text, key",
    [
        ('[memory]\ntick_s = "fast"\n', "memory.tick_s"),
        ("[memory]\nmin_chunk = -5\n", "memory.min_chunk"),
        ("[memory]\nmin_chunk = 100\nmax_chunk = 10\n", "memory.min_chunk"),
        ("[node]\npids_max = 0\n", "node.pids_max"),
        ('[node]\ncgroup_root = ""\n', "node.cgroup_root"),
        ('[cluster]\nshards = ["nohost"]\nkey_file = "/x"\n', "cluster.shards[0]"),
        ('[cluster]\nkey_file = "/x"\n', "cluster.shards"),
        ("[cluster]\nshards = []\n", "cluster.shards"),
        (
            '[cluster]\nshards = ["127.0.0.1:1"]\nkey_file = "/nonexistent/key"\n',
            "cluster.key_file",
        ),
        ('[[class]]\nname = "a"\nprice = 1\npolicy = "fifo"\n', "class[0](a).priority"),
    ],
)
def test_every_section_names_the_bad_key(text, key):
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}:"):
        config.loads(text, source="")

"""Config files as an operator writes them: partial files, and bad values named by key."""

import pytest

from xxnode import config
from xxnode.classes import ConfigError
from xxnode.node.memory import MemoryConfig
from xxnode.shard.main import load_config


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
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + ":"):
        load_config(str(f))

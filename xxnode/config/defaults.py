"""The built-in configuration (default.toml): what a partial file falls back to, and the
classes a shard uses when its own file names none — without reading any node's settings."""

from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path

from xxnode.classes import ClassTable, parse_classes
from xxnode.schema import ConfigError

DEFAULT_CONFIG = Path(__file__).with_name("default.toml")


@cache
def builtin_tables() -> dict:
    with open(DEFAULT_CONFIG, "rb") as f:
        return tomllib.load(f)


def builtin_classes() -> ClassTable:
    return parse_classes(builtin_tables()["class"])


def read_toml(path: str | Path) -> dict:
    """A config file's tables; any failure is a ConfigError naming the file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_file(path, parse, default):
    """A daemon's config file through its `parse`, every mistake naming the file first;
    no path: `default()` (every default, the built-in classes)."""
    if not path:
        return default()
    try:
        return parse(read_toml(path), str(path))
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None

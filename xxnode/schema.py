"""Config keys as data: one validator for every daemon's sections, and the reference page
(docs/config.md) generated from the same tables, so a key cannot be checked one way and
documented another.

A section is a tuple of `Key`s. `check(section, raw)` returns every key's value (the default
where absent) or raises a ConfigError whose message starts with the key (`memory.min_chunk:
must be >= 1, got -5`). Checks between keys (`min_chunk <= max_chunk`) stay with the section
that owns them, after `check`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


class ConfigError(ValueError):
    """A configuration mistake; the message starts with the offending key."""


# kind -> how an error names it; "seconds" and "bytes" are numbers with a unit in the docs
_WHAT = {
    "int": "an integer",
    "bytes": "an integer number of bytes",
    "float": "a number",
    "seconds": "a number of seconds",
    "bool": "true or false",
    "str": "a string",
    "path": "a path",
    "addr": "HOST:PORT",
    "addrs": "a non-empty list of HOST:PORT",
}


@dataclass(frozen=True)
class Key:
    name: str
    kind: str  # a key of _WHAT
    default: object
    doc: str
    least: float | None = None  # inclusive, unless `above`
    most: float | None = None  # inclusive
    above: bool = False  # least is exclusive: the value must be > least
    choices: tuple[str, ...] = ()
    required: bool = False
    nonempty: bool = False

    def range_text(self) -> str:
        """The range as the reference page prints it."""
        if self.choices:
            return " | ".join(f"`{c}`" for c in self.choices)
        lo = None if self.least is None else f"{'>' if self.above else '>='} {self.least:g}"
        if self.least is not None and self.most is not None and not self.above:
            return f"{self.least:g}..{self.most:g}"
        parts = [p for p in (lo, None if self.most is None else f"<= {self.most:g}") if p]
        if self.nonempty and not parts:
            parts.append("non-empty")
        return ", ".join(parts) or "any"

    def check(self, where: str, v: object) -> object:
        key, raw, kind = f"{where}.{self.name}", v, self.kind
        if kind in ("float", "seconds"):
            ok = isinstance(v, int | float) and not isinstance(v, bool)
            v = float(v) if ok else v
        elif kind in ("int", "bytes"):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif kind == "bool":
            ok = isinstance(v, bool)
        elif kind == "addrs":
            ok = isinstance(v, list) and bool(v) and all(isinstance(s, str) for s in v)
        else:
            ok = isinstance(v, str)
        if not ok:
            raise ConfigError(f"{key}: must be {_WHAT[kind]}, got {v!r}")
        if kind == "addr":
            _check_addr(key, v)
        if kind == "addrs":
            for i, s in enumerate(v):
                _check_addr(f"{key}[{i}]", s)
            v = tuple(v)
        if self.nonempty and not v:
            raise ConfigError(f"{key}: must not be empty")
        if self.choices and v not in self.choices:
            raise ConfigError(f"{key}: must be one of {', '.join(self.choices)}, got {v!r}")
        if self.least is not None:
            if (v <= self.least) if self.above else (v < self.least):
                raise ConfigError(f"{key}: must be {_WHAT[kind]} {self.range_text()}, got {raw!r}")
        if self.most is not None and v > self.most:
            raise ConfigError(f"{key}: must be {_WHAT[kind]} {self.range_text()}, got {raw!r}")
        return v


def _check_addr(key: str, s: object) -> None:
    host, sep, port = s.rpartition(":") if isinstance(s, str) else ("", "", "")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: not HOST:PORT: {s!r}")


def check(where: str, keys: tuple[Key, ...], raw: object) -> dict[str, object]:
    """Every key of a section: checked value, or its default."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a table")
    by_name = {k.name: k for k in keys}
    for name in raw:
        if name not in by_name:
            raise ConfigError(f"{where}.{name}: unknown key (known: {', '.join(by_name)})")
    out = {}
    for k in keys:
        if k.name in raw:
            out[k.name] = k.check(where, raw[k.name])
        elif k.required:
            raise ConfigError(f"{where}.{k.name}: required ({k.doc})")
        else:
            out[k.name] = k.default
    return out

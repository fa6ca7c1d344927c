"""[memory]: the node memory manager's settings (what each does: xxnode/node/memory.py)."""

from __future__ import annotations

from dataclasses import dataclass

from xxnode.schema import ConfigError, Key, check

MiB = 1 << 20

KEYS = (
    Key("target_free_fraction", "float", 0.10, "MemAvailable (fraction of RAM) restored by reclaiming the lowest classes: room for a new high-class job's first seconds", least=0, most=1, above=True),
    Key("low_free_fraction", "float", 0.05, "below this the node reclaims even before PSI fires (<= target_free_fraction); a placed job is refused only below it and only when equal or higher classes hold the memory", least=0, most=1, above=True),
    Key("min_chunk", "bytes", 32 * MiB, "the smallest memory.reclaim write worth a syscall (<= max_chunk)", least=1),
    Key("max_chunk", "bytes", 64 * MiB, "the largest single memory.reclaim write: it blocks until done, so big requests are split and the state re-read between them", least=1),
    Key("psi_stall_us", "int", 100_000, "PSI trigger: µs of 'some' memory stall per window that wake the manager (<= psi_window_us)", least=1),
    Key("psi_window_us", "int", 1_000_000, "PSI trigger window in µs (unprivileged: a multiple of 2 s)", least=1),
    Key("tick_s", "seconds", 1.0, "periodic wake-up: the fallback, and the only path without PSI", least=0.001),
    Key("quiet_s", "seconds", 5.0, "pressure-free time before swapped jobs are prefetched and thawed", least=0),
    Key("prefetch", "bool", True, "fault swapped jobs back in (process_madvise WILLNEED), highest class first, once pressure has passed"),
    Key("class_ceilings", "bool", False, "memory.high on every class below the top at its memory plus its share of the free memory above target_free_fraction, re-set every wake-up: a lower class growing into the free target pays for its own reclaim, so a higher class arrives to free pages; only while swap has room for what it would push out. Off by default: in tools/bench_memory it holds free memory at the target during a fill but gave no gain in the high class's slowdown and one 4.4x run in six (docs/memory.md)"),
    Key("freeze_swapped", "bool", False, "freeze a job reclaimed from until quiet_s has passed, so it cannot fault its pages back meanwhile"),
    Key("clean_reserve_fraction", "float", 0.0, "low-class memory (fraction of RAM) kept resident but clean — written to swap once, read back — so a higher class can be given it without waiting for the write; 0 (the default: it showed no gain in tools/bench_memory, where the overcommit fills half the swap before it can grow) turns it off", least=0, most=1),
    Key("clean_chunk", "bytes", 4 * MiB, "the unit in which memory is made clean: written, read back and later released as one range; small enough to find resident runs in a job that is partly swapped already", least=1 << 20),
    Key("zswap_compressor", "str", "", "zswap compressor to set at start; empty leaves the kernel's choice"),
    Key("zswap_max_pool_percent", "int", 0, "zswap pool limit (% of RAM) to set at start; 0 leaves the kernel's choice", least=0, most=100),
)  # fmt: skip


@dataclass(frozen=True)
class MemoryConfig:
    target_free_fraction: float = 0.10
    low_free_fraction: float = 0.05
    min_chunk: int = 32 * MiB
    max_chunk: int = 64 * MiB
    psi_stall_us: int = 100_000
    psi_window_us: int = 1_000_000
    tick_s: float = 1.0
    quiet_s: float = 5.0
    prefetch: bool = True
    class_ceilings: bool = False
    freeze_swapped: bool = False
    clean_reserve_fraction: float = 0.0
    clean_chunk: int = 4 * MiB
    zswap_compressor: str = ""
    zswap_max_pool_percent: int = 0

    @classmethod
    def from_dict(cls, raw: object, where: str = "memory") -> MemoryConfig:
        cfg = cls(**check(where, KEYS, raw))
        if cfg.low_free_fraction > cfg.target_free_fraction:
            raise ConfigError(f"{where}.low_free_fraction: must not exceed target_free_fraction")
        if cfg.min_chunk > cfg.max_chunk:
            raise ConfigError(f"{where}.min_chunk: must not exceed max_chunk ({cfg.max_chunk})")
        if cfg.psi_stall_us > cfg.psi_window_us:
            raise ConfigError(f"{where}.psi_stall_us: must not exceed psi_window_us")
        return cfg

"""eBPF: the only module that loads BPF programs or reads BPF maps.

The memory manager sees memory through PSI and cgroup files; this adds what those files
cannot say, per cgroup and as it happens: how many page faults a job takes, how much memcg
reclaim was aimed at it and what it yielded, how long its tasks sat in reclaim, and whether
it lost a process to the OOM killer. The kernel side is `ebpf/memwatch.bpf.c` (a CO-RE
object built by `make -C ebpf`); `ebpf/memwatch.h` holds the struct both sides share.

libbpf does the work (open, CO-RE relocation against /sys/kernel/btf/vmlinux, load, attach);
we call `libbpf.so.1` through cffi in ABI mode, so nothing is compiled at install time.

Degrading: a hook whose tracepoint or function is missing from this kernel's BTF, or that
the verifier refuses, is left out and named in `MemWatch.missing`; the rest still attach.
When nothing can load (no libbpf, no object, no BTF, no privilege) `MemWatch.open` raises
`BpfUnavailable(reason)` and the daemon runs on PSI and cgroup files alone (mode `no-ebpf`).

Why one module of ~440 lines: it is one kernel interface (DESIGN.md: one place per
interface) -- the cffi declarations of the libbpf calls we make, the loader and the map
reader change together whenever the object's maps or hooks do.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
# Where `xxctl install` puts the object, then (a source checkout) where `make -C ebpf` builds it.
OBJECT_PATHS = (
    Path("/usr/local/lib/xx/memwatch.bpf.o"),
    Path("/usr/lib/xx/memwatch.bpf.o"),
    REPO / "ebpf" / "memwatch.bpf.o",
)


def default_object() -> Path:
    """$XX_BPF_OBJECT (the unit sets it), else the first of OBJECT_PATHS that exists."""
    env = os.environ.get("XX_BPF_OBJECT")
    if env:
        return Path(env)
    return next((p for p in OBJECT_PATHS if p.is_file()), OBJECT_PATHS[-1])


DEFAULT_OBJECT = default_object()  # at import; MemWatch.open() looks again

COUNTERS_MAP = "counters"
UNATTRIBUTED = 0  # MEMWATCH_UNATTRIBUTED in memwatch.h
MAX_CGROUPS = 16384  # MEMWATCH_MAX_CGROUPS in memwatch.h


@dataclass
class CgroupCounters:
    """One cgroup's counters since the object was loaded (or the cgroup first seen).
    Mirrors `struct memwatch_counters` in ebpf/memwatch.h: same fields, same order."""

    page_faults: int = 0  # user-mode page faults taken by the cgroup's tasks
    write_faults: int = 0  # ... of which on a write access
    reclaim_events: int = 0  # memcg reclaim passes aimed at this cgroup
    pages_reclaimed: int = 0  # pages those passes reclaimed
    reclaim_stalls: int = 0  # reclaim episodes (memcg or direct) its tasks sat in
    reclaim_stall_ns: int = 0  # time spent in them
    stall_reclaimed: int = 0  # pages reclaimed during those episodes
    direct_reclaims: int = 0  # of reclaim_stalls, global direct reclaim
    oom_kills: int = 0  # OOM victims that were in this cgroup


FIELDS = tuple(f.name for f in fields(CgroupCounters))

# Which hook feeds which counters: a missing hook makes these counters meaningless (they stay
# 0), and the daemon should read the cgroup file instead.
HOOK_COUNTERS = {
    "tp_btf/page_fault_user": ("page_faults", "write_faults"),
    "fexit/try_to_free_mem_cgroup_pages": ("reclaim_events", "pages_reclaimed"),
    "tp_btf/mm_vmscan_memcg_reclaim_begin": ("reclaim_stalls", "reclaim_stall_ns"),
    "tp_btf/mm_vmscan_memcg_reclaim_end": ("reclaim_stalls", "reclaim_stall_ns", "stall_reclaimed"),
    "tp_btf/mm_vmscan_direct_reclaim_begin": ("direct_reclaims", "reclaim_stall_ns"),
    "tp_btf/mm_vmscan_direct_reclaim_end": ("direct_reclaims", "reclaim_stall_ns"),
    "tp_btf/mark_victim": ("oom_kills",),
}


class BpfUnavailable(RuntimeError):
    """eBPF cannot be used here; the message says why. The daemon degrades to `no-ebpf`."""


# -- libbpf through cffi (ABI mode) ------------------------------------------------------------
_CDEF = """
struct bpf_object;
struct bpf_program;
struct bpf_link;
struct btf;

/* libbpf_print_fn_t takes a va_list; on x86-64 that is a pointer to the register save area,
   so it is passed through untouched as void * and handed to vsnprintf. */
typedef int (*libbpf_print_fn_t)(int level, const char *fmt, void *args);
libbpf_print_fn_t libbpf_set_print(libbpf_print_fn_t fn);

struct bpf_object *bpf_object__open_file(const char *path, const void *opts);
int bpf_object__load(struct bpf_object *obj);
void bpf_object__close(struct bpf_object *obj);
struct bpf_program *bpf_object__next_program(const struct bpf_object *obj,
                                             struct bpf_program *prog);
int bpf_object__find_map_fd_by_name(const struct bpf_object *obj, const char *name);

const char *bpf_program__name(const struct bpf_program *prog);
const char *bpf_program__section_name(const struct bpf_program *prog);
int bpf_program__set_autoload(struct bpf_program *prog, bool autoload);
struct bpf_link *bpf_program__attach(const struct bpf_program *prog);
int bpf_link__destroy(struct bpf_link *link);

int bpf_map_get_next_key(int fd, const void *key, void *next_key);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_delete_elem(int fd, const void *key);
int libbpf_num_possible_cpus(void);

struct btf *btf__load_vmlinux_btf(void);
void btf__free(struct btf *btf);
int btf__find_by_name_kind(const struct btf *btf, const char *type_name, uint32_t kind);
"""
_LIBC_CDEF = "int vsnprintf(char *str, size_t size, const char *fmt, void *args);"

BTF_KIND_TYPEDEF = 8
BTF_KIND_FUNC = 12
LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2


class _Libbpf:
    """The loaded library plus libbpf's message routing. libbpf's print hook is process-wide,
    so messages go into whichever capture is open (under a lock) and to logging at DEBUG."""

    def __init__(self) -> None:
        import cffi

        self.ffi = cffi.FFI()
        self.ffi.cdef(_CDEF)
        self.ffi.cdef(_LIBC_CDEF)
        try:
            self.lib = self.ffi.dlopen("libbpf.so.1")
        except OSError as e:
            raise BpfUnavailable(f"libbpf.so.1 not loadable ({e}): install libbpf1") from None
        self.libc = self.ffi.dlopen(None)
        self.lock = threading.RLock()
        self.captured: list[str] = []
        self._buf = self.ffi.new("char[]", 4096)
        self._print_cb = self.ffi.callback("libbpf_print_fn_t", self._on_print)
        self.lib.libbpf_set_print(self._print_cb)

    def _on_print(self, level: int, fmt, args) -> int:
        if level == LIBBPF_DEBUG:
            return 0
        n = self.libc.vsnprintf(self._buf, 4096, fmt, args)
        text = self.ffi.string(self._buf).decode(errors="replace").rstrip()
        self.captured.append(text)
        log.debug("libbpf: %s", text)
        return max(n, 0)

    def take_messages(self) -> list[str]:
        out, self.captured = self.captured, []
        return out


_libbpf: _Libbpf | None = None


def _get_libbpf() -> _Libbpf:
    global _libbpf
    if _libbpf is None:
        _libbpf = _Libbpf()
    return _libbpf


def _short(messages: list[str], limit: int = 6) -> str:
    """The tail of libbpf's messages, enough to say why (a verifier log can run to pages)."""
    lines = [ln for m in messages for ln in m.splitlines() if ln.strip()]
    return " | ".join(lines[-limit:])


def _hook_in_btf(L: _Libbpf, btf, section: str) -> bool:
    """Does this kernel have the tracepoint or function a program's section names?
    tp_btf/NAME needs the typedef btf_trace_NAME; fentry/fexit/NAME needs the function NAME."""
    kind, _, name = section.partition("/")
    if kind == "tp_btf":
        return L.lib.btf__find_by_name_kind(btf, f"btf_trace_{name}".encode(), BTF_KIND_TYPEDEF) > 0
    if kind in ("fentry", "fexit", "fmod_ret"):
        return L.lib.btf__find_by_name_kind(btf, name.encode(), BTF_KIND_FUNC) > 0
    return True  # other program types: let the load decide


def _load_failure(section: str, err: int, messages: list[str]) -> str:
    """Why a program did not load, in words. libbpf answers any EPERM with a hint about
    `ulimit -l`; for fentry/fexit the usual cause is a kernel without BPF trampolines
    (measured: the 6.18 build hosts refuse every fentry/fexit program, and have no kprobes)."""
    if err == -errno.EPERM and section.split("/", 1)[0] in ("fentry", "fexit", "fmod_ret"):
        return "load failed: EPERM: this kernel refuses fentry/fexit (no BPF trampoline)"
    msgs = [m for m in messages if "ulimit -l" not in m]
    return f"load failed: {os.strerror(-err)}; {_short(msgs, 3)}"


def _failed_program(messages: list[str], names: dict[str, str]) -> str | None:
    """The section of the program libbpf says failed ("prog 'on_x': failed to load: -1")."""
    for m in messages:
        match = re.search(r"prog '([^']+)': (?:BPF program load failed|failed to load)", m)
        if match and match.group(1) in names:
            return names[match.group(1)]
    return None


class _Object:
    """A libbpf object opened with a chosen set of programs to load."""

    def __init__(self, L: _Libbpf, path: Path, load: set[str] | None) -> None:
        self.L = L
        self.ptr = L.lib.bpf_object__open_file(str(path).encode(), L.ffi.NULL)
        if self.ptr == L.ffi.NULL:
            err = L.ffi.errno
            raise BpfUnavailable(
                f"cannot open {path}: {os.strerror(err)}; {_short(L.take_messages())}"
            )
        self.programs = {}  # section name -> struct bpf_program *
        self.names = {}  # section name -> program (C function) name
        prog = L.lib.bpf_object__next_program(self.ptr, L.ffi.NULL)
        while prog != L.ffi.NULL:
            section = L.ffi.string(L.lib.bpf_program__section_name(prog)).decode()
            self.programs[section] = prog
            self.names[section] = L.ffi.string(L.lib.bpf_program__name(prog)).decode()
            if load is not None and section not in load:
                L.lib.bpf_program__set_autoload(prog, False)
            prog = L.lib.bpf_object__next_program(self.ptr, prog)

    def load(self) -> int:
        return self.L.lib.bpf_object__load(self.ptr)

    def close(self) -> None:
        if self.ptr is not None:
            self.L.lib.bpf_object__close(self.ptr)
            self.ptr = None


class MemWatch:
    """The loaded memwatch object: its attached hooks and its per-cgroup counters.

    with MemWatch.open() as mw:
        mw.attached()          # ["tp_btf/page_fault_user", ...]
        mw.missing             # {"tp_btf/...": "why"}  -- empty when nothing degraded
        mw.read()[Cgroup(p).id].page_faults

    One thread at a time: read() and get() share one lookup buffer.
    """

    def __init__(self, L: _Libbpf, obj: _Object, links: dict, missing: dict[str, str]):
        self._L = L
        self._obj = obj
        self._links = links  # section -> struct bpf_link *
        self.missing = missing  # section -> reason it is not attached
        self._fd = L.lib.bpf_object__find_map_fd_by_name(obj.ptr, COUNTERS_MAP.encode())
        if self._fd < 0:
            self.close()
            raise BpfUnavailable(f"object has no map {COUNTERS_MAP!r}")
        self._ncpu = L.lib.libbpf_num_possible_cpus()
        if self._ncpu <= 0:
            self.close()
            raise BpfUnavailable(f"libbpf cannot count possible CPUs ({self._ncpu})")
        self._values = L.ffi.new("uint64_t[]", self._ncpu * len(FIELDS))

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def open(
        cls, obj_path: str | os.PathLike | None = None, exclude: Iterable[str] = ()
    ) -> MemWatch:
        """Load and attach every hook this kernel has. `exclude` names hooks (sections) not
        to load at all. Raises BpfUnavailable if no hook can be attached."""
        path = Path(obj_path) if obj_path is not None else default_object()
        if not path.is_file():
            raise BpfUnavailable(
                f"no eBPF object at {path}: build it with `make -C ebpf` (`xxctl install` "
                "puts it in /usr/local/lib/xx)"
            )
        L = _get_libbpf()
        with L.lock:
            L.take_messages()
            return cls._open_locked(L, path, set(exclude))

    @classmethod
    def _open_locked(cls, L: _Libbpf, path: Path, exclude: set[str]) -> MemWatch:
        missing: dict[str, str] = {}
        probe = _Object(L, path, load=set())
        sections = list(probe.programs)
        probe.close()

        # 1. Hooks the running kernel does not have: decided from its BTF, before loading,
        #    because one unresolvable attach target fails the whole object's load.
        btf = L.lib.btf__load_vmlinux_btf()
        if btf == L.ffi.NULL:
            err = L.ffi.errno
            raise BpfUnavailable(
                f"no kernel BTF ({os.strerror(err)}): CO-RE needs CONFIG_DEBUG_INFO_BTF"
            )
        try:
            wanted = set()
            for s in sections:
                if s in exclude:
                    missing[s] = "excluded"
                elif not _hook_in_btf(L, btf, s):
                    missing[s] = "not in this kernel's BTF"
                else:
                    wanted.add(s)
        finally:
            L.lib.btf__free(btf)

        # 2. Load. When the verifier (or the kernel: no BPF trampoline, say) refuses a program,
        #    libbpf names it; drop it and load the rest. If the name cannot be found in
        #    libbpf's messages, load each program alone once to find the ones that pass.
        names = {n: s for s, n in probe.names.items()}
        searched = False
        while True:
            if not wanted:
                raise BpfUnavailable(f"no program of {path} loads: {missing}")
            obj = _Object(L, path, load=wanted)
            err = obj.load()
            msgs = L.take_messages()
            if not err:
                break
            obj.close()
            bad = _failed_program(msgs, names)
            if bad in wanted:
                missing[bad] = _load_failure(bad, err, msgs)
                wanted.discard(bad)
                continue
            if searched:
                raise BpfUnavailable(f"cannot load {path}: {os.strerror(-err)}; {_short(msgs)}")
            searched = True
            for s in sorted(wanted):
                one = _Object(L, path, load={s})
                e = one.load()
                one_msgs = L.take_messages()
                one.close()
                if e:
                    missing[s] = _load_failure(s, e, one_msgs)
            wanted -= set(missing)

        # 3. Attach.
        links = {}
        for s in sorted(wanted):
            link = L.lib.bpf_program__attach(obj.programs[s])
            if link == L.ffi.NULL:
                e = L.ffi.errno
                missing[s] = f"attach failed: {os.strerror(e)}; {_short(L.take_messages(), 2)}"
            else:
                links[s] = link
        if not links:
            obj.close()
            raise BpfUnavailable(f"no hook attached: {missing}")
        if missing:
            log.warning("eBPF degraded: not attached: %s", missing)
        L.take_messages()
        return cls(L, obj, links, missing)

    # -- state --------------------------------------------------------------------------------
    def attached(self) -> list[str]:
        """Hooks attached, as sections: "tp_btf/page_fault_user", "fexit/...", ..."""
        return sorted(self._links)

    def valid_counters(self) -> set[str]:
        """Counters fed by at least one attached hook (others stay 0 and mean nothing)."""
        return {c for s in self._links for c in HOOK_COUNTERS.get(s, ())}

    def degraded(self) -> str:
        """ "" when every hook is attached, else a one-line summary for xxctl."""
        if not self.missing:
            return ""
        return "ebpf-partial: " + ", ".join(f"{s} ({r})" for s, r in sorted(self.missing.items()))

    # -- reading ------------------------------------------------------------------------------
    def read(self) -> dict[int, CgroupCounters]:
        """cgroup id -> counters summed over CPUs. The id is Cgroup(path).id (the inode of the
        cgroup v2 directory); UNATTRIBUTED (0) holds events no cgroup could be found for."""
        L, ffi = self._L, self._L.ffi
        if self._obj is None:
            raise ValueError("MemWatch is closed")
        key = ffi.new("uint64_t *")
        nxt = ffi.new("uint64_t *")
        vals = self._values
        nf = len(FIELDS)
        out: dict[int, CgroupCounters] = {}
        prev = ffi.NULL
        # Bounded: a key evicted while we walk restarts the walk from the first key.
        for _ in range(4 * MAX_CGROUPS):
            if L.lib.bpf_map_get_next_key(self._fd, prev, nxt) != 0:
                break
            key[0] = nxt[0]
            prev = key
            if L.lib.bpf_map_lookup_elem(self._fd, key, vals) != 0:
                continue  # evicted between the two calls
            sums = [0] * nf
            for cpu in range(self._ncpu):
                base = cpu * nf
                for i in range(nf):
                    sums[i] += vals[base + i]
            out[int(key[0])] = CgroupCounters(*sums)
        return out

    def get(self, cgroup_id: int) -> CgroupCounters | None:
        """One cgroup's counters, or None if it has had no event."""
        L, ffi = self._L, self._L.ffi
        key = ffi.new("uint64_t *", cgroup_id)
        if L.lib.bpf_map_lookup_elem(self._fd, key, self._values) != 0:
            return None
        nf = len(FIELDS)
        sums = [0] * nf
        for cpu in range(self._ncpu):
            for i in range(nf):
                sums[i] += self._values[cpu * nf + i]
        return CgroupCounters(*sums)

    def forget(self, cgroup_id: int) -> None:
        """Drop a removed cgroup's entry (the map is an LRU, so this only saves room)."""
        key = self._L.ffi.new("uint64_t *", cgroup_id)
        self._L.lib.bpf_map_delete_elem(self._fd, key)

    # -- teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        """Detach every hook and free the object; the kernel drops programs and maps."""
        for link in self._links.values():
            self._L.lib.bpf_link__destroy(link)
        self._links = {}
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    def __enter__(self) -> MemWatch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def probe(obj_path: str | os.PathLike | None = None) -> tuple[bool, str]:
    """Load and attach memwatch for real, then detach. For `xxctl doctor`."""
    try:
        with MemWatch.open(obj_path) as mw:
            ok = f"memwatch attached {len(mw.attached())} hooks: {', '.join(mw.attached())}"
            if mw.missing:
                return True, f"{ok}; degraded: {mw.degraded()}"
            return True, ok
    except BpfUnavailable as e:
        return False, str(e)

"""xxctl install | uninstall — put XX's systemd units, configs, eBPF object and docs in place.

XX is one Python distribution with pinned dependencies (aiohttp, uvloop, psycopg, ...) that
Debian does not ship at those versions, so it installs as `pip install` into a venv (say
/opt/xx) and then `xxctl install` from that venv does the system part:

    /usr/local/bin/{xxnode,xxshard,xxgate,xxctl}   symlinks to the venv's commands
    /usr/local/lib/systemd/system/xx*.service      the units (systemd/ in the source tree)
    /usr/local/lib/xx/memwatch.bpf.o               the eBPF object the node loads
    /usr/local/lib/xx/xxjobs-hold                  the holder of the jobs' cgroup (xxjobs.service)
    /usr/local/share/doc/xx/*.md                   the docs the units' Documentation= name
    /etc/xx/{node,shard,gateway}.toml              commented configs: one machine out of the box
    /etc/xx/cluster.key                            a fresh cluster key (0600), kept if present

A config the operator edited is never overwritten (the new version goes beside it as
FILE.dist); /etc/xx and the daemons' state stay on uninstall unless --purge. What install
wrote is listed in /usr/local/lib/xx/installed.json, and uninstall removes exactly that.
--root DIR installs below DIR instead of / (images, tests); systemctl is only run for /.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

COMMANDS = ("xxnode", "xxshard", "xxgate", "xxctl")
UNITS = ("xxnode.service", "xxjobs.service", "xxshard.service", "xxgate.service")
# stopped in this order: the front door first, the job tree (and so every job) last
STOP_ORDER = ("xxgate.service", "xxshard.service", "xxnode.service", "xxjobs.service")
HOLDER = "xxjobs-hold"  # xxjobs.service's one process
CONFIGS = ("node.toml", "shard.toml", "gateway.toml")
BIN = "usr/local/bin"
UNIT_DIR = "usr/local/lib/systemd/system"
LIB = "usr/local/lib/xx"
DOC = "usr/local/share/doc/xx"
ETC = "etc/xx"
BPF_OBJECT = "memwatch.bpf.o"
MANIFEST = f"{LIB}/installed.json"
KEY = f"{ETC}/cluster.key"
# the environments' code mount point (LAMBDA_TASK_ROOT): an empty directory
TASK_ROOT = "var/task"
# the daemons' state (StateDirectory=); DynamicUser= keeps the real ones under private/
STATE = ("var/lib/xxnode", "var/lib/xxshard", "var/lib/xxgate",
         "var/lib/private/xxshard", "var/lib/private/xxgate")  # fmt: skip
REPO = Path(__file__).resolve().parents[2]


class _Refused(Exception):
    """One line on stderr, exit 1."""


def register(sub) -> None:
    p = sub.add_parser("install", help="install the systemd units, /etc/xx, eBPF object, docs")
    p.add_argument("--root", type=Path, default=Path("/"), help="install below DIR (default /)")
    p.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")
    p.set_defaults(func=lambda a: _guard(cmd_install, a), command="install")
    u = sub.add_parser("uninstall", help="stop and remove what `xxctl install` wrote")
    u.add_argument("--root", type=Path, default=Path("/"), help="the DIR installed below")
    u.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")
    u.add_argument(
        "--purge", action="store_true",
        help="also remove /etc/xx (configs, cluster key) and the daemons' state",
    )  # fmt: skip
    u.set_defaults(func=lambda a: _guard(cmd_uninstall, a), command="uninstall")


def _guard(func, args) -> int:
    try:
        return func(args)
    except _Refused as e:
        print(f"xxctl {args.command}: {e}", file=sys.stderr)
        return 1


# -- where the pieces come from ------------------------------------------------------------
@dataclass
class Sources:
    """A wheel carries them in xxnode/data/ (setup.py puts them there); a source checkout
    (an editable install) has them in systemd/, docs/ and ebpf/."""

    units: Path
    etc: Path
    docs: Path
    bpf: Path
    scripts: Path

    @classmethod
    def find(cls) -> Sources:
        data = Path(__file__).resolve().parents[1] / "data"
        if (data / "systemd").is_dir():
            base = cls(data / "systemd", data / "systemd" / "etc", data / "docs",
                       data / BPF_OBJECT, _scripts_dir())  # fmt: skip
        elif (REPO / "systemd").is_dir():
            base = cls(REPO / "systemd", REPO / "systemd" / "etc", REPO / "docs",
                       REPO / "ebpf" / BPF_OBJECT, _scripts_dir())  # fmt: skip
        else:
            raise _Refused(f"no units in {data} nor {REPO}: a broken installation of xxnode")
        for u in UNITS:
            if not (base.units / u).is_file():
                raise _Refused(f"{base.units / u}: missing")
        return base


def _scripts_dir() -> Path:
    """Where pip put this distribution's commands (the venv's bin/)."""
    for d in (Path(sysconfig.get_path("scripts")), Path(sys.argv[0]).absolute().parent):
        if all((d / c).is_file() for c in COMMANDS):
            return d
    raise _Refused(
        f"the commands {', '.join(COMMANDS)} are not in {sysconfig.get_path('scripts')}: "
        "run the xxctl that `pip install` made (e.g. /opt/xx/bin/xxctl install)"
    )


# -- the plan: every change, printed, then made --------------------------------------------
@dataclass
class Plan:
    root: Path
    dry: bool
    quiet: bool = False
    manifest: dict = field(default_factory=lambda: {"files": [], "links": [], "dirs": []})

    def at(self, rel: str) -> Path:
        return self.root / rel

    def say(self, verb: str, rel: str, more: str = "") -> None:
        if self.quiet:
            return
        print(f"{verb:<9} /{rel}{'  ' + more if more else ''}")

    def mkdir(self, rel: str, mode: int = 0o755) -> None:
        p = self.at(rel)
        if p.is_dir():
            return
        missing = [rel]
        parent = Path(rel).parent
        while str(parent) != "." and not self.at(str(parent)).exists():
            missing.append(str(parent))
            parent = parent.parent
        if not self.dry:
            p.mkdir(parents=True, mode=mode)
            os.chmod(p, mode)
        for d in missing:
            self.manifest["dirs"].append(d)

    def copy(self, src: Path, rel: str, mode: int = 0o644) -> None:
        dst = self.at(rel)
        same = (
            dst.is_file() and not dst.is_symlink() and dst.read_bytes() == src.read_bytes()
            and stat.S_IMODE(dst.stat().st_mode) == mode
        )  # fmt: skip
        self.say("unchanged" if same else "install", rel)
        if not self.dry and not same:
            tmp = dst.with_name(f".{dst.name}.tmp")
            shutil.copyfile(src, tmp)
            os.chmod(tmp, mode)
            os.replace(tmp, dst)
        self.manifest["files"].append(rel)

    def link(self, target: Path, rel: str) -> None:
        dst = self.at(rel)
        if dst.exists() and not dst.is_symlink():
            if dst.resolve() == target.resolve():
                self.say("in place", rel, "(pip installed it here)")
                return
            raise _Refused(f"/{rel} exists and is not a symlink: not replacing it")
        same = dst.is_symlink() and os.readlink(dst) == str(target)
        self.say("unchanged" if same else "link", rel, f"-> {target}")
        if not self.dry and not same:
            tmp = dst.with_name(f".{dst.name}.tmp")
            if tmp.is_symlink():
                tmp.unlink()
            tmp.symlink_to(target)
            os.replace(tmp, dst)
        self.manifest["links"].append(rel)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise _Refused(f"/{MANIFEST}: unreadable ({e})") from None


def cmd_install(args) -> int:
    root = args.root.absolute()
    if root == Path("/") and os.geteuid() != 0 and not args.dry_run:
        raise _Refused("needs root to install into / (or --root DIR, or --dry-run)")
    src = Sources.find()
    old = _read_manifest(root) or {}
    if not args.dry_run:
        # what this install will write, listed before any of it is: an install cut short
        # (^C, a full disk) leaves nothing that uninstall does not know of
        ahead = _install_pass(Plan(root, dry=True, quiet=True), src, old).manifest
        old = _union(old, {"dirs": ahead["dirs"]}) | {"configs": old.get("configs", {})}
        _write_manifest(root, _union(old, ahead), src)
    _check_scripts(src.scripts)
    plan = _install_pass(Plan(root, args.dry_run), src, old)
    if not args.dry_run:
        _write_manifest(root, plan.manifest | {"dirs": _union(old, plan.manifest)["dirs"]}, src)
    plan.say("manifest", MANIFEST)
    _check_configs(root, src.etc)
    _systemctl(root, args.dry_run, ["daemon-reload"])
    print("next: systemctl enable --now xxshard xxgate xxnode   (one machine; "
          "docs/operators.md for a fleet)")  # fmt: skip
    return 0


def _install_pass(plan: Plan, src: Sources, old: dict) -> Plan:
    for d in (BIN, UNIT_DIR, LIB, DOC):
        plan.mkdir(d)
    plan.mkdir(ETC, 0o755)
    plan.mkdir(TASK_ROOT)
    for c in COMMANDS:
        plan.link(src.scripts / c, f"{BIN}/{c}")
    for u in UNITS:
        plan.copy(src.units / u, f"{UNIT_DIR}/{u}")
    plan.copy(src.units / HOLDER, f"{LIB}/{HOLDER}", 0o755)
    if src.bpf.is_file():
        plan.copy(src.bpf, f"{LIB}/{BPF_OBJECT}")
    elif not plan.quiet:
        print(f"skipped   /{LIB}/{BPF_OBJECT}  (no {src.bpf}: `make -C ebpf` builds it; "
              "until then the node runs in mode no-ebpf)")  # fmt: skip
    for doc in sorted(src.docs.glob("*.md")):
        plan.copy(doc, f"{DOC}/{doc.name}")
    _install_key(plan)
    plan.manifest["configs"] = _install_configs(plan, src.etc, old.get("configs", {}))
    # what an earlier install wrote and this one no longer does (a renamed doc)
    for rel in sorted(set(old.get("files", [])) - set(plan.manifest["files"])):
        plan.say("remove", rel, "(no longer shipped)")
        if not plan.dry:
            _unlink(plan.root / rel)
    return plan


def _union(a: dict, b: dict) -> dict:
    out = dict(b)
    for k in ("files", "links", "dirs"):
        out[k] = sorted(set(a.get(k, [])) | set(b.get(k, [])))
    return out


def _write_manifest(root: Path, manifest: dict, src: Sources) -> None:
    from xxnode.cli import version

    doc = manifest | {"version": version(), "scripts": str(src.scripts)}
    (root / LIB).mkdir(parents=True, exist_ok=True)
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, root / MANIFEST)


# where xxshard's and xxgate's sandbox shows them something else than the host has
HIDDEN = (
    (Path("/tmp"), "under /tmp", "PrivateTmp=yes"),
    (Path("/var/tmp"), "under /var/tmp", "PrivateTmp=yes"),
    (Path("/home"), "in a home directory", "ProtectHome=yes"),
    (Path("/root"), "in a home directory", "ProtectHome=yes"),
    (Path("/run/user"), "in a home directory", "ProtectHome=yes"),
)


def _check_scripts(scripts: Path) -> None:
    """xxshard and xxgate run as a dynamic user in a sandbox: the venv must be where they
    see it, and readable by everyone, or they cannot even start. Warnings, not refusals:
    xxnode has no such sandbox, and a drop-in (BindReadOnlyPaths=) can show them the venv."""
    _check_visible(scripts)
    _check_readable(scripts)


def _check_visible(scripts: Path) -> None:
    real = scripts.resolve()
    for top, where, setting in HIDDEN:
        if real.is_relative_to(top):
            print(f"warning   the venv ({real}) is {where}, which xxshard and xxgate ({setting}) "
                  "cannot see, so they would fail to start: make the venv in /opt/xx and run "
                  "its xxctl install", file=sys.stderr)  # fmt: skip
            return


def _check_readable(scripts: Path) -> None:
    real = scripts.resolve()
    for d in (real, *real.parents):
        if d.stat().st_mode & 0o005 != 0o005:
            print(f"warning   {d} is not readable by every user: xxshard and xxgate "
                  "(DynamicUser=yes) cannot run the venv below it", file=sys.stderr)  # fmt: skip
            break


def _install_key(plan: Plan) -> None:
    key = plan.at(KEY)
    if key.exists():
        plan.say("kept", KEY)
        return
    plan.say("generate", KEY, "(0600: copy this same file to every host of the cluster)")
    if not plan.dry:
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode() + b"\n")
        finally:
            os.close(fd)


def _install_configs(plan: Plan, etc: Path, written: dict) -> dict:
    """Each config: written when absent, replaced when it is still exactly what an earlier
    install wrote, and otherwise kept (the operator's) with the new version as FILE.dist."""
    out = {}
    for name in CONFIGS:
        rel = f"{ETC}/{name}"
        new = (etc / name).read_bytes()
        dst = plan.at(rel)
        if not dst.exists():
            plan.say("install", rel)
        else:
            cur = dst.read_bytes()
            if cur == new:
                plan.say("unchanged", rel)
                out[name] = _sha(new)
                continue
            if _sha(cur) != written.get(name):
                plan.say("kept", rel, f"(edited; this version's is {name}.dist)")
                if not plan.dry:
                    (dst.with_name(name + ".dist")).write_bytes(new)
                out[name] = written.get(name, "")
                continue
            plan.say("update", rel, "(unedited since the last install)")
        if not plan.dry:
            tmp = dst.with_name(f".{name}.tmp")
            tmp.write_bytes(new)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dst)
        out[name] = _sha(new)
    return out


def _check_configs(root: Path, etc: Path) -> None:
    """The configs in place must load, as the daemons will load them (paths they name under
    /etc/xx are read below --root)."""
    from xxnode.config import gateway, node, shard
    from xxnode.schema import ConfigError

    for name, parse in (("node.toml", node.parse), ("shard.toml", shard.parse),
                        ("gateway.toml", gateway.parse)):  # fmt: skip
        path = root / ETC / name
        if not path.exists():
            path = etc / name  # --dry-run of a first install
        try:
            data = tomllib.loads(path.read_text())
            cluster = data.get("cluster")
            if isinstance(cluster, dict) and str(cluster.get("key_file", "")).startswith("/"):
                key = root / str(cluster["key_file"]).lstrip("/")
                if not key.exists():
                    continue  # --dry-run of a first install: no key yet
                cluster["key_file"] = str(key)
            parse(data, str(path))
        except (ConfigError, tomllib.TOMLDecodeError, OSError) as e:
            print(f"warning   /{ETC}/{name}: {e}", file=sys.stderr)


def _systemctl(root: Path, dry: bool, argv: list[str], quiet_fail: bool = False) -> bool:
    if root != Path("/"):
        return False
    if not os.path.isdir("/run/systemd/system"):
        if argv == ["daemon-reload"]:
            print("systemd is not running here: no daemon-reload (units are read at boot)")
        return False
    print(f"run       systemctl {' '.join(argv)}")
    if dry:
        return True
    r = subprocess.run(["systemctl", *argv], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True)  # fmt: skip
    if r.returncode != 0 and not quiet_fail:
        print(f"warning   systemctl {' '.join(argv)}: {r.stderr.strip()}", file=sys.stderr)
    return r.returncode == 0


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


def cmd_uninstall(args) -> int:
    root = args.root.absolute()
    if root == Path("/") and os.geteuid() != 0 and not args.dry_run:
        raise _Refused("needs root to uninstall from / (or --root DIR, or --dry-run)")
    m = _read_manifest(root)
    if m is None and not args.purge:
        raise _Refused(f"nothing installed at {root} (no /{MANIFEST}); --purge removes "
                       "/etc/xx and the state anyway")  # fmt: skip
    m = m or {"files": [], "links": [], "dirs": []}
    plan = Plan(root, args.dry_run)
    # stop first: the daemons, then the job tree, which xxnode leaves running by design
    # (jobs outlive a daemon stop), so no orphaned job survives the uninstall
    daemons = [u for u in UNITS if u != "xxjobs.service"]  # it has no [Install]: pulled in
    for argv in (["disable", *daemons], ["stop", *STOP_ORDER], ["reset-failed", *UNITS]):
        _systemctl(root, args.dry_run, argv, quiet_fail=True)
    for rel in m.get("links", []):
        p = root / rel
        if p.is_symlink():
            plan.say("remove", rel)
            if not args.dry_run:
                p.unlink()
    for rel in m.get("files", []):
        if (root / rel).exists():
            plan.say("remove", rel)
            if not args.dry_run:
                _unlink(root / rel)
    if (root / MANIFEST).exists():
        plan.say("remove", MANIFEST)
        if not args.dry_run:
            _unlink(root / MANIFEST)
    if args.purge:
        for rel in (ETC, *STATE):
            p = root / rel
            if p.is_symlink():
                plan.say("remove", rel)
                if not args.dry_run:
                    p.unlink()
            elif p.exists():
                plan.say("remove", rel + "/", "(--purge)")
                if not args.dry_run:
                    shutil.rmtree(p)
    elif (root / ETC).exists():
        plan.say("kept", ETC + "/", "(configs and the cluster key; --purge removes them)")
    # the directories install made, deepest first, if nothing else lives there now
    for rel in sorted(m.get("dirs", []), key=lambda d: -d.count("/")):
        p = root / rel
        if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
            if not args.dry_run:
                p.rmdir()
    _systemctl(root, args.dry_run, ["daemon-reload"])
    return 0

"""xxctl status | classes | jobs | run | kill — talk to the local xxnode over its socket.

--socket PATH (or $XX_NODE_SOCKET) picks the daemon; --json gives scripts one JSON document.
`run` waits for the job and exits with its status (124 timeout, 127 did not start, 128+N
killed by signal N), printing the job's stdout/stderr as its own; --detach returns at once.
"""

from __future__ import annotations

import base64
import grp
import json
import os
import sys
import time
from datetime import datetime

from xxnode import outcome
from xxnode.node.client import Client, DaemonError, socket_path

RECONNECT_S = 60.0


def register(sub) -> None:
    def add(name: str, help: str, func) -> object:
        p = sub.add_parser(name, help=help)
        p.add_argument(
            "--socket", help="control socket (default: $XX_NODE_SOCKET or /run/xxnode.sock)"
        )
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=lambda args: _guard(func, args))
        return p

    add("status", "the node daemon's state, capabilities and load", cmd_status)
    add("classes", "the price classes and the scheduling each gets", cmd_classes)
    add("memory", "memory, swap, zswap and pressure per class and job; reclaims", cmd_memory)
    p = add("jobs", "running, queued and recently finished jobs", cmd_jobs)
    p.add_argument("--class", dest="cls", metavar="C", help="only this class")
    p.add_argument(
        "--limit", type=_positive_int, default=50, help="finished jobs shown, >= 1 (default 50)"
    )
    p = add("run", "run a command as a job of a price class", cmd_run)
    p.add_argument("--class", dest="cls", metavar="C", required=True, help="price class")
    p.add_argument("--detach", action="store_true", help="print the job id and return")
    p.add_argument("--timeout", type=float, metavar="S", help="wall-clock limit in seconds")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment")
    p.add_argument("--cwd", metavar="DIR", help="working directory (absolute)")
    p.add_argument("--stdin", metavar="FILE", help="stdin payload from FILE ('-': ours)")
    p.add_argument("cmd", nargs="+", metavar="CMD", help="-- CMD [ARGS...]")
    p = add("kill", "kill a running job (its whole cgroup) or cancel a queued one", cmd_kill)
    p.add_argument("job", metavar="JOB")


def _positive_int(text: str) -> int:
    """argparse type for --limit: a count of at least 1 (argparse makes the error exit 2)."""
    import argparse

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _check_class(name: str, classes: list[dict]) -> None:
    """Refuse a class the daemon does not have, listing those it has (its `classes` reply)."""
    known = [cl["name"] for cl in classes]
    if name not in known:
        raise _Refused(f"unknown class {name!r} (known: {', '.join(known) or 'none'})")


class _Refused(Exception):
    """A mistake of ours or a refusal by the daemon: one line on stderr, exit 2."""


def _denied(args) -> str:
    """Why connecting to the socket was refused, naming the socket and the group to join."""
    path = socket_path(args.socket)
    group = ""
    try:
        gid = os.stat(path).st_gid
        try:
            group = f" (group {grp.getgrgid(gid).gr_name})"
        except KeyError:
            group = f" (gid {gid})"
    except OSError:
        pass
    return (
        f"permission denied connecting to the xxnode socket {path}: needs root or "
        f"membership in the socket's group{group}"
    )


def _guard(func, args) -> int:
    try:
        return func(args)
    except (DaemonError, _Refused) as e:
        print(f"xxctl {args.command}: {e}", file=sys.stderr)
        return 2
    except PermissionError:
        print(f"xxctl {args.command}: {_denied(args)}", file=sys.stderr)
        return 1


def _emit_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _ago(t: float) -> str:
    s = int(time.time() - t)
    parts = []
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            parts.append(f"{s // n}{unit}")
            s %= n
    parts.append(f"{s}s")
    return " ".join(parts[:2])


def _when(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%a %Y-%m-%d %H:%M:%S")


def cmd_status(args) -> int:
    with Client(args.socket) as c:
        st = c.call({"op": "status"})["status"]
        classes = c.call({"op": "classes"})["classes"]
    if args.json:
        st["classes"] = classes
        _emit_json(st)
        return 0
    dot = "●"
    n_run, n_q = sum(st["running"].values()), sum(st["queued"].values())
    rows = [
        (
            "Active",
            f"active (running) since {_when(st['started_at'])}; {_ago(st['started_at'])} ago",
        ),
        ("Main PID", f"{st['pid']} (xxnode) {st['daemon_sched']}"),
        ("Config", st["config"]),
        ("CGroup", st["cgroup_root"]),
        ("State", f"{st['state_dir']} (jobs run as {st['user']})"),
        (
            "Controllers",
            f"enabled: {' '.join(st['controllers_enabled']) or 'none'}; "
            f"missing (not delegated to {st['cgroup_root']}): "
            f"{' '.join(st['controllers_missing']) or 'none'}",
        ),
    ]
    for name, why in st["controllers_withheld"].items():
        rows.append(("Withheld", f"{name}: {why}"))
    rg = st["rt_group_sched"]
    rows.append(
        (
            "RT groups",
            ("on: " if rg["active"] else "off: ")
            + rg["detail"]
            + ("; xxnode never enables the cpu controller here" if rg["active"] else ""),
        )
    )
    thr = st["rt_throttling"]
    if thr:
        rt, period = thr
        share = (
            "off: SCHED_OTHER can starve"
            if rt < 0
            else f"SCHED_OTHER keeps {100 - 100 * rt / period:.0f}%"
        )
        rows.append(("RT throttle", f"{rt}/{period} µs ({share}; xxnode never changes it)"))
    rows.append(
        (
            "Jobs",
            f"{n_run} running, {n_q} queued, {st['finished_total']} finished "
            f"(at most {st['max_running']} running per class-and-above)",
        )
    )
    width = max(len(k) for k, _ in rows)
    print(f"{dot} xxnode - XX node daemon")
    for k, v in rows:
        print(f"{k:>{width}}: {v}")
    for cl in classes:
        name = cl["name"]
        print(
            f"{'':>{width}}  {name:<10} {cl['sched']:<14} running {st['running'].get(name, 0):<3} "
            f"queued {st['queued'].get(name, 0)}"
        )
    for d in st["degraded"]:
        print(f"{'Degraded':>{width}}: {d}")
    return 0


def _mib(n: float | int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.0f}M"


def cmd_memory(args) -> int:
    with Client(args.socket) as c:
        m = c.call({"op": "memory"})["memory"]
    if args.json:
        _emit_json(m)
        return 0
    print(
        f"● memory: {_mib(m['free'])} available of {_mib(m['total'])}; PSI some avg10 "
        f"{m['psi_some_avg10']:.2f} full {m['psi_full_avg10']:.2f}; "
        f"{'managed' if m['managed'] else 'watching only (no memory controller)'}; "
        f"trigger {m['trigger']}; eBPF {m['ebpf'] or 'none'}"
    )
    print(f"\n{'CLASS':<10} {'JOBS':>4} {'MEMORY':>8} {'SWAP':>8} {'ZSWAP':>8} "
          f"{'RECLAIMED':>10} {'PSI10':>6} {'OOM_ADJ':>7} {'CEILING':>8}")  # fmt: skip
    for name, pc in m["classes"].items():
        print(
            f"{name:<10} {pc['jobs']:>4} {_mib(pc['memory']):>8} {_mib(pc['swap']):>8} "
            f"{_mib(pc['zswapped']):>8} {_mib(pc['reclaimed_total']):>10} "
            f"{pc.get('psi_some_avg10', 0.0):>6.2f} {pc['oom_score_adj']:>7} "
            f"{_mib(pc.get('ceiling')):>8}"  # memory.high we set; '-' is max
        )
    if idle := m.get("idle_environments"):  # below every class: reclaimed first
        print(
            f"{'(idle)':<10} {idle['jobs']:>4} {_mib(idle['memory']):>8} {_mib(idle['swap']):>8} "
            f"{_mib(idle['zswapped']):>8} {_mib(idle['reclaimed_total']):>10} {'-':>6} {'-':>7}"
        )
    if m["jobs"]:
        print(f"\n{'JOB':<10} {'CLASS':<10} {'MEMORY':>8} {'SWAP':>8} {'ANON':>8} "
              f"{'FAULTS':>8} RUNNING")  # fmt: skip
        for j in m["jobs"]:
            faults = j.get("ebpf", {}).get("page_faults", "-")
            print(
                f"{j['job_id']:<10} {j['cls']:<10} {_mib(j['current']):>8} {_mib(j['swap']):>8} "
                f"{_mib(j['anon']):>8} {faults!s:>8} {'yes' if j['running'] else 'no'}"
            )
    if m["reclaims"]:
        print("\nRECENT RECLAIMS")
        for e in m["reclaims"]:
            print(
                f"  {_when(e['at'])} {e['job']} ({e['cls']}) {_mib(e['reclaimed'])} "
                f"in {e['ms']:.0f} ms, cause {e['cause']}"
            )
    return 0


def cmd_classes(args) -> int:
    with Client(args.socket) as c:
        classes = c.call({"op": "classes"})["classes"]
    if args.json:
        _emit_json(classes)
        return 0
    print(f"{'CLASS':<10} {'PRICE µ¢/cpu-s':>14}  {'SCHEDULING':<14} DESCRIPTION")
    for cl in classes:
        print(f"{cl['name']:<10} {cl['price']:>14g}  {cl['sched']:<14} {cl['description']}")
    return 0


def cmd_jobs(args) -> int:
    req = {"op": "jobs", "limit": args.limit}
    with Client(args.socket) as c:
        if args.cls:
            _check_class(args.cls, c.call({"op": "classes"})["classes"])
            req["class"] = args.cls
        rows = c.call(req)["jobs"]
    if args.json:
        _emit_json(rows)
        return 0
    if not rows:
        print("no jobs")
        return 0
    print(f"{'JOB':<9} {'CLASS':<8} {'STATE':<12} {'PID':>7} {'WALL ms':>9} {'CPU ms':>8}  COMMAND")
    for r in rows:
        wall = f"{r['wall_ms']:.1f}" if r.get("wall_ms") is not None else "-"
        cpu = f"{r['cpu_ms']:.1f}" if r.get("cpu_ms") is not None else "-"
        state = r["state"]
        cmd = " ".join(r["argv"])
        print(
            f"{r['job']:<9} {r['class']:<8} {state:<12} {r['pid'] or '-':>7} {wall:>9} {cpu:>8}  {cmd[:60]}"
        )
    return 0


def cmd_run(args) -> int:
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not cmd:
        raise _Refused("no command given (xxctl run --class C -- CMD [ARGS...])")
    env = {}
    for kv in args.env:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise _Refused(f"--env {kv!r}: expected K=V")
        env[k] = v
    req = {"op": "run", "class": args.cls, "argv": cmd, "env": env, "wait": not args.detach}
    if args.cwd:
        req["cwd"] = args.cwd
    if args.timeout is not None:
        req["timeout"] = args.timeout
    if args.stdin:
        try:
            data = sys.stdin.buffer.read() if args.stdin == "-" else open(args.stdin, "rb").read()
        except OSError as e:
            raise _Refused(f"--stdin {args.stdin}: {e.strerror}") from None
        req["stdin"] = base64.b64encode(data).decode()
    c = Client(args.socket, timeout=None)
    jid = None
    try:
        accepted = c.call(req)
        jid = accepted["job"]
        if not args.detach:  # like systemd-run's "Running as unit": the job is durable now
            print(
                f"xxctl: job {jid} accepted ({accepted['class']}, {accepted['state']})",
                file=sys.stderr,
                flush=True,
            )
        if args.detach:
            if args.json:
                _emit_json({k: accepted[k] for k in ("job", "class", "state", "pid")})
            else:
                print(jid)
            return 0
        try:
            fin = c.recv()
        except (ConnectionError, OSError):
            fin = _rewait(args.socket, jid)
    except KeyboardInterrupt:
        if jid is not None:
            print(f"\n{_interrupted_note(jid)}", file=sys.stderr)
        raise
    finally:
        c.close()
    if not fin.get("ok"):
        raise DaemonError(fin.get("error", "wait failed"))
    res = fin["result"]
    if args.json:
        out = dict(res)
        out["stdout"], out["stderr"] = fin.get("stdout", ""), fin.get("stderr", "")
        _emit_json(out)
    else:
        sys.stdout.write(fin.get("stdout", ""))
        sys.stdout.flush()
        sys.stderr.write(fin.get("stderr", ""))
        mark = "●" if res["state"] == "succeeded" else "×"
        print(
            f"{mark} {res['job']} ({res['class']}) {outcome.words(res)}: pid {res['pid']}, "
            f"queued {res['queued_ms']:.1f} ms, wall {res['wall_ms']:.1f} ms, cpu {res['cpu_ms']:.1f} ms",
            file=sys.stderr,
        )
        if lost := outcome.dropped(res):
            print(f"  output cut at the node's output_limit: {lost}", file=sys.stderr)
    return outcome.exit_status(res)


def _interrupted_note(jid: str) -> str:
    return (
        f"xxctl: interrupted; job {jid} is still running (see `xxctl jobs`; "
        f"stop it with `xxctl kill {jid}`)"
    )


def _rewait(sock, jid: str) -> dict:
    """The daemon went away while we waited (restart, crash): the job is journaled and will
    be re-adopted, so reconnect and ask again."""
    print(f"xxctl: lost the daemon while waiting for {jid}; reconnecting", file=sys.stderr)
    deadline = time.monotonic() + RECONNECT_S
    while True:
        try:
            with Client(sock, timeout=None) as c:
                c.send({"op": "wait", "job": jid})
                return c.recv()
        except (ConnectionError, FileNotFoundError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # no event to wait on for a daemon that is not there yet


def cmd_kill(args) -> int:
    with Client(args.socket) as c:
        r = c.call({"op": "kill", "job": args.job})
    if args.json:
        _emit_json(r)
    else:
        print(f"{r['job']}: {r['state']}")
    return 0

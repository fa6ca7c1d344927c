"""xxctl submit | job | cancel | shards | idle | nodes -- talk to XX shards over the cluster protocol.

--shard HOST:PORT[,HOST:PORT...] (or $XX_SHARDS) lists the shards, tried in order: a
submission fails over to the next one.  --key-file (or $XX_CLUSTER_KEY_FILE, else
/etc/xx/cluster.key) is the cluster key.  `submit --wait` stays as the job's arbiter
until it is done and exits with its status (see xxnode.cluster.client); without
--wait it prints the job id once a shard has accepted the job.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from xxnode import outcome, wire
from xxnode.cluster.client import ClusterClient, SubmitError, key_from_env

DEFAULT_KEY = "/etc/xx/cluster.key"


class _Usage(Exception):
    """A usage mistake: one line on stderr, exit 2."""


def register(sub) -> None:
    def add(name: str, help: str, func):
        p = sub.add_parser(name, help=help)
        p.add_argument("--shard", metavar="HOST:PORT[,...]", help="shards (default: $XX_SHARDS)")
        p.add_argument(
            "--key-file",
            metavar="FILE",
            help=f"cluster key file (default: $XX_CLUSTER_KEY_FILE or {DEFAULT_KEY})",
        )
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=lambda args: _guard(func, args))
        return p

    p = add("submit", "submit a command to the cluster in a price class", cmd_submit)
    p.add_argument("--class", dest="cls", metavar="C", required=True, help="price class")
    p.add_argument("--wait", action="store_true", help="wait for the job and exit with its status")
    p.add_argument(
        "--wait-timeout", type=float, metavar="S",
        help="with --wait: give up after S seconds (exit 124); a job not started by then never starts",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, metavar="S", help="job wall-clock limit")
    p.add_argument("--stdin", metavar="FILE", help="job input from FILE ('-': ours), <= 6 MB")
    p.add_argument("cmd", nargs="+", metavar="CMD", help="-- CMD [ARGS...]")
    p = add("job", "a cluster job by id: where it is, how it ended, its output's tail", cmd_job)
    p.add_argument("id", metavar="ID", help="the job id `submit` printed (32 hex digits)")
    p = add("cancel", "cancel a cluster job by id (queued: dropped; running: killed)", cmd_cancel)
    p.add_argument("id", metavar="ID", help="the job id `submit` printed (32 hex digits)")
    add("shards", "each shard's queues, idle-list length, nodes and drop counters", cmd_shards)
    add("idle", "each shard's idle list", cmd_idle)
    add("nodes", "the nodes each shard hears from", cmd_nodes)


def _guard(func, args) -> int:
    try:
        return asyncio.run(func(args))
    except (_Usage, SubmitError, ValueError, OSError) as e:
        print(f"xxctl {args.command}: {e}", file=sys.stderr)
        return 2


def _client(args) -> ClusterClient:
    text = args.shard or os.environ.get("XX_SHARDS")
    if not text:
        raise _Usage("no shards: give --shard HOST:PORT[,...] or set $XX_SHARDS")
    shards = [wire.parse_addr(s.strip()) for s in text.split(",") if s.strip()]
    path = args.key_file or os.environ.get("XX_CLUSTER_KEY_FILE") or DEFAULT_KEY
    try:
        key = key_from_env(path)
    except FileNotFoundError:
        raise _Usage(
            f"no cluster key at {path}; pass --key-file FILE or set $XX_CLUSTER_KEY_FILE"
        ) from None
    except PermissionError:
        raise _Usage(f"cannot read the cluster key {path}: needs root or its group") from None
    return ClusterClient(shards, key)


async def cmd_submit(args) -> int:
    payload = b""
    if args.stdin:
        payload = sys.stdin.buffer.read() if args.stdin == "-" else open(args.stdin, "rb").read()
    spec: dict = {"argv": args.cmd}
    if args.timeout is not None:
        spec["timeout"] = args.timeout
    if args.wait_timeout is not None and (not args.wait or args.wait_timeout <= 0):
        raise _Usage("--wait-timeout needs --wait and a number of seconds > 0")
    async with _client(args) as c:
        jid = await c.submit(args.cls, spec, payload, wait=args.wait)
        if not args.wait:
            print(json.dumps({"job": jid.hex()}) if args.json else jid.hex())
            return 0
        res = await _await_saying_why(c, jid, args.wait_timeout)
        if res is None:
            return 124
    if args.json:
        print(json.dumps({"job": jid.hex(), **res}, indent=2))
    else:
        sys.stdout.write(res.get("stdout", ""))
        sys.stdout.flush()
        sys.stderr.write(res.get("stderr", ""))
        if outcome.exit_status(res) != 0 or res.get("error"):
            print(f"xxctl submit: {jid.hex()} {outcome.words(res)}", file=sys.stderr)
        if lost := outcome.dropped(res):
            print(f"xxctl submit: {jid.hex()} output cut: {lost}", file=sys.stderr)
    return outcome.exit_status(res)


NOTICE_S = 2.0  # a job not started by then: say what it waits for, and again on change


async def _await_saying_why(c: ClusterClient, jid: bytes, timeout: float | None) -> dict | None:
    """The job's result; meanwhile, on stderr, why it has not started (no node joined, all
    busy, ...) whenever that changes. None when ``timeout`` passed first (said why)."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    said = ""
    while True:
        left = None if deadline is None else deadline - loop.time()
        if left is not None and left <= 0:
            why = await _why_waiting(c, jid)
            print(f"xxctl submit: gave up after {timeout:g} s: {why}", file=sys.stderr)
            p = c.pending.get(jid)
            if p is not None and p.granted is None:
                print(
                    f"xxctl submit: job {jid.hex()} will not start now: this client was its arbiter",
                    file=sys.stderr,
                )  # fmt: skip
            return None
        try:
            return await c.result(jid, NOTICE_S if left is None else min(NOTICE_S, left))
        except TimeoutError:
            pass
        why = await _why_waiting(c, jid)
        if why != said:
            print(f"xxctl submit: waiting: {why}", file=sys.stderr)
            said = why


async def _why_waiting(c: ClusterClient, jid: bytes) -> str:
    """What the job waits for, in the words of the shard holding it."""
    p = c.pending.get(jid)
    if p is None:
        return f"job {jid.hex()} is finished"
    if p.granted is not None:
        return f"job {jid.hex()} is running on {p.granted}"
    addr = c.shards[p.shard]
    try:
        row = await c.status_of(addr, "shard", 2.0)
    except TimeoutError:
        return f"job {jid.hex()} is queued at {wire.fmt_addr(addr)}, which does not answer"
    where = f"job {jid.hex()} is queued at {wire.fmt_addr(addr)} in class {p.cls}"
    if "error" in row:
        return f"{where} ({row['error']})"
    if not row.get("nodes"):
        return (
            f"{where}, but no node has joined that shard, so nothing can take it "
            "(a node joins with [cluster] shards = [...] in its config)"
        )
    queued = sum(row.get("queued", {}).values())
    return (
        f"{where}, {queued} job(s) queued there; {row['nodes']} node(s) joined, "
        f"{row.get('idle', 0)} idle (the shard places when a node has room)"
    )


def _job_id(text: str) -> bytes:
    try:
        jid = bytes.fromhex(text)
    except ValueError:
        jid = b""
    if len(jid) != 16:
        raise _Usage(f"{text!r} is not a job id (32 hex digits, as `submit` prints)")
    return jid


async def cmd_job(args) -> int:
    jid = _job_id(args.id)
    async with _client(args) as c:
        info = await c.job(jid)
    if args.json:
        print(json.dumps({"job": jid.hex(), **info}, indent=2))
        return 0 if info.get("state") != "unknown" else 1
    if info.get("state") == "unknown":
        print(f"job {jid.hex()}: unknown to every shard ({info.get('reason', 'not held')})")
        return 1
    node = info.get("on_node") or {}
    where = f" on {info['node']}" if info.get("node") else ""
    print(f"job {jid.hex()}: {info['state']}{where} (shard {info.get('shard', '?')})")
    if "class" in info:
        print(f"  class {info['class']}, waited {info.get('waited_s', 0):.1f} s at the shard")
    if "local" in node:
        print(
            f"  node job {node['local']}"
            + (f": {node['local_state']}" if "local_state" in node else "")
        )
    if "error" in node:
        print(f"  node: {node['error']}")
    res = node.get("result")
    if res is not None:
        used = ""
        if "cpu_ms" in res:
            used = f"; cpu {res['cpu_ms']:.1f} ms, wall {res.get('wall_ms', 0):.1f} ms"
        print(f"  ended: {outcome.words(res)}{used}")
    elif "status" in info:
        print(f"  ended: {outcome.words({'status': info['status']})}")
    for stream in ("stdout", "stderr"):
        if node.get(stream):
            cut = node.get(f"{stream}_cut", 0)
            print(f"  {stream}" + (f" (last 2 KiB; {cut} bytes before)" if cut else "") + ":")
            for line in node[stream].splitlines():
                print(f"    {line}")
    return 0


async def cmd_cancel(args) -> int:
    jid = _job_id(args.id)
    async with _client(args) as c:
        r = await c.cancel(jid, f"xxctl cancel by uid {os.getuid()}")
    if args.json:
        print(json.dumps({"job": jid.hex(), **r}, indent=2))
    elif r.get("ok"):
        what = r.get("state") or f"killed on {r.get('node', '?')} (job {r.get('local', '?')})"
        print(f"job {jid.hex()}: {what}")
    else:
        print(f"xxctl cancel: job {jid.hex()}: {r.get('reason') or 'refused'}", file=sys.stderr)
    return 0 if r.get("ok") else 1


async def _status(args, what: str) -> list[dict]:
    async with _client(args) as c:
        return await c.status(what)


async def cmd_shards(args) -> int:
    rows = await _status(args, "shard")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'SHARD':22} {'QUEUED':>24} {'IDLE':>5} {'NODES':>5} {'PLACED':>7} {'DONE':>7} DROPPED")
    for r in rows:
        if "error" in r:
            print(f"{r['addr']:22} {r['error']}")
            continue
        q = " ".join(f"{k}={v}" for k, v in r["queued"].items())
        dropped = sum(r["dropped"].values())
        print(
            f"{r['addr']:22} {q:>24} {r['idle']:>5} {r['nodes']:>5} "
            f"{r['counts']['placed']:>7} {r['counts']['done']:>7} {dropped}"
        )
    return 0 if all("error" not in r for r in rows) else 1


def _head(row: dict, key: str, empty: str) -> str:
    """A shard's heading line: its error, or how many entries follow, or that none do."""
    if "error" in row:
        return f"{row['addr']}: {row['error']}"
    n = len(row.get(key, []))
    return f"{row['addr']}: {n} listed" if n else f"{row['addr']}: {empty}"


async def cmd_idle(args) -> int:
    rows = await _status(args, "idle")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(_head(r, "idle", "no idle nodes listed"))
        for e in r.get("idle", []):
            print(f"  {e['node']:24} free {e['free'] >> 20:>8} MiB  jobs {e['jobs']}")
    return 0 if all("error" not in r for r in rows) else 1


async def cmd_nodes(args) -> int:
    rows = await _status(args, "nodes")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(_head(r, "nodes", "no nodes listed"))
        for n in r.get("nodes", []):
            print(
                f"  {n['node']:24} {n['addr']:22} seen {n['age']:.2f}s ago  "
                f"free {n['free'] >> 20} MiB  jobs {n['jobs']}  {'idle' if n['idle'] else ''}"
            )
    return 0 if all("error" not in r for r in rows) else 1

"""xxctl fn run | envs | logs — functions on the local node.

`fn run` runs one invocation in a warm environment of the same code and configuration (a new
one the first time) and prints the handler's response; the REPORT line goes to stderr. Exit
0 on a response, 1 on a function error (its errorType and errorMessage on stderr), 2 when it
could not be run. With --cluster it goes through the shards instead (--shard / $XX_SHARDS,
--key-file as `xxctl submit`): a shard places it on a node of the class's choosing, which
finds the code at the same path.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from pathlib import Path

from xxnode.cluster.client import SubmitError
from xxnode.ctl.cluster_cmds import _client, _Usage
from xxnode.ctl.node_cmds import _emit_json, _guard, _mib, _Refused
from xxnode.node.client import Client

RUNTIME_HELP = "python3.x (awslambdaric, HANDLER = module.function), provided (bootstrap)"


def register(sub) -> None:
    fn = sub.add_parser("fn", help="functions on the local node: run, envs, logs")
    fsub = fn.add_subparsers(dest="fn_command", metavar="COMMAND", required=True)

    def add(name: str, help: str, func):
        p = fsub.add_parser(name, help=help)
        p.add_argument(
            "--socket", help="control socket (default: $XX_NODE_SOCKET or /run/xxnode.sock)"
        )
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=lambda args: _guard(func, args), command=f"fn {name}")
        return p

    p = add("run", "run one invocation of a function on this node", cmd_run)
    p.add_argument("--code", required=True, metavar="DIR|ZIP", help="the function's code")
    p.add_argument("--runtime", required=True, help=RUNTIME_HELP)
    p.add_argument("--handler", required=True, metavar="H", help="module.function for python")
    p.add_argument("--class", dest="cls", required=True, metavar="C", help="price class")
    p.add_argument("--payload", default="{}", metavar="JSON|@FILE", help="the event (default {})")
    p.add_argument(
        "--timeout", type=float, default=3.0, metavar="S", help="seconds (default 3, as Lambda)"
    )
    p.add_argument("--name", help="function name (default: the code's file or directory name)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable")
    p.add_argument(
        "--cluster", action="store_true", help="through the shards: a node they choose runs it"
    )
    p.add_argument(
        "--shard", metavar="HOST:PORT[,...]", help="with --cluster (default: $XX_SHARDS)"
    )
    p.add_argument("--key-file", metavar="FILE", help="with --cluster: the cluster key file")
    p = fsub.add_parser("create", help="create a function through a gateway, in a price class")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--code", required=True, metavar="DIR|ZIP", help="the function's code")
    p.add_argument("--runtime", required=True, help=RUNTIME_HELP + ", http")
    p.add_argument("--handler", default="", metavar="H", help="module.function for python")
    p.add_argument("--class", dest="cls", metavar="C", help="price class (tag xx:class); "
                   "default: the tenant's")  # fmt: skip
    p.add_argument("--timeout", type=int, default=3, metavar="S")
    p.add_argument("--env", action="append", default=[], metavar="K=V")
    p.add_argument("--endpoint-url", metavar="URL",
                   help="the gateway (default: $AWS_ENDPOINT_URL_LAMBDA, $AWS_ENDPOINT_URL)")  # fmt: skip
    p.add_argument("--region", default=None, help="default: $AWS_REGION, else us-east-1")
    p.add_argument("--json", action="store_true", help="print the function's configuration")
    p.set_defaults(func=lambda args: _guard(cmd_create, args), command="fn create")
    add("envs", "the execution environments on this node", cmd_envs)
    p = add("logs", "an invocation's log, or a function's latest invocations", cmd_logs)
    p.add_argument("ref", metavar="REQUEST_ID|FUNCTION")


def _payload(arg: str) -> bytes:
    if arg.startswith("@"):
        try:
            data = Path(arg[1:]).read_bytes()
        except OSError as e:
            raise _Refused(f"--payload {arg}: {e.strerror}") from None
    else:
        data = arg.encode()
    try:
        json.loads(data)
    except ValueError:
        raise _Refused("--payload: the event must be JSON (as Lambda's)") from None
    return data


def cmd_run(args) -> int:
    env = {}
    for kv in args.env:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise _Refused(f"--env {kv!r}: expected K=V")
        env[k] = v
    req = {
        "op": "fn_run", "code": str(Path(args.code).resolve()), "runtime": args.runtime,
        "handler": args.handler, "class": args.cls, "timeout": args.timeout, "env": env,
        "payload": base64.b64encode(_payload(args.payload)).decode(),
    }  # fmt: skip
    if args.name:
        req["name"] = args.name
    if args.cluster:
        res = asyncio.run(_through_cluster(args, req))
    else:
        with Client(args.socket, timeout=None) as c:
            res = c.call(req)["result"]
    if args.json:
        _emit_json({k: res[k] for k in ("response", "error", "report")})
    else:
        if res["error"] is None:
            r = res["response"]
            print(r if isinstance(r, str) else json.dumps(r))
        else:
            e = res["error"]
            print(f"{e['errorType']}: {e['errorMessage']}", file=sys.stderr)
        print(_report_line(res["report"]), file=sys.stderr)
    return 0 if res["error"] is None else 1


async def _through_cluster(args, req: dict) -> dict:
    """The invocation as a cluster job: a function reference, the event as its input."""
    fn = {k: req[k] for k in ("code", "runtime", "handler")}
    if "name" in req:
        fn["name"] = req["name"]
    spec = {"function": fn, "timeout": req["timeout"], "env": req["env"]}
    try:
        async with _client(args) as c:
            res = await c.run(req["class"], spec, base64.b64decode(req["payload"]))
    except (_Usage, SubmitError, ValueError, OSError) as e:
        raise _Refused(str(e)) from None
    if "report" not in res:  # never reached an environment: refused, or its node was lost
        raise _Refused(f"not run: {res.get('error') or res}")
    try:
        response = json.loads(res["response"])
    except (TypeError, ValueError):
        raise _Refused(f"{res.get('node')}: the response did not arrive whole") from None
    return {**res, "response": response}


def cmd_create(args) -> int:
    """CreateFunction with boto3 and the usual AWS credential chain: the class is a tag."""
    import boto3  # here, not at the top: it costs every other xxctl command 0.3 s
    from botocore.exceptions import BotoCoreError, ClientError

    from xxnode.node.env.code import CodeError, zip_tree

    endpoint = (args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_LAMBDA")
                or os.environ.get("AWS_ENDPOINT_URL"))  # fmt: skip
    if not endpoint:
        raise _Refused("no gateway: give --endpoint-url (xxctl up prints it)")
    path = Path(args.code)
    try:
        code = zip_tree(path) if path.is_dir() else path.read_bytes()
    except (OSError, CodeError) as e:
        raise _Refused(f"--code {args.code}: {e}") from None
    env = dict(kv.partition("=")[::2] for kv in args.env)
    kw: dict = {"FunctionName": args.name, "Runtime": args.runtime, "Timeout": args.timeout,
                "Role": "arn:aws:iam::000000000000:role/xx", "Code": {"ZipFile": code},
                "Environment": {"Variables": env}}  # fmt: skip
    if args.handler:
        kw["Handler"] = args.handler
    if args.cls:
        kw["Tags"] = {"xx:class": args.cls}
    region = args.region or os.environ.get("AWS_REGION") or "us-east-1"
    try:
        c = boto3.client("lambda", endpoint_url=endpoint, region_name=region)
        out = c.create_function(**kw)
    except ClientError as e:
        err = e.response["Error"]
        raise _Refused(f"{err.get('Code')}: {err.get('Message')}") from None
    except BotoCoreError as e:
        raise _Refused(str(e)) from None
    out.pop("ResponseMetadata", None)
    if args.json:
        _emit_json(out)
    else:
        print(f"{out['FunctionArn']} ({args.cls or 'the tenant default class'})")
    return 0


def _report_line(r: dict) -> str:
    cold = f", cold (init {r['init_ms']:.1f} ms)" if r["cold"] else ", warm"
    return (
        f"{r['request_id']} ({r['class']}{cold}): {r['duration_ms']:.2f} ms, billed "
        f"{r['billed_ms']} ms, cpu {r['cpu_ms']:.2f} ms, max memory {r['max_memory_mb']} MB, "
        f"price {r['price']:.6f} µ¢"
    )


def cmd_envs(args) -> int:
    with Client(args.socket) as c:
        envs = c.call({"op": "fn_envs"})["envs"]
    if args.json:
        _emit_json(envs)
        return 0
    print(
        f"{'ENV':<16} {'FUNCTION':<20} {'TENANT':<10} {'STATE':<9} {'CLASS':<8} {'MEMORY':>8}  IDLE SINCE"
    )
    for e in envs:
        since = (
            time.strftime("%H:%M:%S", time.localtime(e["idle_since"])) if e["idle_since"] else "-"
        )
        print(
            f"{e['env']:<16} {e['function'] + ':' + e['version']:<20} {e['tenant']:<10} "
            f"{e['state']:<9} {e['class'] or '-':<8} {_mib(e['memory_bytes']):>8}  {since}"
        )
    return 0


def cmd_logs(args) -> int:
    with Client(args.socket) as c:
        found = c.call({"op": "fn_logs", "ref": args.ref})["invocations"]
    if not found:
        raise _Refused(f"no invocation or function {args.ref!r} in this node's recent results")
    if args.json:
        _emit_json([{"report": r["report"], "error": r["error"], "log": r["log"]} for r in found])
        return 0
    for r in found:
        sys.stdout.write(r["log"])
    return 0

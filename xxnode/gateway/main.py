"""xxgate: XX's front door — Lambda's API for unmodified boto3, the AWS CLI and Terraform,
function URLs, and code by digest for the cluster's nodes.

Config (TOML): a [gateway] table and optional [[class]] tables; every key, its default and
its range: docs/config.md. Command-line options override the file. A mistake in the config
is one line naming the key, exit 2. It prints `xxgate: listening on http://HOST:PORT` once it
serves. SIGTERM or SIGINT stop it (exit 0); accepted Event invocations stay in the store.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys

import uvloop
from aiohttp import web

from xxnode import sdnotify, wire
from xxnode.cli import add_common, setup_logging
from xxnode.config import gateway as gateway_config
from xxnode.config.shard import metrics_listen
from xxnode.gateway.invoke import Invoker
from xxnode.gateway.server import Gateway
from xxnode.ledger.store import LedgerError, open_store
from xxnode.schema import ConfigError

ENV_KEY = "XX_CLUSTER_KEY_FILE"
log = logging.getLogger("xxgate")


async def serve(cfg: gateway_config.GatewayConfig, key: bytes) -> None:
    notifier = sdnotify.Notifier.from_environ()
    store = await asyncio.to_thread(open_store, cfg.store)
    invoker = Invoker([wire.parse_addr(s) for s in cfg.shards], key, cfg.code_url, cfg.margin)
    await invoker.start()
    gate = Gateway(store, cfg, invoker, key)
    # a request line up to 256 KiB reaches the API, which names what is wrong with a
    # 100 000-character function name, instead of aiohttp's bare 400
    runner = web.AppRunner(
        gate.app(), access_log=None, handle_signals=False,
        max_line_size=256 * 1024, max_field_size=64 * 1024,
    )  # fmt: skip
    await runner.setup()
    host, port = wire.parse_addr(cfg.listen)
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = runner.addresses[0]
    gate.invocations.start()
    exporter = None
    if cfg.metrics_listen:  # its own address: /metrics is not for the tenants' API port
        from xxnode import metrics

        metrics.declare("gateway", cfg.classes.names(), ("function",), queues=False)
        exporter, _ = await metrics.serve(cfg.metrics_listen, [metrics.gateway_collector(gate)])
    print(f"xxgate: listening on http://{bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    notifier.ready(f"listening on http://{bound[0]}:{bound[1]}")
    watchdog = notifier.start_watchdog()  # from this loop: a hung loop stops the pings
    try:
        await stop.wait()
        notifier.stopping("stopping")
    finally:
        if watchdog is not None:
            watchdog.cancel()
        await gate.invocations.stop()
        if exporter is not None:
            await exporter.cleanup()
        await runner.cleanup()
        await invoker.close()
        store.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="xxgate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", metavar="FILE", help="TOML config ([gateway], [[class]])")
    ap.add_argument("--listen", metavar="HOST:PORT", help="HTTP address (port 0: any)")
    ap.add_argument("--store", metavar="URL", help="sqlite:///PATH or postgresql://...")
    ap.add_argument("--shards", metavar="HOST:PORT[,...]", help="the shards to submit to")
    ap.add_argument("--key-file", metavar="FILE", help="the cluster key")
    ap.add_argument("--public-url", metavar="URL", help="the URL nodes fetch code from")
    ap.add_argument("--event-workers", type=int, metavar="N", help="0: accept events, run none")
    add_common(ap)
    args = ap.parse_args(argv)
    setup_logging("xxgate", args)
    try:
        cfg = gateway_config.load(args.config)
        over = {
            "listen": args.listen, "store": args.store, "public_url": args.public_url,
            "metrics_listen": metrics_listen("--metrics-listen", args.metrics_listen),
            "shards": tuple(s.strip() for s in args.shards.split(",")) if args.shards else None,
        }  # fmt: skip
        cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v})
        if args.event_workers is not None:
            if args.event_workers < 0:
                raise ConfigError("--event-workers: a number >= 0")
            cfg = dataclasses.replace(cfg, event_workers=args.event_workers)
        if cfg.listen.endswith(":0") and not cfg.public_url:
            raise ConfigError("gateway.public_url: needed when listening on port 0")
        key_file = args.key_file or os.environ.get(ENV_KEY) or cfg.key_file
        key = wire.load_key(key_file)
        uvloop.run(serve(cfg, key))
    except (ConfigError, ValueError, OSError, LedgerError) as e:
        print(f"xxgate: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""xxnode: the XX node daemon (foreground, logs to stderr).

    xxnode [--config FILE] [--check]

Config: --config, else $XX_CONFIG, else the built-in default (xxnode/config/default.toml;
every key: docs/config.md).
SIGTERM/SIGINT stop the daemon but not the jobs: they keep running at their priorities and
the next xxnode re-adopts them (as it does after a crash, kill -9 included).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from xxnode import config, sdnotify
from xxnode.cli import add_common, setup_logging
from xxnode.config.shard import metrics_listen

log = logging.getLogger("xxnode")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xxnode", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="TOML config file (default: $XX_CONFIG or built-in)")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument(
        "--ready-fd",
        type=int,
        metavar="FD",
        help="write 'READY\\n' to FD once serving, then close it",
    )
    add_common(p)
    args = p.parse_args(argv)
    setup_logging("xxnode", args)
    try:
        cfg = config.load(args.config)
        metrics_addr = metrics_listen("--metrics-listen", args.metrics_listen) or cfg.metrics_listen
    except config.ConfigError as e:
        print(f"xxnode: config: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{cfg.source}: ok, classes: " + ", ".join(c.name for c in cfg.classes))
        return 0

    from xxnode.node.api import Api
    from xxnode.node.daemon import Node, StartupError

    notifier = sdnotify.Notifier.from_environ()  # taken out of the env the jobs inherit
    node = Node(cfg)
    try:
        node.prepare()
    except StartupError as e:
        print(f"xxnode: {e}", file=sys.stderr)
        return 1

    async def serve(n: Node) -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda s=sig: stop.done() or stop.set_result(s))
        exporter = None
        if metrics_addr:  # up before READY: a ready node can be scraped
            from xxnode import metrics

            metrics.declare("node", cfg.classes.names(), ("function", "job"), queues=True)
            try:
                exporter, _ = await metrics.serve(metrics_addr, [metrics.node_collector(n)])
            except OSError as e:
                raise RuntimeError(str(e)) from None
        watchdog = []  # the task that pings systemd's watchdog from this loop, once ready
        on_ready = lambda: watchdog.append(_ready(args.ready_fd, notifier))  # noqa: E731
        task = loop.create_task(Api(n, on_ready=on_ready).serve())
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        if exporter is not None:
            await exporter.cleanup()
        if task in done:
            task.result()  # raise what stopped the server
        notifier.stopping("stopping; running jobs continue")
        task.cancel()
        log.info(
            "stopping on %s; running jobs continue and will be re-adopted",
            signal.Signals(stop.result()).name,
        )

    try:
        asyncio.run(node.run(serve))
    except RuntimeError as e:
        print(f"xxnode: {e}", file=sys.stderr)
        return 1
    finally:
        node.close()
    return 0


def _ready(fd: int | None, notifier: sdnotify.Notifier):
    """Tell whoever started us that the socket is up: --ready-fd, and systemd (Type=notify,
    READY=1); then ping systemd's watchdog from this loop, so a hung loop is restarted."""
    if fd is not None:
        try:
            os.write(fd, b"READY\n")
            os.close(fd)
        except OSError:
            pass
    notifier.ready("serving")
    return notifier.start_watchdog()


if __name__ == "__main__":
    sys.exit(main())

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
import socket
import sys

from xxnode import config
from xxnode.cli import add_common, setup_logging

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
    except config.ConfigError as e:
        print(f"xxnode: config: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{cfg.source}: ok, classes: " + ", ".join(c.name for c in cfg.classes))
        return 0

    from xxnode.node.api import Api
    from xxnode.node.daemon import Node, StartupError

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
        task = loop.create_task(Api(n, on_ready=lambda: _ready(args.ready_fd)).serve())
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # raise what stopped the server
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


def _ready(fd: int | None) -> None:
    """Tell whoever started us that the socket is up: --ready-fd, and systemd (Type=notify)."""
    if fd is not None:
        try:
            os.write(fd, b"READY\n")
            os.close(fd)
        except OSError:
            pass
    addr = os.environ.get("NOTIFY_SOCKET")
    if addr:
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.sendto(b"READY=1", addr)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())

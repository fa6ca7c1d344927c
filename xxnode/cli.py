"""What every XX command shares: its version, and one way of logging for the daemons.

A daemon's log line is ``2026-12-03T10:20:00.123Z xxshard INFO job 5f.. done on node0``:
UTC timestamp, program, level, message; ``--log-format json`` makes it one JSON object, and
under systemd the records go to the journal with their fields (xxnode/logs.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from xxnode import logs as xxlogs

LEVELS = ("debug", "info", "warning", "error")


def version() -> str:
    """The installed distribution's version, else the package's own __version__."""
    from importlib import metadata

    try:
        return metadata.version("xxnode")
    except metadata.PackageNotFoundError:
        import xxnode

        return getattr(xxnode, "__version__", "unknown")


def add_common(parser: argparse.ArgumentParser, logs: bool = True) -> None:
    """--version everywhere; --log-level and -v on the daemons."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    if logs:
        parser.add_argument(
            "--log-level", choices=LEVELS, default="info",
            help="least severe log lines written to stderr (default: info)",
        )  # fmt: skip
        parser.add_argument(
            "-v", "--verbose", action="store_true", help="debug logging (--log-level debug)"
        )
        parser.add_argument(
            "--log-format", choices=xxlogs.FORMATS, default="text", metavar="FMT",
            help="text: lines (the default); json: one JSON object a line",
        )  # fmt: skip
        parser.add_argument(
            "--log-target", choices=xxlogs.TARGETS, default="auto", metavar="TO",
            help="stderr, or journal: the systemd journal's socket, with fields "
            "(XX_INVOCATION, ...); auto (the default): journal when stderr is the journal",
        )  # fmt: skip
        parser.add_argument(
            "--metrics-listen", metavar="HOST:PORT",
            help="serve Prometheus /metrics there (overrides the config's metrics_listen)",
        )  # fmt: skip


def setup_logging(prog: str, args: argparse.Namespace) -> None:
    """Log lines of every logger to stderr or the journal, at the level asked for."""
    level = "debug" if getattr(args, "verbose", False) else getattr(args, "log_level", "info")
    target = getattr(args, "log_target", "auto")
    handler = xxlogs.handler_for(prog, getattr(args, "log_format", "text"), target)
    if isinstance(handler, xxlogs.JournalHandler) and not os.path.exists(handler.path):
        print(f"{prog}: --log-target journal: no {handler.path}; logging to stderr",
              file=sys.stderr)  # fmt: skip
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

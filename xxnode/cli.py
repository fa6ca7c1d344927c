"""What every XX command shares: its version, and one way of logging for the daemons.

A daemon's log line is ``2026-12-03T10:20:00.123Z xxshard INFO job 5f.. done on node0``:
UTC timestamp, program, level, message. Under systemd (``$JOURNAL_STREAM`` set) the journal
stamps each line itself, so the timestamp is left out there."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

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


class _Formatter(logging.Formatter):
    converter = time.gmtime

    def __init__(self, prog: str, stamp: bool) -> None:
        head = "%(asctime)s.%(msecs)03dZ " if stamp else ""
        super().__init__(f"{head}{prog} %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")


def setup_logging(prog: str, args: argparse.Namespace) -> None:
    """Log lines of every xxnode.* / xxshard logger to stderr, at the level asked for."""
    level = "debug" if getattr(args, "verbose", False) else getattr(args, "log_level", "info")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(prog, stamp="JOURNAL_STREAM" not in os.environ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

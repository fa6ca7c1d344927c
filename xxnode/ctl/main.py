"""xxctl: inspection and submission. Each command group lives in its own module beside this
one and adds its subcommands through `register(subparsers)`; this file only routes to them."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from xxnode.cli import add_common

# Modules under xxnode.ctl that provide register(subparsers); each subcommand sets
# `func(args) -> int` as its handler.
COMMAND_MODULES = ("doctor", "node_cmds", "cluster_cmds", "fn_cmds", "gate_cmds", "install_cmds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xxctl", description="Inspect and drive XX nodes, shards and the kernel they run on."
    )
    add_common(parser, logs=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"xxnode.ctl.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"xxnode.ctl.{name}":
                continue  # command group not built yet
            raise
        module.register(sub)
    return parser


def _quiet_broken_pipe() -> int:
    """The reader went away (`xxctl jobs | head -1`): say nothing, as cat and ls do. Point
    stdout at /dev/null so the interpreter's final flush does not complain either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by it


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # also from --help or an error message into a closed pipe
        return _quiet_broken_pipe()


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except KeyboardInterrupt:
        return 130
    except PermissionError as e:
        where = f" {e.filename}" if e.filename else ""
        print(
            f"xxctl {args.command}: permission denied{where}: needs root or membership in "
            "the group that owns it",
            file=sys.stderr,
        )
        return 1
    except (ConnectionError, FileNotFoundError, TimeoutError) as e:
        print(f"xxctl {args.command}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno == errno.EPIPE:
            return _quiet_broken_pipe()
        raise


if __name__ == "__main__":
    sys.exit(main())

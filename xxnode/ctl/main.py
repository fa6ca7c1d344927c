"""xxctl: inspection and submission. Each command group lives in its own module beside this
one and adds its subcommands through `register(subparsers)`; this file only dispatches."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules under xxnode.ctl that provide register(subparsers); each subcommand sets
# `func(args) -> int` as its handler.
COMMAND_MODULES = ("doctor", "node_cmds", "cluster_cmds")


class UsageError(Exception):
    """A user mistake: printed as one line, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xxctl", description="Inspect and drive XX nodes, shards and the kernel they run on."
    )
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"xxctl: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except (ConnectionError, FileNotFoundError, PermissionError, TimeoutError) as e:
        print(f"xxctl {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

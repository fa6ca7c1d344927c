"""xxshard: one shard of XX's global scheduler (paper §3.2).

It takes jobs from clients (`xxctl submit`, the cluster client), keeps one FIFO queue per
price class, and places the highest class's oldest job on a node: the idle node with the
shortest queue, or else the least loaded of k probed nodes. Nodes join it through their
dispatcher ([cluster] in the node's config). With a state dir every acknowledged job is
on disk first, and a restarted shard loses nothing.

Config (TOML): a [shard] table and optional [[class]] tables (default: the built-in
classes); every key, its default and its range: docs/config.md. Command-line options
override the file. The cluster key may also come from $XX_CLUSTER_KEY_FILE. A mistake in
the config is one line naming the key, exit 2. SIGTERM or SIGINT stop it (exit 0).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys

import uvloop

from xxnode import sdnotify, wire
from xxnode.classes import ClassTable
from xxnode.cli import add_common, setup_logging
from xxnode.config import shard as shard_config
from xxnode.config.shard import ShardParams, metrics_listen
from xxnode.schema import ConfigError
from xxnode.shard.server import Shard
from xxnode.shard.store import ShardStore

ENV_KEY = "XX_CLUSTER_KEY_FILE"
log = logging.getLogger("xxshard")


async def serve(
    bind: wire.Addr, key: bytes, classes: ClassTable, p: ShardParams, state_dir: str | None,
    metrics_addr: str = "",
) -> None:  # fmt: skip
    notifier = sdnotify.Notifier.from_environ()
    drop, seed = wire.drop_from_env()
    store = ShardStore(state_dir) if state_dir else None
    shard = Shard(classes, p, store=store)
    addr = await shard.start(bind, wire.Codec(key), drop, seed)
    exporter = None
    if metrics_addr:  # up before "listening on": a shard that says so can be scraped
        from xxnode import metrics

        metrics.declare("shard", classes.names(), ("function", "job"), queues=True)
        exporter, _ = await metrics.serve(metrics_addr, [metrics.shard_collector(shard)])
    if store is None:
        log.warning("no state_dir: acknowledged jobs do not survive a restart")
    else:
        log.info("state in %s; %d unfinished jobs recovered", state_dir, shard.counts["recovered"])
    log.info("classes: %s", ", ".join(f"{c.name} ({c.price:g})" for c in classes))
    print(f"xxshard: listening on {wire.fmt_addr(addr)}", flush=True)
    notifier.ready(f"listening on {wire.fmt_addr(addr)}")
    watchdog = notifier.start_watchdog()  # from this loop: a hung loop stops the pings
    try:
        sig = await shard.serve_until_signal()
        notifier.stopping(f"stopping on {sig.name}")
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if exporter is not None:
            await exporter.cleanup()
    log.info(
        "stopping on %s: %d job(s) held%s", sig.name, len(shard.jobs),
        " (on disk: the next xxshard on this state dir resumes them)" if store else " (lost)",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="xxshard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--config", metavar="FILE", help="TOML config ([shard], [[class]]); default: built-in"
    )
    ap.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="UDP address to serve (default: shard.listen, 127.0.0.1:7100; port 0: any)",
    )
    ap.add_argument(
        "--key-file",
        metavar="FILE",
        help="the cluster key (default: shard.key_file, else $XX_CLUSTER_KEY_FILE)",
    )
    ap.add_argument(
        "--state-dir",
        metavar="DIR",
        help="journal here (0700): a restart loses no acknowledged job",
    )
    add_common(ap)
    args = ap.parse_args(argv)
    setup_logging("xxshard", args)
    try:
        cfg = shard_config.load(args.config)
        bind = wire.parse_addr(args.listen or cfg.listen)
        key_file = args.key_file or cfg.key_file or os.environ.get(ENV_KEY)
        if not key_file:
            raise ConfigError("shard.key_file: no cluster key (--key-file or $XX_CLUSTER_KEY_FILE)")
        key = wire.load_key(key_file)
        # uvloop: the event loop in C (libuv).  The shard is one Python thread doing
        # ~10 small loop callbacks per placement; asyncio's pure-Python loop was a fifth
        # of its CPU time per placement (tools/bench_shard).
        # The collector was the shard's tail latency (p99 12 ms at 1000/s, 2 ms without
        # it): the startup heap moves out of its reach, and young collections run every
        # 20 000 net allocations instead of 700.  Nothing in the hot path makes cycles.
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
        state_dir = args.state_dir or cfg.state_dir or None
        metrics_addr = metrics_listen("--metrics-listen", args.metrics_listen) or cfg.metrics_listen
        uvloop.run(serve(bind, key, cfg.classes, cfg.params, state_dir, metrics_addr))
    except (ConfigError, ValueError, OSError) as e:
        print(f"xxshard: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
